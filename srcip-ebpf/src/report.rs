//! From a connection with its socket's owner to what user space gets: nothing (compliant),
//! a count (a folded repeat), or a record. Shared by every hook that sees a final source, and
//! by the connect and sendmsg hooks for what they refuse (with a bound or predicted source).

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use srcip_common::{
    fold::{FoldKey, NO_RULE},
    owner::{OWNER_PIN_ERRORS, OWNER_PINNED, SocketOwner},
    record::{ConnectRecord, Counter, IPPROTO_TCP, RecordFlags, RecordHeader, RecordKind},
};

use crate::{
    fold::{self, Fold},
    maps::{count, submit},
    policy::{self, Connection, Delivery, blocks, delivery, reports_all},
};

/// Decides `connection` against the policy, folds a repeated violation, and records what user
/// space must see. Returns whether a `block` rule refuses it: the caller stops its packet,
/// and the record says so. `connection.src` is the source on the wire, which the policy judges;
/// `socket_src` the one the kernel chose for the socket (the same unless this host translated
/// it), and `src_port` the socket's port. `uid` gives the socket's user, asked only for a
/// connection that is recorded. Inlined, like the functions it calls, so
/// that the caller's frame and its own share one stack: the verifier allows 512 bytes for
/// the whole call chain, and 5.10 counts each frame at its largest.
#[inline(always)]
pub fn report(
    owner: &SocketOwner,
    connection: &Connection,
    socket_src: &[u8; 16],
    src_port: u16,
    uid: impl FnOnce() -> u32,
) -> bool {
    let delivery = delivery(connection, owner.flags & OWNER_PINNED != 0);
    let blocked = matches!(delivery, Delivery::Violation { rule } if blocks(rule));
    let mut flags = owner.flags & OWNER_PIN_ERRORS;
    if blocked {
        flags |= RecordFlags::REFUSED | RecordFlags::AT_EGRESS;
    }
    record(
        owner, connection, socket_src, src_port, delivery, flags, uid,
    );
    blocked
}

/// `report` for a connection already decided (`delivery`), with `RecordFlags` the caller
/// knows (`REFUSED`). The user is not in the owner: `bpf_get_current_uid_gid` at each
/// socket's creation cost compliant connections about a twentieth of the time srcip added
/// to them (docs/BENCHMARKS.md), so it is asked (`uid`) only for a connection user space
/// sees.
#[inline(always)]
pub fn record(
    owner: &SocketOwner,
    connection: &Connection,
    socket_src: &[u8; 16],
    src_port: u16,
    delivery: Delivery,
    mut flags: u32,
    uid: impl FnOnce() -> u32,
) {
    let tcp = connection.protocol == IPPROTO_TCP;
    count(if tcp {
        Counter::ObservedTcp
    } else {
        Counter::ObservedUdp
    });
    if matches!(delivery, Delivery::Skip) {
        count(if tcp {
            Counter::DecidedInKernelTcp
        } else {
            Counter::DecidedInKernelUdp
        });
        return;
    }
    // Read only for what user space sees: a helper call costs compliant traffic tens of
    // nanoseconds on some kernels (docs/BENCHMARKS.md).
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if socket_src != connection.src {
        flags |= RecordFlags::TRANSLATED;
    }
    let mut open_window = false;
    let rule = match delivery {
        // Returned above.
        Delivery::Skip => return,
        // With `--all` every connection gets its own line, so nothing is folded.
        Delivery::Violation { rule } if !reports_all() => {
            match fold::repeat(&fold_key(owner, connection, socket_src, rule), now) {
                Fold::Folded => {
                    count(Counter::Folded);
                    return;
                }
                Fold::NoWindow => open_window = true,
                Fold::Unfolded => {}
            }
            rule
        }
        Delivery::Pinned { rule } => {
            flags |= RecordFlags::PINNED;
            rule
        }
        Delivery::Violation { rule } | Delivery::Quiet { rule } => rule,
        Delivery::Undecided => NO_RULE,
    };
    flags |= delivery.decided_flag();
    // One value with the rule: the stack has no room for another (docs/design.md).
    let rule_and_generation = u64::from(rule) | (u64::from(policy::generation()) << 32);
    // SAFETY (each write): `record` points at a reserved ring-buffer slot of a whole
    // `ConnectRecord`; every field is written, none is read.
    let urgent = !matches!(delivery, Delivery::Quiet { .. } | Delivery::Pinned { .. });
    submit::<ConnectRecord>(urgent, |record| unsafe {
        // The record has its room: a window opened now is flushed when it closes.
        // The key is made again rather than kept: the stack has no room for two.
        if open_window
            && fold::open(
                &fold_key(owner, connection, socket_src, rule_and_generation as u32),
                now,
            )
        {
            flags |= RecordFlags::FOLD_WINDOW;
        }
        (&raw mut (*record).header).write(RecordHeader {
            kind: RecordKind::Connect as u32,
            len: size_of::<ConnectRecord>() as u32,
            boot_time_ns: now,
        });
        (&raw mut (*record).cgroup_id).write(owner.cgroup_id);
        (&raw mut (*record).netns_cookie).write(owner.netns_cookie);
        (&raw mut (*record).src_addr).write(*socket_src);
        (&raw mut (*record).wire_src_addr).write(*connection.src);
        (&raw mut (*record).dst_addr).write(*connection.dst);
        (&raw mut (*record).pid).write(owner.pid);
        (&raw mut (*record).uid).write(uid());
        (&raw mut (*record).src_port).write(src_port);
        (&raw mut (*record).dst_port).write(connection.dst_port);
        (&raw mut (*record).family).write(connection.family);
        (&raw mut (*record).protocol).write(connection.protocol);
        (&raw mut (*record).reserved).write([0; 2]);
        (&raw mut (*record).comm).write(owner.comm);
        (&raw mut (*record).rule).write(rule_and_generation as u32);
        (&raw mut (*record).flags).write(flags);
        (&raw mut (*record).mark).write(connection.mark);
        (&raw mut (*record).generation).write((rule_and_generation >> 32) as u32);
    });
}

/// The folding key of a violation of `rule`: what makes two violations the same one.
#[inline(always)]
fn fold_key(
    owner: &SocketOwner,
    connection: &Connection,
    socket_src: &[u8; 16],
    rule: u32,
) -> FoldKey {
    FoldKey {
        rule,
        protocol: connection.protocol,
        family: connection.family,
        dst_port: connection.dst_port,
        cgroup_id: owner.cgroup_id,
        src: *socket_src,
        wire_src: *connection.src,
        dst: *connection.dst,
    }
}
