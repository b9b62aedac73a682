//! An empty library target, so that `srcip-userspace` can name this crate as a build
//! dependency (cargo then rebuilds the user side when the kernel side changes). The programs
//! are in the `srcip` binary target, built for `bpfel-unknown-none` by aya-build.
#![no_std]
