//! Addresses read from the kernel's socket and context structures, in the record layout
//! (network order, IPv4 in the first 4 bytes), for the connect and sendmsg hooks. (The egress
//! program keeps its own register-level read of the socket's source: it is near the
//! verifier's stack limit, `egress.rs`.)
//!
//! Each word is loaded on its own, at a constant offset (the verifier allows no pointer
//! arithmetic on a socket or a context), stored, and read back from the stack before it is
//! tested (`stored`).

use aya_ebpf::bindings::bpf_sock;
use srcip_common::record::AF_INET;

/// The address the socket holds as its source, for a connection of `family` (an IPv6 socket
/// going to an IPv4 destination holds `::ffff:a.b.c.d`), in the record layout; `None` when it
/// holds none: at `connect()`, one the program bound; once connected, the kernel's choice.
#[inline(always)]
pub fn socket_source(socket: &bpf_sock, family: u8) -> Option<[u8; 16]> {
    let src = if socket.family == u32::from(AF_INET) {
        address_v4(read(&socket.src_ip4))
    } else {
        let bound = read_v6(&socket.src_ip6);
        match family {
            AF_INET => mapped_v4(&bound).unwrap_or([0; 16]),
            _ => bound,
        }
    };
    nonzero(src)
}

/// An IPv6 address held as four words (network order) in a socket or context, each read on
/// its own, in the record layout.
#[inline(always)]
pub fn read_v6(words: &[u32; 4]) -> [u8; 16] {
    address_v6([
        read(&words[0]),
        read(&words[1]),
        read(&words[2]),
        read(&words[3]),
    ])
}

/// `address`, unless it is all zero (no address).
#[inline(always)]
pub fn nonzero(address: [u8; 16]) -> Option<[u8; 16]> {
    (address != [0; 16]).then_some(address)
}

/// An IPv4 address word (network order) in the record layout.
#[inline(always)]
pub fn address_v4(word: u32) -> [u8; 16] {
    let mut address = [0; 16];
    address[..4].copy_from_slice(&word.to_ne_bytes());
    stored(&address)
}

/// An IPv6 address's four words (network order) in the record layout.
#[inline(always)]
fn address_v6(words: [u32; 4]) -> [u8; 16] {
    let mut address = [0; 16];
    for (index, word) in words.iter().enumerate() {
        address[index * 4..index * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    stored(&address)
}

/// The bytes as stored, read back from the stack, so that every test of the address is made
/// on them and not on the registers they came from: before 6.12 the kernel's rewrite of a
/// context load (`msg_src_ip6` was seen on 5.10 and 6.1) can leave the upper half of the
/// register set, and a comparison of whole registers then saw a source where there was none.
#[inline(always)]
pub fn stored(address: &[u8; 16]) -> [u8; 16] {
    // SAFETY: a reference to an initialised array on this program's stack.
    unsafe { core::ptr::read_volatile(address) }
}

/// The IPv4 address an IPv4-mapped one (`::ffff:a.b.c.d`) carries, in the record layout.
#[inline(always)]
pub fn mapped_v4(address: &[u8; 16]) -> Option<[u8; 16]> {
    let prefix = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    if address[..12] != prefix {
        return None;
    }
    let mut v4 = [0; 16];
    v4[..4].copy_from_slice(&address[12..]);
    Some(v4)
}

/// One word of the socket or the context, loaded as a word: the verifier allows no pointer
/// arithmetic on either, which a copy of their bytes would need.
#[inline(always)]
pub fn read(field: &u32) -> u32 {
    // SAFETY: a field of the socket or context the kernel gave this program, readable for its
    // run.
    unsafe { core::ptr::read_volatile(field) }
}
