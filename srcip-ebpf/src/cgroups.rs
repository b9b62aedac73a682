//! Audited cgroups that are removed and created again: systemd gives a unit a new cgroup
//! directory, and so a new id, on every restart. The kernel's `cgroup:cgroup_mkdir`
//! tracepoint runs in `mkdir` itself, before any process can be moved into the new cgroup,
//! so a new instance of an audited path is in `AUDITED_CGROUPS` before its first socket: no
//! window in which its sockets go unaudited. `cgroup_rmdir` takes the removed instance out,
//! so that a unit restarted in a loop cannot fill the map.
//!
//! The tracepoints' fields are stable UAPI-like offsets (`root` 8, `level` 12, `id` 16, the
//! path's `__data_loc` 24), the same on every kernel of the matrix; user space checks them
//! against the format files before it attaches (`srcip-userspace/src/loader.rs`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::bpf_probe_read_kernel_str,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use srcip_common::scope::{CGROUP_PATH_BYTES, CGROUP2_HIERARCHY, CgroupPath, MAX_AUDITED_CGROUPS};

use crate::maps::AUDITED_CGROUPS;

/// The audited cgroups' paths from the hierarchy's root, written by user space.
#[map]
static AUDITED_CGROUP_PATHS: HashMap<CgroupPath, u8> =
    HashMap::with_max_entries(MAX_AUDITED_CGROUPS, 0);

/// This CPU's room for the path of the cgroup being made or removed: more than a program's
/// stack may hold next to the rest.
#[map]
static PATH_SCRATCH: PerCpuArray<CgroupPath> = PerCpuArray::with_max_entries(1, 0);

/// Field offsets of the `cgroup` tracepoint class.
const ROOT_OFFSET: usize = 8;
const ID_OFFSET: usize = 16;
const PATH_OFFSET: usize = 24;

#[tracepoint]
pub fn srcip_cgroup_mkdir(ctx: TracePointContext) -> u32 {
    if let Some(id) = audited_cgroup(&ctx) {
        // A full map leaves the new instance to user space's look, which says so.
        let _ = AUDITED_CGROUPS.insert(&id, &0, 0);
    }
    0
}

#[tracepoint]
pub fn srcip_cgroup_rmdir(ctx: TracePointContext) -> u32 {
    if let Some(id) = audited_cgroup(&ctx) {
        let _ = AUDITED_CGROUPS.remove(&id);
    }
    0
}

/// The id of the cgroup v2 directory the event is about, when its path is audited.
#[inline(always)]
fn audited_cgroup(ctx: &TracePointContext) -> Option<u64> {
    // SAFETY: offsets inside the tracepoint's record, read through the probe helper.
    let root: i32 = unsafe { ctx.read_at(ROOT_OFFSET) }.ok()?;
    if root != CGROUP2_HIERARCHY {
        return None;
    }
    // SAFETY: as above.
    let (id, location): (u64, u32) =
        unsafe { (ctx.read_at(ID_OFFSET).ok()?, ctx.read_at(PATH_OFFSET).ok()?) };
    let path = PATH_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU value, used by one program run at a time on its CPU. Zeroed first:
    // the helper writes the string and its NUL only, and the key is compared whole.
    unsafe {
        let words = path.cast::<u64>();
        for word in 0..CGROUP_PATH_BYTES / 8 {
            words.add(word).write(0);
        }
        // The low half of a `__data_loc` is the string's offset in the record.
        let string = ctx.as_ptr().cast::<u8>().add((location & 0xffff) as usize);
        // A path too long to fit is cut, and then matches no audited path.
        if bpf_probe_read_kernel_str(path.cast(), CGROUP_PATH_BYTES as u32, string.cast()) < 0 {
            return None;
        }
        AUDITED_CGROUP_PATHS.get(&*path)?;
    }
    Some(id)
}
