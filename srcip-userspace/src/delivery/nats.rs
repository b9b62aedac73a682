//! The NATS JetStream sink: `nats://HOST:PORT/SUBJECT?stream=NAME`, or `tls://…` for a
//! server that must speak TLS (trusting `--sink-ca` when given, the system's CAs otherwise).
//! `--nats-creds FILE` authenticates it the way `nats` CLI users do: a `.creds` file (a
//! user JWT and its nkey seed) or a file holding a user nkey seed alone.
//!
//! Each alert is published to `SUBJECT.HOST.TYPE` (the host name with anything but letters,
//! digits, `-` and `_` made `_`, so that it stays one subject token) and counts as delivered only when the stream has
//! acknowledged it. The stream, covering `SUBJECT.>`, is created when missing. A fleet's
//! alerts then sit in one durable, replayable stream that any number of consumers read.
//! Each message carries a `Nats-Msg-Id` made from its content, so the stream drops a
//! duplicate that a retry sends within its deduplication window (2 minutes by default).
//! Messages go through the sink's spool (`spool.rs`), as every network sink's do.

use std::{io, path::Path, sync::mpsc, time::Duration};

use anyhow::Context as _;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};

use super::SharedAlert;
use super::{
    SinkAccess, SinkCounters, client_runtime,
    spool::{SendError, Spool, forward},
};
use crate::alerts::{Alert, host_name, json_object};

/// How long connecting, creating the stream, or one batch of publishes may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a NATS sink publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTarget {
    /// `tls://`: the connection must be encrypted (`nats://` takes TLS only when the server
    /// asks for it).
    pub tls: bool,
    /// `HOST:PORT`, possibly after `USER:PASSWORD@`.
    pub server: String,
    pub subject: String,
    pub stream: String,
}

impl NatsTarget {
    /// `nats://HOST:PORT/SUBJECT?stream=NAME` or `tls://…`; `None` for other schemes.
    pub fn parse(url: &str) -> Option<Result<Self, String>> {
        let (tls, rest) = match url.strip_prefix("nats://") {
            Some(rest) => (false, rest),
            None => (true, url.strip_prefix("tls://")?),
        };
        let usage = || {
            format!(
                "{url}: expected nats://HOST:PORT/SUBJECT?stream=NAME (or tls://…), e.g. nats://nats.example.net:4222/srcip?stream=SRCIP"
            )
        };
        let parsed = (|| {
            let (server, path) = rest.split_once('/')?;
            let (subject, query) = path.split_once('?')?;
            let stream = query.strip_prefix("stream=")?;
            let valid = |token: &str| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            };
            let subject_ok = subject.split('.').all(valid);
            (server.contains(':') && subject_ok && valid(stream)).then(|| Self {
                tls,
                server: server.to_owned(),
                subject: subject.to_owned(),
                stream: stream.to_owned(),
            })
        })();
        Some(parsed.ok_or_else(usage))
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "tls" } else { "nats" }
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}/{}?stream={}",
            self.scheme(),
            self.server,
            self.subject,
            self.stream
        )
    }

    /// The sink's name wherever it shows (metrics labels, logs, `lost` lines, the spool's
    /// file name): the URL without credentials (`user:password@`).
    pub fn name(&self) -> String {
        let server = self
            .server
            .rsplit_once('@')
            .map_or(self.server.as_str(), |(_, host)| host);
        format!(
            "{}://{server}/{}?stream={}",
            self.scheme(),
            self.subject,
            self.stream
        )
    }
}

/// Who a NATS sink is to its server (`--nats-creds FILE`), read once at start so that a
/// wrong file stops srcip there. Never printed: it holds a secret.
#[derive(Clone)]
pub enum NatsCredentials {
    /// A `.creds` file's text: the user's JWT and the nkey seed that signs the server's nonce.
    Creds(String),
    /// A user nkey seed (`SU…`), for a server that lists the user's public nkey.
    NkeySeed(String),
}

impl NatsCredentials {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the NATS credentials {}", path.display()))?;
        if text.contains("-----BEGIN NATS USER JWT-----") {
            async_nats::ConnectOptions::new()
                .credentials(&text)
                .with_context(|| {
                    format!(
                        "{} is not a usable NATS credentials file (a user JWT and its nkey seed, as `nsc generate creds` writes it)",
                        path.display()
                    )
                })?;
            return Ok(Self::Creds(text));
        }
        let not_credentials = || {
            anyhow::anyhow!(
                "{} holds neither a NATS user JWT with its seed (a .creds file) nor a user nkey seed (a line starting with SU, as `nk -gen user` writes it)",
                path.display()
            )
        };
        let seed = text
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with('S'))
            .ok_or_else(not_credentials)?;
        // The error says what is wrong with the seed (its checksum, its length), never the
        // seed itself.
        let key = nkeys::KeyPair::from_seed(seed).map_err(|error| {
            anyhow::anyhow!(
                "{} holds a line that is not a usable nkey seed ({error}): give the user's seed (SU…), whole, or its .creds file",
                path.display()
            )
        })?;
        if key.key_pair_type() != nkeys::KeyPairType::User {
            anyhow::bail!(
                "{} holds an nkey seed of a {:?}, not of a user: give the user's seed (SU…) or its .creds file",
                path.display(),
                key.key_pair_type()
            );
        }
        Ok(Self::NkeySeed(seed.to_owned()))
    }

    fn apply(&self, options: async_nats::ConnectOptions) -> io::Result<async_nats::ConnectOptions> {
        match self {
            Self::Creds(text) => options.credentials(text),
            Self::NkeySeed(seed) => Ok(options.nkey(seed.clone())),
        }
    }
}

