//! Kernel records to typed events.
//!
//! # Record layout
//! Each ring-buffer item starts with `srcip_common::record::RecordHeader`; its `kind` names
//! the payload. Unknown kinds and short items are errors, never reinterpreted.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use srcip_common::{
    fold::{FoldKey, NO_RULE},
    record::{
        AF_INET, AF_INET6, ConnectRecord, IPPROTO_TCP, IPPROTO_UDP, RecordFlags, RecordHeader,
        RecordKind,
    },
};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use crate::policy::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// An outbound connection and the source address the kernel chose for it.
#[derive(Debug, Clone)]
pub struct ConnectEvent {
    pub time: SystemTime,
    pub protocol: Protocol,
    /// The family on the wire; IPv4-mapped connections are IPv4.
    pub family: Family,
    /// The source the kernel chose for the socket (for unconnected UDP: the datagram's).
    pub src: IpAddr,
    /// The source on the wire when address translation on this host changed `src`.
    pub wire_src: Option<IpAddr>,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub pid: u32,
    pub uid: u32,
    /// The packet's mark as it left (0 for a connection refused at `connect()`).
    pub mark: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// This violation opened a folding window in `FOLDS`; user space flushes the window's
    /// repeats when it closes.
    pub fold_window: Option<OpenedWindow>,
    /// What the kernel did to the connection besides recording it.
    pub enforcement: Enforcement,
    /// Why a `pin` rule's connection was not pinned, when the kernel tried.
    pub pin_error: Option<PinError>,
    /// What the kernel decided; `None` when it could not, and user space decides.
    pub kernel_decision: Option<KernelDecision>,
}

/// The kernel's decision of a recorded connection (`srcip_common::record::Decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelDecision {
    pub verdict: KernelVerdict,
    /// The rule's index in the kernel's `RULES` (the policy of `generation`'s half), or
    /// `None` when no rule matched.
    pub rule: Option<u32>,
    pub generation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelVerdict {
    Compliant,
    /// Of `rule`, or of no rule when the policy reports unmatched connections.
    Violation,
    /// No rule matched, and the policy ignores unmatched connections.
    Unmatched,
}

/// Why the kernel could not pin a connection (`RecordFlags::PIN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinError {
    /// The program had chosen its source itself (bound it, or `IP_PKTINFO`).
    BoundAddress,
    /// The socket's port was bound: a bound socket cannot be bound again.
    BoundPort,
    /// The pin source is not an address of the host in the socket's network namespace.
    Absent,
    /// The rule has no pin source of the destination's family.
    NoSource,
}

impl PinError {
    fn of(flags: u32) -> Option<Self> {
        [
            (RecordFlags::PIN_BOUND_ADDRESS, Self::BoundAddress),
            (RecordFlags::PIN_BOUND_PORT, Self::BoundPort),
            (RecordFlags::PIN_ABSENT, Self::Absent),
            (RecordFlags::PIN_NO_SOURCE, Self::NoSource),
        ]
        .into_iter()
        .find_map(|(flag, error)| (flags & flag != 0).then_some(error))
    }
}

/// A process's command name (`comm`), held inline: `--all` decodes one per connection, and
/// a `String` would be an allocation each.
#[derive(Clone, Copy)]
pub struct Comm {
    /// UTF-8; room for the kernel's 16 bytes each replaced by U+FFFD (3 bytes), as a name
    /// need not be UTF-8.
    text: [u8; Comm::CAPACITY],
    len: u8,
}

impl Comm {
    const CAPACITY: usize = 16 * 3;

    /// The name in a record: up to its first NUL, with bytes that are not UTF-8 replaced by
    /// U+FFFD.
    pub fn from_kernel(comm: &[u8; 16]) -> Self {
        let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        Self::from(&*String::from_utf8_lossy(&comm[..len]))
    }
}

