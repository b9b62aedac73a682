//! The `--cgroup` filter, evaluated before any record is built so that unaudited traffic
//! costs user space nothing. See `srcip_common::scope` for the map layout.

use aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id;
use srcip_common::scope::MAX_CGROUP_LEVEL;

use crate::maps::AUDITED_CGROUPS;

/// Bit `n` set: some audited cgroup is at depth `n`. Zero: audit every process. User space
/// sets it at load time, so the verifier sees a constant.
#[unsafe(no_mangle)]
static AUDITED_CGROUP_LEVELS: u64 = 0;

/// Whether the task on this CPU is in an audited cgroup or below one. Only meaningful in
/// hooks that run in the connecting task's context.
pub fn current_task_is_audited() -> bool {
    // SAFETY: a global set by the loader; the volatile read keeps the compiler from folding
    // the default value in.
    let levels = unsafe { core::ptr::read_volatile(&AUDITED_CGROUP_LEVELS) };
    if levels == 0 {
        return true;
    }
    for level in 0..=MAX_CGROUP_LEVEL {
        if levels & (1 << level) == 0 {
            continue;
        }
        // SAFETY: a helper call with a plain integer argument.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if AUDITED_CGROUPS.get_ptr(ancestor).is_some() {
            return true;
        }
    }
    false
}
