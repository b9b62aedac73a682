//! Folding repeats of a violation in the kernel.
//!
//! The first violation of a [`FoldKey`] is recorded at once and opens a window (`FOLDS` entry,
//! `RecordFlags::FOLD_WINDOW` on its record). Repeats within the window only count in the
//! entry: no record, no wakeup. When the window has closed, user space reads the entry,
//! writes one `violation` with the repeats' `count`, and deletes the entry; the kernel
//! never changes an entry whose window has closed, so reading and deleting cannot race with
//! it. A repeat that arrives after the window closed but before user space deleted the
//! entry, or when `FOLDS` is full, is recorded like a first one, unfolded: nothing is lost.

/// `FoldKey::rule` of a violation no rule matched (`unmatched = "alert"`).
pub const NO_RULE: u32 = u32::MAX;

/// What makes two violations the same: rule, protocol, source (the socket's and the wire's),
/// destination, destination port and cgroup (the source port differs from connection to
/// connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub rule: u32,
    pub protocol: u8,
    pub family: u8,
    pub dst_port: u16,
    pub cgroup_id: u64,
    /// Addresses in the record layout.
    pub src: [u8; 16],
    pub wire_src: [u8; 16],
    pub dst: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<FoldKey>() == 64);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldState {
    /// `CLOCK_BOOTTIME` of the violation that opened the window.
    pub first_ns: u64,
    /// Repeats folded into this window (atomically incremented).
    pub repeats: u64,
    /// Times of the first and last repeat; zero while there is none.
    pub first_repeat_ns: u64,
    pub last_repeat_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FoldState>() == 32);

/// Capacity of `FOLDS` unless `run --fold-table-size` says otherwise.
pub const DEFAULT_FOLD_ENTRIES: u32 = 16384;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit widths and no padding (sizes asserted above).
    unsafe impl aya::Pod for super::FoldKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FoldState {}
}