/// A connection with its JetStream context, the stream known to exist.
struct Connection {
    jetstream: jetstream::Context,
}

impl Connection {
    async fn open(target: &NatsTarget, access: &SinkAccess) -> io::Result<Self> {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(NATS_TIMEOUT)
            .require_tls(target.tls);
        if let Some(ca) = &access.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some(credentials) = &access.nats_credentials {
            options = credentials.apply(options)?;
        }
        let server = format!("{}://{}", target.scheme(), target.server);
        let client = options.connect(server).await.map_err(io::Error::other)?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: target.stream.clone(),
                subjects: vec![format!("{}.>", target.subject)],
                ..Default::default()
            })
            .await
            .map_err(io::Error::other)?;
        Ok(Self { jetstream })
    }

    /// Publishes each spooled message (`TYPE JSON`) and waits for every acknowledgement.
    async fn publish(
        &self,
        target: &NatsTarget,
        host: &str,
        messages: &[Vec<u8>],
    ) -> Result<(), SendError> {
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            let split = message.iter().position(|&byte| byte == b' ').unwrap_or(0);
            let (kind, json) = (&message[..split], &message[split + 1..]);
            let subject = format!(
                "{}.{host}.{}",
                target.subject,
                String::from_utf8_lossy(kind)
            );
            let publish = PublishMessage::build()
                .payload(json.to_vec().into())
                .message_id(format!("{:016x}", fnv1a(json)));
            let ack = self
                .jetstream
                .send_publish(subject, publish)
                .await
                .map_err(|error| match error.kind() {
                    // Larger than the server takes: it never will.
                    PublishErrorKind::MaxPayloadExceeded => SendError::Refused(format!(
                        "the NATS server refuses a message this large ({error})"
                    )),
                    _ => SendError::Retry(io::Error::other(error)),
                })?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .map_err(|error| SendError::Retry(io::Error::other(error)))?;
        }
        Ok(())
    }
}

/// Publishes what arrives in `alerts` until the queue is closed, through `spool`.
pub(super) fn write_nats(
    target: &NatsTarget,
    access: &SinkAccess,
    alerts: &mpsc::Receiver<SharedAlert>,
    counters: &SinkCounters,
    spool: Spool,
) {
    let Some(runtime) = client_runtime(&target.name()) else {
        return;
    };
    let host = host_name();
    // One subject token: NATS separates tokens with dots and gives `*` and `>` meanings.
    let subject_host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut connection: Option<Connection> = None;
    let send = |messages: &[Vec<u8>]| -> Result<(), SendError> {
        runtime.block_on(async {
            let result = tokio::time::timeout(NATS_TIMEOUT, async {
                if connection.is_none() {
                    connection = Some(Connection::open(target, access).await?);
                }
                let open = connection.as_ref().expect("just opened");
                open.publish(target, &subject_host, messages).await
            })
            .await
            .unwrap_or_else(|_| {
                Err(SendError::Retry(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "NATS did not answer in time",
                )))
            });
            // A connection that failed once is not trusted again.
            if matches!(result, Err(SendError::Retry(_))) {
                connection = None;
            }
            result
        })
    };
    let render = |alert: &Alert| -> Vec<u8> {
        let mut json = json_object(alert, &host);
        let kind = alert.body.type_name();
        // Spooled as `TYPE JSON`: the subject needs the type when the message is sent.
        let mut message = Vec::with_capacity(kind.len() + 1 + json.len());
        message.extend_from_slice(kind.as_bytes());
        message.push(b' ');
        message.append(&mut json);
        message
    };
    forward(&target.name(), alerts, counters, spool, render, send);
}

/// FNV-1a, 64 bits: a stable id for a message's content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::NatsCredentials;

    #[test]
    fn a_credentials_file_is_a_creds_file_or_an_nkey_seed_and_anything_else_names_the_file() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("srcip.creds");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        std::fs::write(&path, format!("# the user's seed\n{seed}\n")).unwrap();
        assert!(
            matches!(NatsCredentials::load(&path), Ok(NatsCredentials::NkeySeed(read)) if read == seed)
        );
        // One character changed: its checksum fails.
        let damaged = format!(
            "{}{}",
            &seed[..10],
            if &seed[10..11] == "A" { "B" } else { "A" }
        ) + &seed[11..];
        let account = nkeys::KeyPair::new_account().seed().unwrap();
        for text in [
            "",
            "user:password\n",
            "-----BEGIN NATS USER JWT-----\nx\n",
            &damaged,
            &account,
        ] {
            std::fs::write(&path, text).unwrap();
            let error = format!("{:#}", NatsCredentials::load(&path).err().unwrap());
            assert!(error.starts_with(&path.display().to_string()), "{error}");
            assert!(!error.contains("password"), "{error}");
            if !text.is_empty() {
                assert!(!error.contains(text.trim()), "the secret in {error}");
            }
        }
        let missing = folder.path().join("missing.creds");
        let error = format!("{:#}", NatsCredentials::load(&missing).err().unwrap());
        assert!(error.contains("missing.creds"), "{error}");
    }
}
