use which::which;

/// The eBPF object is linked by `bpf-linker`, which cargo does not know about: rebuild when
/// the linker binary changes (for example after `cargo xtask setup` rebuilt it).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker is not on PATH: run `cargo xtask setup` to build and install it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