impl From<&str> for Comm {
    /// Cut at [`Comm::CAPACITY`] bytes, on a character boundary.
    fn from(name: &str) -> Self {
        let mut len = name.len().min(Self::CAPACITY);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut text = [0; Self::CAPACITY];
        text[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            text,
            len: len as u8,
        }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;

    fn deref(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)])
            .expect("a Comm holds the UTF-8 it was made from")
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, formatter)
    }
}

impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self)
    }
}

/// A `pin` or `block` the kernel carried out at `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    None,
    /// srcip bound the socket to its `pin` rule's source.
    Pinned,
    /// The kernel refused the connection (`block`). `predicted`: the program had bound no
    /// source, and `src` is the one the routing tables would have chosen. `at_egress`: its
    /// packet was stopped, on the source it carried, rather than its `connect()` or
    /// `sendmsg()`.
    Refused {
        predicted: bool,
        at_egress: bool,
    },
}

/// A folding window the kernel opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenedWindow {
    pub key: FoldKey,
    /// `CLOCK_BOOTTIME` nanoseconds of the violation that opened it.
    pub opened_ns: u64,
}

#[derive(Debug, Clone)]
pub enum KernelEvent {
    Connect(ConnectEvent),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {expected}-byte layout")]
    Short { len: usize, expected: usize },
    #[error("record kind {0} is unknown to this version of srcip")]
    UnknownKind(u32),
    #[error("address family {0} is unknown")]
    UnknownFamily(u8),
    #[error("IP protocol {0} is unknown")]
    UnknownProtocol(u8),
}

/// Converts kernel `CLOCK_BOOTTIME` stamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    /// Wall-clock time at boot (`CLOCK_REALTIME - CLOCK_BOOTTIME`), taken again at each
    /// reading of the ring buffer (two vDSO calls), so that a step of the wall clock (NTP
    /// just after boot, an operator's `date -s`) shows in the next events' times.
    boot: SystemTime,
}

impl BootClock {
    /// `CLOCK_BOOTTIME` now, in the kernel records' unit.
    pub fn boot_ns_now() -> u64 {
        clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map_or(0, |now| Duration::from(now).as_nanos() as u64)
    }

    pub fn now() -> nix::Result<Self> {
        let since_boot = Duration::from(clock_gettime(ClockId::CLOCK_BOOTTIME)?);
        Ok(Self {
            boot: SystemTime::now() - since_boot,
        })
    }

    pub fn wall_time(self, boot_time_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(boot_time_ns)
    }
}

/// The `EVENTS` ring buffer, readable from tokio.
pub struct EventRing {
    ring: AsyncFd<RingBuf<MapData>>,
    clock: BootClock,
    /// The readiness wait failed once: from then on the reader only polls.
    polling_only: bool,
}

impl EventRing {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its file descriptor and keeps it open and unchanged
        // for as long as the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
        Ok(Self {
            ring,
            clock: BootClock::now()?,
            polling_only: false,
        })
    }

    /// Waits until the kernel wakes the reader (for a violation, or a buffer filling up);
    /// callers also poll on a timer. If the wait itself fails, it never returns again, so
    /// that the caller's poll takes over instead of a loop that spins on the error.
    pub async fn wakeup(&mut self) {
        if self.polling_only {
            return std::future::pending().await;
        }
        match self.ring.readable_mut().await {
            Ok(mut guard) => guard.clear_ready(),
            Err(error) => {
                warn!(
                    "waiting on the EVENTS ring buffer failed ({error}); reading it by polling from now on, so violations may wait up to one poll interval"
                );
                self.polling_only = true;
            }
        }
    }

    /// The clock of the latest reading.
    pub fn clock(&self) -> BootClock {
        self.clock
    }

    /// Decodes every record in the buffer now, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(Result<KernelEvent, DecodeError>)) {
        // Cannot fail on Linux; were it to, the previous offset serves.
        if let Ok(now) = BootClock::now() {
            self.clock = now;
        }
        let clock = self.clock;
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            each(decode(&item, clock));
        }
    }
}

