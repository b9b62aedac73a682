//! Syslog sinks: RFC 5424 messages to the local syslog socket (`syslog:`, or
//! `syslog:/path/of/socket`), over UDP (`syslog+udp://HOST:PORT`, one message per datagram)
//! or over TCP (`syslog+tcp://HOST:PORT`, RFC 6587 octet counting).
//!
//! Each message carries the alert's fields as structured data (`[srcip@32473 key="value"
//! …]`, 32473 being the enterprise number RFC 5612 reserves for examples and documentation)
//! and its readable line as the message, so that both a person reading the log and a
//! collector parsing it get everything. Messages go through the sink's spool (`spool.rs`):
//! a receiver that is down, even across a restart of srcip, gets them when it is back. A
//! failed send is retried on a new connection.

use std::{
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs as _, UdpSocket},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use super::SharedAlert;
use super::{
    SinkCounters,
    spool::{MAX_BACKOFF, SendError, Spool, forward},
};
use crate::alerts::{Alert, AlertBody, host_name, rfc3339, text_message};

/// The local syslog socket of `syslog:`.
const LOCAL_SOCKET: &str = "/dev/log";
/// How long connecting to a TCP receiver may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a syslog sink sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// A unix datagram socket: `/dev/log` unless the URL names another.
    Local(PathBuf),
    Udp(String),
    Tcp(String),
}

impl SyslogTarget {
    /// `syslog:[PATH]`, `syslog+udp://HOST:PORT` or `syslog+tcp://HOST:PORT`; `None` for other
    /// schemes.
    pub fn parse(url: &str) -> Option<Result<Self, String>> {
        let with_address = |address: &str, scheme: &str| {
            if address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0)
            }) {
                Ok(address.trim_end_matches('/').to_owned())
            } else {
                Err(format!(
                    "{scheme}{address} needs HOST:PORT, e.g. {scheme}logs.example.net:514"
                ))
            }
        };
        if let Some(address) = url.strip_prefix("syslog+udp://") {
            Some(with_address(address, "syslog+udp://").map(Self::Udp))
        } else if let Some(address) = url.strip_prefix("syslog+tcp://") {
            Some(with_address(address, "syslog+tcp://").map(Self::Tcp))
        } else {
            let path = url.strip_prefix("syslog:")?;
            let path = if path.is_empty() { LOCAL_SOCKET } else { path };
            Some(Ok(Self::Local(PathBuf::from(path))))
        }
    }

    pub fn url(&self) -> String {
        match self {
            Self::Local(path) => format!("syslog:{}", path.display()),
            Self::Udp(address) => format!("syslog+udp://{address}"),
            Self::Tcp(address) => format!("syslog+tcp://{address}"),
        }
    }
}

/// An open connection to the receiver.
enum Connection {
    Local(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl Connection {
    fn open(target: &SyslogTarget) -> io::Result<Self> {
        Ok(match target {
            SyslogTarget::Local(path) => {
                let socket = UnixDatagram::unbound()?;
                socket.connect(path)?;
                Self::Local(socket)
            }
            SyslogTarget::Udp(address) => {
                let socket =
                    UdpSocket::bind(("::", 0)).or_else(|_| UdpSocket::bind(("0.0.0.0", 0)))?;
                socket.connect(address)?;
                Self::Udp(socket)
            }
            SyslogTarget::Tcp(address) => {
                // Bounded, so that srcip stops in time even when the receiver's host is
                // unreachable.
                let mut last_error = io::Error::other(format!("{address} names no address"));
                let mut connected = None;
                for candidate in address.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&candidate, CONNECT_TIMEOUT) {
                        Ok(stream) => {
                            connected = Some(stream);
                            break;
                        }
                        Err(error) => last_error = error,
                    }
                }
                let stream = connected.ok_or(last_error)?;
                stream.set_write_timeout(Some(MAX_BACKOFF))?;
                Self::Tcp(stream)
            }
        })
    }

    fn send(&mut self, messages: &[Vec<u8>]) -> io::Result<()> {
        match self {
            Self::Local(socket) => {
                for message in messages {
                    socket.send(message)?;
                }
            }
            Self::Udp(socket) => {
                for message in messages {
                    socket.send(message)?;
                }
            }
            // RFC 6587 octet counting: a message may then hold any byte, newlines included.
            Self::Tcp(stream) => {
                let mut framed = Vec::new();
                for message in messages {
                    write!(framed, "{} ", message.len())?;
                    framed.extend_from_slice(message);
                }
                stream.write_all(&framed)?;
            }
        }
        Ok(())
    }
}

