//! Folding repeated violations in the kernel (see `srcip_common::fold`): a repeat within its
//! window costs a hash lookup and an atomic add, and wakes nobody.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::HashMap};
use srcip_common::fold::{FoldKey, FoldState};

/// Sized by the loader (`run --fold-table-size`); 1 is a placeholder.
#[map]
static FOLDS: HashMap<FoldKey, FoldState> = HashMap::with_max_entries(1, 0);

/// Set by the loader; zero turns folding off (and `--all` does, since it reports every
/// connection).
#[unsafe(no_mangle)]
static FOLD_WINDOW_NS: u64 = 0;

pub enum Fold {
    /// Counted in an open window: send nothing.
    Folded,
    /// No window for this key: send the record, and open one with [`open`] once the record
    /// has its room in the ring buffer, so that no window is opened whose first record was
    /// lost (it would never be flushed, and the key never folded again).
    NoWindow,
    /// Not folded (folding off, or a closed window not yet flushed): send the record as it
    /// is.
    Unfolded,
}

/// Counts `key`'s violation in its open window, if it has one.
#[inline(always)]
pub fn repeat(key: &FoldKey, now: u64) -> Fold {
    // SAFETY: a global set by the loader; volatile keeps the default from being folded in.
    let window = unsafe { core::ptr::read_volatile(&FOLD_WINDOW_NS) };
    if window == 0 {
        return Fold::Unfolded;
    }
    let Some(state) = FOLDS.get_ptr_mut(key) else {
        return Fold::NoWindow;
    };
    // SAFETY: a map value pointer stays valid for this program run; concurrent programs on
    // other CPUs only add to `repeats` atomically and store whole timestamps.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.first_ns) >= window {
        return Fold::Unfolded;
    }
    // SAFETY: `repeats` is an aligned u64 inside the map value. The BPF target has no
    // `AtomicU64::fetch_add`; with its result unused this intrinsic compiles to the plain
    // atomic add (`BPF_XADD`) that every supported kernel's verifier knows.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut state.repeats, 1);
    }
    if state.first_repeat_ns == 0 {
        state.first_repeat_ns = now;
    }
    state.last_repeat_ns = now;
    Fold::Folded
}

/// Opens `key`'s window at `now`; false when the table is full or another CPU opened it
/// first (that CPU's record flushes it; this one goes as it is).
#[inline(always)]
pub fn open(key: &FoldKey, now: u64) -> bool {
    let opened = FoldState {
        first_ns: now,
        ..FoldState::default()
    };
    FOLDS.insert(key, &opened, BPF_NOEXIST.into()).is_ok()
}
