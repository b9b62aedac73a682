//! `cargo xtask package [--arch arm64]`: `target/debian/srcip_VERSION_ARCH.deb`.
//!
//! The arm64 package is cross-compiled on this x86-64 machine with Debian's cross toolchain
//! (`gcc-aarch64-linux-gnu` links, `aarch64-linux-gnu-strip` strips); its eBPF object is
//! the same as amd64's (BPF bytecode, built for `bpfel-unknown-none`). Its man pages and
//! completions are written by the host's build of the same source.
//!
//! Built with dpkg-deb, Debian's own tool, from a tree staged here: the binary, the
//! systemd unit, the example policy (a conffile), the man pages and completions that the
//! built `srcip` writes itself, and the reference. dpkg-deb rather than cargo-deb: it is on
//! every Debian machine already, and cargo-deb would be a crate tree to build in CI for the
//! same few files.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{build_release, cargo, exec, setup, step, workspace_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The architectures srcip is packaged for, by their Debian names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn debian(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// The built binary: the host's release build, or the cross-compiled one.
    fn binary(self) -> PathBuf {
        let target = match self {
            Self::Amd64 => "target/release/srcip",
            Self::Arm64 => "target/aarch64-unknown-linux-gnu/release/srcip",
        };
        workspace_root().join(target)
    }

    fn strip(self) -> &'static str {
        match self {
            Self::Amd64 => "strip",
            Self::Arm64 => "aarch64-linux-gnu-strip",
        }
    }
}

/// Builds the package for `arch`; returns its path. The host's build is made in any case:
/// it writes the man pages and completions.
pub fn run(arch: Arch) -> anyhow::Result<PathBuf> {
    build_release()?;
    if arch == Arch::Arm64 {
        build_arm64()?;
    }
    let root = workspace_root();
    let srcip = root.join("target/release/srcip");
    let debian = root.join("target/debian");
    let stage = debian.join(format!("stage-{}", arch.debian()));
    if stage.exists() {
        fs::remove_dir_all(&stage).context("clearing the previous package tree")?;
    }
    step(&format!("staging the {} package tree", arch.debian()));
    let packaging = root.join("packaging");
    install(&arch.binary(), &stage.join("usr/bin/srcip"), 0o755)?;
    // Symbols and debug information are dropped: a third of the binary's size, and nothing
    // an operator's host needs (the eBPF programs inside are data, untouched).
    exec(
        Command::new(arch.strip())
            .arg("--strip-unneeded")
            .arg(stage.join("usr/bin/srcip")),
    )?;
    install(
        &packaging.join("srcip.service"),
        &stage.join("usr/lib/systemd/system/srcip.service"),
        0o644,
    )?;
    install(
        &packaging.join("policy.toml"),
        &stage.join("etc/srcip/policy.toml"),
        0o644,
    )?;
    install(
        &packaging.join("default"),
        &stage.join("etc/default/srcip"),
        0o644,
    )?;

    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    exec(Command::new(&srcip).arg("manpages").arg(&man))?;
    for shell in ["bash", "zsh", "fish"] {
        let target = match shell {
            "bash" => "usr/share/bash-completion/completions/srcip",
            "zsh" => "usr/share/zsh/vendor-completions/_srcip",
            _ => "usr/share/fish/vendor_completions.d/srcip.fish",
        };
        let output = Command::new(&srcip)
            .args(["completions", shell])
            .output()
            .context("running srcip completions")?;
        if !output.status.success() {
            bail!("srcip completions {shell} failed");
        }
        write(&stage.join(target), &output.stdout, 0o644)?;
    }
    let doc = stage.join("usr/share/doc/srcip");
    install(
        &root.join("docs/reference.md"),
        &doc.join("reference.md"),
        0o644,
    )?;
    install(&root.join("README.md"), &doc.join("README.md"), 0o644)?;
    write(&doc.join("copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    install(
        &packaging.join("changelog"),
        &doc.join("changelog.Debian"),
        0o644,
    )?;
    // Debian compresses manuals and documentation, reproducibly (-n: no name or time).
    let mut compressed: Vec<PathBuf> = fs::read_dir(&man)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    compressed.extend([
        doc.join("reference.md"),
        doc.join("README.md"),
        doc.join("changelog.Debian"),
    ]);
    exec(Command::new("gzip").arg("-9n").args(&compressed))?;

    let control = stage.join("DEBIAN");
    write(
        &control.join("control"),
        control_file(arch, installed_kib(&stage)?).as_bytes(),
        0o644,
    )?;
    write(
        &control.join("conffiles"),
        b"/etc/srcip/policy.toml\n/etc/default/srcip\n",
        0o644,
    )?;
    write(&control.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write(&control.join("prerm"), PRERM.as_bytes(), 0o755)?;
    write(&control.join("postrm"), POSTRM.as_bytes(), 0o755)?;

    let deb = debian.join(format!("srcip_{VERSION}_{}.deb", arch.debian()));
    step(&format!("building {}", deb.display()));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Cross-compiles srcip for arm64 (the cross toolchain installed first, see `setup.rs`).
fn build_arm64() -> anyhow::Result<()> {
    setup::cross_tools()?;
    step("building srcip for arm64 (release, cross-compiled)");
    exec(
        Command::new(cargo())
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--package",
                "srcip-userspace",
                "--bin",
                "srcip",
            ])
            .args(["--target", "aarch64-unknown-linux-gnu"])
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            ),
    )
}