/// Sends what arrives in `alerts` until the queue is closed, through `spool`.
pub(super) fn write_syslog(
    target: &SyslogTarget,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
    spool: Spool,
) {
    let host = host_name();
    let pid = std::process::id();
    let mut connection: Option<Connection> = None;
    let send = |messages: &[Vec<u8>]| -> Result<(), SendError> {
        let open = match &mut connection {
            Some(open) => open,
            empty => empty.insert(Connection::open(target)?),
        };
        match open.send(messages) {
            Ok(()) => Ok(()),
            // A datagram larger than the socket can carry never will be.
            Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE) => Err(SendError::Refused(
                format!("a message is larger than a datagram to the receiver can be ({error})"),
            )),
            // A connection that failed once is not trusted again.
            Err(error) => {
                connection = None;
                Err(SendError::Retry(error))
            }
        }
    };
    forward(
        &target.url(),
        alerts,
        counters,
        spool,
        |alert| rfc5424(alert, &host, pid).into_bytes(),
        send,
    );
}

/// Facility `daemon` (3), with a severity per alert type.
fn priority(body: &AlertBody) -> u8 {
    let severity = match body {
        AlertBody::Violation(_) | AlertBody::RouteDrift(_) => 4, // warning
        AlertBody::Lost { .. } | AlertBody::DeadLetter { .. } | AlertBody::PolicyError { .. } => {
            3 // error
        }
        AlertBody::Started { .. }
        | AlertBody::Stopped { .. }
        | AlertBody::Reloaded { .. }
        | AlertBody::Resolved { .. }
        | AlertBody::RouteRecovered(_)
        | AlertBody::Pinned(_) => 5, // notice
        AlertBody::Connect(_) => 6, // informational
    };
    3 * 8 + severity
}

/// `<PRI>1 TIMESTAMP HOSTNAME srcip PROCID TYPE [srcip@32473 FIELDS] MESSAGE`.
pub fn rfc5424(alert: &Alert, host: &str, pid: u32) -> String {
    let fields = serde_json::to_value(&alert.body).unwrap_or(Value::Null);
    let kind = alert.body.type_name();
    let mut data = String::from("[srcip@32473");
    if let Value::Object(fields) = &fields {
        for (key, value) in fields.iter().filter(|(key, _)| *key != "type") {
            let value = match value {
                Value::Null => continue,
                Value::String(text) => text.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map_or_else(|| item.to_string(), str::to_owned)
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            data.push_str(&format!(" {key}=\"{}\"", escape_param(&value)));
        }
    }
    data.push(']');
    format!(
        "<{}>1 {} {} srcip {pid} {kind} {data} {}",
        priority(&alert.body),
        rfc3339(alert.time),
        header_field(host),
        text_message(&alert.body)
    )
}

/// RFC 5424 PARAM-VALUE: `"`, `\` and `]` are escaped with a backslash.
fn escape_param(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        if matches!(character, '"' | '\\' | ']') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// A header field is printable ASCII without spaces, at most 255 characters; `-` if empty.
fn header_field(value: &str) -> String {
    let field: String = value
        .chars()
        .filter(|character| character.is_ascii_graphic())
        .take(255)
        .collect();
    if field.is_empty() {
        "-".to_owned()
    } else {
        field
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn targets_parse_from_urls() {
        assert_eq!(
            SyslogTarget::parse("syslog:"),
            Some(Ok(SyslogTarget::Local("/dev/log".into())))
        );
        assert_eq!(
            SyslogTarget::parse("syslog:/run/x.sock"),
            Some(Ok(SyslogTarget::Local("/run/x.sock".into())))
        );
        assert_eq!(
            SyslogTarget::parse("syslog+tcp://logs.example.net:6514"),
            Some(Ok(SyslogTarget::Tcp("logs.example.net:6514".into())))
        );
        assert!(SyslogTarget::parse("syslog+udp://logs").unwrap().is_err());
        assert_eq!(SyslogTarget::parse("file:/x"), None);
    }

    #[test]
    fn messages_are_rfc5424_with_escaped_structured_data() {
        let alert = Alert {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456),
            body: AlertBody::Lost {
                count: 3,
                sink: Some("file:/x]\"y".into()),
            },
        };
        assert_eq!(
            rfc5424(&alert, "web 1", 42),
            "<27>1 2025-11-24T16:00:00.123456Z web1 srcip 42 lost \
             [srcip@32473 count=\"3\" sink=\"file:/x\\]\\\"y\"] \
             LOST 3 alerts that sink file:/x]\"y could not take"
        );
    }
}
