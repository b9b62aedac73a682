//! srcip's kernel side. This file only wires the modules; each hook family has its own.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no 64-bit atomic read-modify-write types (fold.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod address;
mod cgroups;
mod connect;
mod egress;
mod fold;
mod maps;
mod owner;
mod policy;
mod report;
mod scope;
mod udp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible licence: the ring-buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
