//! From a connection with its socket's owner to what user space gets: nothing (compliant),
//! a count (a folded repeat), or a record. Shared by every hook that sees a final source.

use aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns;
use srcip_common::{
    fold::{FoldKey, NO_RULE},
    owner::SocketOwner,
    record::{ConnectRecord, Counter, RecordFlags, RecordHeader, RecordKind},
};

use crate::{
    fold::{Fold, fold},
    maps::{count, submit},
    policy::{Connection, Delivery, delivery, reports_all},
};

/// Decides `connection` (from source port `src_port`) against the policy, folds a repeated
/// violation, and records what user space must see. Inlined, like the functions it calls, so
/// that the caller's frame and its own share one stack: the verifier allows 512 bytes for
/// the whole call chain, and 5.10 counts each frame at its largest.
#[inline(always)]
pub fn report(owner: &SocketOwner, connection: &Connection, src_port: u16) {
    let delivery = delivery(connection);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut flags = 0;
    let rule = match delivery {
        Delivery::Skip => {
            count(Counter::DecidedInKernel);
            return;
        }
        // With `--all` every connection gets its own line, so nothing is folded.
        Delivery::Violation { rule } if !reports_all() => {
            let key = FoldKey {
                rule,
                protocol: connection.protocol,
                family: connection.family,
                dst_port: connection.dst_port,
                cgroup_id: owner.cgroup_id,
                src: *connection.src,
                dst: *connection.dst,
            };
            match fold(&key, now) {
                Fold::Folded => {
                    count(Counter::Folded);
                    return;
                }
                Fold::OpenedWindow => flags |= RecordFlags::FOLD_WINDOW,
                Fold::Unfolded => {}
            }
            rule
        }
        Delivery::Violation { rule } => rule,
        Delivery::Undecided | Delivery::Quiet => NO_RULE,
    };
    let record = ConnectRecord {
        header: RecordHeader {
            kind: RecordKind::Connect as u32,
            len: size_of::<ConnectRecord>() as u32,
            boot_time_ns: now,
        },
        cgroup_id: owner.cgroup_id,
        netns_cookie: owner.netns_cookie,
        src_addr: *connection.src,
        dst_addr: *connection.dst,
        pid: owner.pid,
        uid: owner.uid,
        src_port,
        dst_port: connection.dst_port,
        family: connection.family,
        protocol: connection.protocol,
        reserved: [0; 2],
        comm: owner.comm,
        rule,
        flags,
    };
    submit(&record, delivery != Delivery::Quiet);
}
