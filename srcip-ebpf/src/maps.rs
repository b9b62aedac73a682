//! Maps shared by every hook, and the two ways a hook hands something to user space.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use srcip_common::{
    policy::{Candidates, KernelRule, PinSource, PolicyState, PredictedSource},
    record::{COUNTER_COUNT, Counter, EVENTS_RING_BYTES},
    scope::MAX_AUDITED_CGROUPS,
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Unread bytes in `EVENTS` above which every record wakes the reader: half the buffer,
/// set by the loader with the size it gives `EVENTS` (`--ring-buffer-size`).
#[unsafe(no_mangle)]
static EVENTS_WAKEUP_BYTES: u64 = EVENTS_RING_BYTES as u64 / 2;

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// The compiled policy, see `srcip_common::policy`. User space sizes these at load to fit
/// the policy; 1 is a placeholder.
#[map]
pub static V4_DESTINATIONS_EVEN: LpmTrie<[u8; 4], Candidates> = LpmTrie::with_max_entries(1, 0);

#[map]
pub static V4_DESTINATIONS_ODD: LpmTrie<[u8; 4], Candidates> = LpmTrie::with_max_entries(1, 0);

#[map]
pub static V6_DESTINATIONS_EVEN: LpmTrie<[u8; 16], Candidates> = LpmTrie::with_max_entries(1, 0);

#[map]
pub static V6_DESTINATIONS_ODD: LpmTrie<[u8; 16], Candidates> = LpmTrie::with_max_entries(1, 0);

#[map]
pub static RULES: Array<KernelRule> = Array::with_max_entries(1, 0);

#[map]
pub static POLICY_STATE: Array<PolicyState> = Array::with_max_entries(1, 0);

/// The sources the kernel is predicted to choose for blocking rules' destinations, see
/// `srcip_common::policy::PredictedSource`; sized by user space like the destination tries.
#[map]
pub static PREDICTED_V4_SOURCES: LpmTrie<[u8; 4], PredictedSource> =
    LpmTrie::with_max_entries(1, 0);

/// Pin sources the host has, with the namespace it has them in; see
/// `srcip_common::policy::PinSource`.
#[map]
pub static PRESENT_PIN_SOURCES: HashMap<PinSource, u64> = HashMap::with_max_entries(1, 0);

#[map]
pub static PREDICTED_V6_SOURCES: LpmTrie<[u8; 16], PredictedSource> =
    LpmTrie::with_max_entries(1, 0);

/// Audited cgroup id → unused byte; see `srcip_common::scope`.
#[map]
pub static AUDITED_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_AUDITED_CGROUPS, 0);

pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and BPF programs are not
        // preempted by another program on the same CPU for this map's hooks.
        unsafe { *value += 1 };
    }
}

/// Reserves room for a `T` in the ring buffer and has `fill` write it there, then submits
/// it; counts it as lost when the buffer is full. The record is written in place, never on
/// the stack: the verifier allows 512 bytes of stack for the whole call chain, and 5.10
/// counts each frame at its largest. `fill` must write every field.
///
/// Waking the reader costs the connecting task several microseconds, so only `urgent`
/// records (violations) wake it; the others wait for user space's next poll, unless the
/// buffer is half full, so that a burst cannot overflow it between two polls.
#[inline(always)]
pub fn submit<T: 'static>(urgent: bool, fill: impl FnOnce(*mut T)) {
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    let threshold = unsafe { core::ptr::read_volatile(&EVENTS_WAKEUP_BYTES) };
    let flags = if urgent || EVENTS.query(BPF_RB_AVAIL_DATA.into()) > threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            fill(entry.as_mut_ptr());
            entry.submit(flags.into());
        }
        None => count(Counter::LostRecords),
    }
}