pub fn decode(bytes: &[u8], clock: BootClock) -> Result<KernelEvent, DecodeError> {
    let header: RecordHeader = read_record(bytes)?;
    match RecordKind::try_from(header.kind).map_err(DecodeError::UnknownKind)? {
        RecordKind::Connect => {
            let record: ConnectRecord = read_record(bytes)?;
            decode_connect(&record, clock).map(KernelEvent::Connect)
        }
    }
}

fn read_record<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(DecodeError::Short {
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: `T: Pod` is valid for any bytes, the length is checked above, and
    // `read_unaligned` does not require the ring buffer's 8-byte alignment to suit `T`.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn decode_connect(record: &ConnectRecord, clock: BootClock) -> Result<ConnectEvent, DecodeError> {
    let (family, address): (Family, fn(&[u8; 16]) -> IpAddr) = match record.family {
        AF_INET => (Family::Ipv4, |bytes| IpAddr::V4(ipv4(bytes))),
        AF_INET6 => (Family::Ipv6, |bytes| IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    let wire_src =
        (record.flags & RecordFlags::TRANSLATED != 0).then(|| address(&record.wire_src_addr));
    let protocol = match record.protocol {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        other => return Err(DecodeError::UnknownProtocol(other)),
    };
    let decided = [
        (RecordFlags::DECIDED_COMPLIANT, KernelVerdict::Compliant),
        (RecordFlags::DECIDED_VIOLATION, KernelVerdict::Violation),
        (RecordFlags::DECIDED_UNMATCHED, KernelVerdict::Unmatched),
    ];
    let verdict = decided
        .into_iter()
        .find(|(flag, _)| record.flags & flag != 0)
        .map(|(_, verdict)| verdict);
    let kernel_decision = verdict.map(|verdict| KernelDecision {
        verdict,
        rule: (record.rule != NO_RULE).then_some(record.rule),
        generation: record.generation,
    });
    let fold_window = (record.flags & RecordFlags::FOLD_WINDOW != 0).then_some(OpenedWindow {
        key: FoldKey {
            rule: record.rule,
            protocol: record.protocol,
            family: record.family,
            dst_port: record.dst_port,
            cgroup_id: record.cgroup_id,
            src: record.src_addr,
            wire_src: record.wire_src_addr,
            dst: record.dst_addr,
        },
        opened_ns: record.header.boot_time_ns,
    });
    Ok(ConnectEvent {
        time: clock.wall_time(record.header.boot_time_ns),
        protocol,
        family,
        src: address(&record.src_addr),
        wire_src,
        src_port: record.src_port,
        dst: address(&record.dst_addr),
        dst_port: record.dst_port,
        pid: record.pid,
        uid: record.uid,
        mark: record.mark,
        comm: Comm::from_kernel(&record.comm),
        cgroup_id: record.cgroup_id,
        netns_cookie: record.netns_cookie,
        fold_window,
        enforcement: if record.flags & RecordFlags::REFUSED != 0 {
            Enforcement::Refused {
                predicted: record.flags & RecordFlags::PREDICTED != 0,
                at_egress: record.flags & RecordFlags::AT_EGRESS != 0,
            }
        } else if record.flags & RecordFlags::PINNED != 0 {
            Enforcement::Pinned
        } else {
            Enforcement::None
        },
        pin_error: PinError::of(record.flags),
        kernel_decision,
    })
}

fn ipv4(bytes: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

#[cfg(test)]
mod tests {
    use srcip_common::record::RecordHeader;

    use super::*;

    fn as_bytes(record: &ConnectRecord) -> Vec<u8> {
        // SAFETY: ConnectRecord is Pod with no padding (asserted in srcip-common).
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(record).cast::<u8>(),
                size_of::<ConnectRecord>(),
            )
        }
        .to_vec()
    }

    fn record(family: u8, protocol: u8) -> ConnectRecord {
        let mut src_addr = [0; 16];
        src_addr[..4].copy_from_slice(&[203, 0, 113, 11]);
        let mut dst_addr = [0; 16];
        dst_addr[..4].copy_from_slice(&[198, 51, 100, 50]);
        ConnectRecord {
            header: RecordHeader {
                kind: RecordKind::Connect as u32,
                len: size_of::<ConnectRecord>() as u32,
                boot_time_ns: 5_000_000_000,
            },
            cgroup_id: 42,
            netns_cookie: 3,
            src_addr,
            wire_src_addr: src_addr,
            dst_addr,
            pid: 1234,
            uid: 1000,
            src_port: 40000,
            dst_port: 443,
            family,
            protocol,
            reserved: [0; 2],
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            rule: 0,
            flags: 0,
            mark: 0,
            generation: 0,
        }
    }

    #[test]
    fn command_names_are_held_whole_whatever_their_bytes() {
        assert_eq!(&*Comm::from_kernel(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(&*Comm::from_kernel(b"0123456789abcdef"), "0123456789abcdef");
        // Sixteen bytes that are not UTF-8: each replaced, the longest name there can be.
        assert_eq!(&*Comm::from_kernel(&[0xff; 16]), "\u{fffd}".repeat(16));
        // A name longer than the room is cut at a character, never inside one: here the
        // 48th byte is the first of a two-byte character.
        let long = format!("a{}", "é".repeat(30));
        assert_eq!(&*Comm::from(long.as_str()), format!("a{}", "é".repeat(23)));
    }

    #[test]
    fn connect_records_decode_to_events() {
        let clock = BootClock {
            boot: SystemTime::UNIX_EPOCH,
        };
        let KernelEvent::Connect(event) =
            decode(&as_bytes(&record(AF_INET, IPPROTO_TCP)), clock).unwrap();
        assert_eq!(event.src, IpAddr::from([203, 0, 113, 11]));
        assert_eq!(event.wire_src, None);
        assert_eq!(event.dst, IpAddr::from([198, 51, 100, 50]));
        assert_eq!((event.src_port, event.dst_port), (40000, 443));
        assert_eq!(event.family, Family::Ipv4);
        assert_eq!(event.protocol, Protocol::Tcp);
        assert_eq!(&*event.comm, "curl");
        assert_eq!((event.pid, event.uid, event.cgroup_id), (1234, 1000, 42));
        assert_eq!(event.time, SystemTime::UNIX_EPOCH + Duration::from_secs(5));
    }

    #[test]
    fn a_translated_source_is_decoded_as_wire_src() {
        let mut translated = record(AF_INET, IPPROTO_UDP);
        translated.wire_src_addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        translated.flags = RecordFlags::TRANSLATED;
        let KernelEvent::Connect(event) =
            decode(&as_bytes(&translated), BootClock::now().unwrap()).unwrap();
        assert_eq!(event.src, IpAddr::from([203, 0, 113, 11]));
        assert_eq!(event.wire_src, Some(IpAddr::from([192, 0, 2, 7])));
    }

    #[test]
    fn malformed_records_are_errors() {
        let clock = BootClock::now().unwrap();
        let bytes = as_bytes(&record(AF_INET, IPPROTO_TCP));
        assert_eq!(
            decode(&bytes[..20], clock).unwrap_err(),
            DecodeError::Short {
                len: 20,
                expected: size_of::<ConnectRecord>()
            }
        );
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert_eq!(
            decode(&unknown, clock).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
        assert_eq!(
            decode(&as_bytes(&record(7, IPPROTO_TCP)), clock).unwrap_err(),
            DecodeError::UnknownFamily(7)
        );
        assert_eq!(
            decode(&as_bytes(&record(AF_INET, 1)), clock).unwrap_err(),
            DecodeError::UnknownProtocol(1)
        );
    }
}