fn control_file(arch: Arch, installed_kib: u64) -> String {
    format!(
        "Package: srcip\n\
         Version: {VERSION}\n\
         Architecture: {}\n\
         Maintainer: srcip developers <srcip@users.noreply.github.com>\n\
         Depends: libc6 (>= 2.34)\n\
         Section: net\n\
         Priority: optional\n\
         Installed-Size: {installed_kib}\n\
         Description: audit the source address of every outbound connection\n \
         On a host with several IP addresses the kernel picks the source address of an\n \
         outbound connection, and that choice can change after a reboot or a network\n \
         restart. srcip records with eBPF the source the kernel really chose, with the\n \
         process, cgroup and systemd unit that connected, checks it against an allow-list\n \
         per destination, and alerts to stdout, files, syslog, NATS JetStream or a webhook.\n",
        arch.debian()
    )
}

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: srcip\n\n\
Files: *\n\
License: MIT or Apache-2.0; the eBPF programs inside the binary: MIT or GPL-2.0\n";

/// Debian's own services are enabled when installed; srcip is not: its example policy
/// names no destination, so the operator writes one first (see the README's Install).
const POSTINST: &str = "#!/bin/sh\nset -e\n\
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then\n\
    systemctl daemon-reload >/dev/null || true\n\
fi\n";

const PRERM: &str = "#!/bin/sh\nset -e\n\
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then\n\
    systemctl stop srcip.service >/dev/null 2>&1 || true\n\
fi\n";

/// Purge removes srcip's state and spool, and keeps the alert history an operator's own
/// sinks wrote (`file:/var/log/srcip/...`): an audit trail is not the package's to delete.
const POSTRM: &str = "#!/bin/sh\nset -e\n\
if [ \"$1\" = purge ]; then\n\
    rm -rf /var/lib/srcip\n\
    if [ -d /var/log/srcip ]; then\n\
        echo \"srcip: the alert logs in /var/log/srcip are kept; remove them when they are no longer needed\"\n\
    fi\n\
fi\n\
if [ -d /run/systemd/system ]; then\n\
    systemctl daemon-reload >/dev/null || true\n\
fi\n";

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &bytes, mode)
}

fn write(to: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(folder) = to.parent() {
        fs::create_dir_all(folder)?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What `Installed-Size` counts: the staged files, in KiB.
fn installed_kib(stage: &Path) -> anyhow::Result<u64> {
    fn walk(folder: &Path) -> std::io::Result<u64> {
        let mut bytes = 0;
        for entry in fs::read_dir(folder)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                bytes += walk(&entry.path())?;
            } else {
                bytes += entry.metadata()?.len();
            }
        }
        Ok(bytes)
    }
    Ok(walk(stage)?.div_ceil(1024))
}
