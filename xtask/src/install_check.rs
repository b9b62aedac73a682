//! `cargo xtask install-check` (and `cargo xtask test`, after the host's tests): the package
//! on a fresh Debian 12, made from Debian's own
//! packages with debootstrap (minbase, plus man-db and systemd, which a server has).
//!
//! The base system is built once and cached; each check copies it, installs the package
//! with `dpkg -i`, and runs what an operator runs first: `srcip --version`, `man srcip`
//! (with the policy format, exit status and files), the changelog, `srcip policy validate
//! /etc/srcip/policy.toml` and `systemd-analyze verify` on the unit; then purges it, which
//! must keep the alert logs.
//! Everything runs in a mount namespace of its own (`unshare`), so the /proc mounted for
//! the chroot vanishes with it, and the copy is removed afterwards, also on failure.
//!
//! The arm64 package is checked on the same Debian made multiarch (`dpkg
//! --add-architecture arm64`, Debian's arm64 C library; cached too): `dpkg -i` installs it
//! as it would on an arm64 host, and its binary runs under qemu's user-mode emulator
//! (`qemu-aarch64-static`, copied into the system): `--version` and `policy validate`.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{exec, kernels, output_of, package::Arch, step};

/// The Debian release whose fresh install the package must work on.
const SUITE: &str = "bookworm";

/// Checks the package `deb`, built for `arch`.
pub fn run(deb: &Path, arch: Arch) -> anyhow::Result<()> {
    let base = match arch {
        Arch::Amd64 => ensure_base()?,
        Arch::Arm64 => ensure_arm64_base()?,
    };
    // The arm64 binary runs through the emulator; everything else is the same.
    let srcip = match arch {
        Arch::Amd64 => "srcip",
        Arch::Arm64 => "qemu-aarch64-static /usr/bin/srcip",
    };
    let fresh = tempfile::Builder::new()
        .prefix("srcip-install-check-")
        .tempdir()
        .context("a folder for the fresh system")?;
    let root = fresh.path().join("root");
    step("copying the fresh Debian system");
    exec(Command::new("cp").arg("-a").arg(&base).arg(&root))?;
    std::fs::copy(deb, root.join("tmp/srcip.deb")).context("copying the package in")?;
    let checks = [
        ("dpkg -i", "dpkg -i /tmp/srcip.deb"),
        ("srcip --version", &format!("{srcip} --version")),
        (
            "man srcip",
            "MANPAGER=cat MANWIDTH=100 man srcip > /tmp/srcip.txt && grep -q 'srcip-run(1)' /tmp/srcip.txt && grep -q '^POLICY FILE' /tmp/srcip.txt && grep -q 'allowed_sources = ' /tmp/srcip.txt && grep -q '^EXIT STATUS' /tmp/srcip.txt && grep -q '^FILES' /tmp/srcip.txt",
        ),
        (
            "the changelog",
            "test -s /usr/share/doc/srcip/changelog.Debian.gz",
        ),
        (
            "srcip policy validate",
            &format!("{srcip} policy validate /etc/srcip/policy.toml"),
        ),
        (
            "systemd-analyze verify",
            "systemd-analyze verify /usr/lib/systemd/system/srcip.service",
        ),
        (
            "dpkg --purge keeps the alert logs",
            "mkdir -p /var/lib/srcip/spool /var/log/srcip && echo '{}' > /var/log/srcip/alerts.json && dpkg --purge srcip && test -f /var/log/srcip/alerts.json && ! test -e /var/lib/srcip",
        ),
    ];
    let arch = arch.debian();
    for (name, command) in checks {
        step(&format!("on a fresh Debian {SUITE} ({arch}): {name}"));
        let said = in_chroot(&root, command)
            .with_context(|| format!("{name} failed on a fresh Debian {SUITE} ({arch})"))?;
        if said.contains("srcip.service:") {
            bail!("{name} failed on a fresh Debian {SUITE} ({arch}):\n{said}");
        }
        for line in said.lines().filter(|line| !line.trim().is_empty()).take(3) {
            eprintln!("    {line}");
        }
    }
    step(&format!(
        "the {arch} package installs and works on a fresh Debian {SUITE}"
    ));
    Ok(())
}

/// Runs `command` with `/bin/sh -e` chrooted in `root`, with /proc, in a mount namespace
/// of its own; returns what it said, or fails with it.
fn in_chroot(root: &Path, command: &str) -> anyhow::Result<String> {
    let script = format!(
        "mount -t proc proc '{root}/proc' && chroot '{root}' /bin/sh -ec \"{command}\"",
        root = root.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .context("running unshare")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{said}");
    }
    Ok(said)
}

/// The cached base system made multiarch for the arm64 package: arm64 added to dpkg's
/// architectures, Debian's arm64 C library installed from the archive, and this machine's
/// `qemu-aarch64-static` (a static binary, see `setup::cross_tools`) copied in.
fn ensure_arm64_base() -> anyhow::Result<std::path::PathBuf> {
    let arm64 = kernels::cache_dir()?.join(format!("debian-{SUITE}-arm64"));
    if arm64.join("usr/bin/qemu-aarch64-static").exists() {
        step(&format!(
            "fresh Debian {SUITE} with arm64's C library: cached"
        ));
        return Ok(arm64);
    }
    let base = ensure_base()?;
    step(&format!(
        "fresh Debian {SUITE}: adding arm64 and its C library (once)"
    ));
    let building = arm64.with_extension("partial");
    let _ = std::fs::remove_dir_all(&building);
    exec(Command::new("cp").arg("-a").arg(&base).arg(&building))?;
    // Name servers as this machine has them now: the base may be older than them.
    std::fs::copy("/etc/resolv.conf", building.join("etc/resolv.conf"))
        .context("copying /etc/resolv.conf into the system")?;
    in_chroot(
        &building,
        "dpkg --add-architecture arm64 && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libc6:arm64 && apt-get clean",
    )
    .context("adding arm64 to the fresh Debian")?;
    std::fs::copy(
        "/usr/bin/qemu-aarch64-static",
        building.join("usr/bin/qemu-aarch64-static"),
    )
    .context("copying qemu-aarch64-static into the system (from qemu-user-static)")?;
    std::fs::rename(&building, &arm64).context("keeping the multiarch system")?;
    Ok(arm64)
}

/// The cached base system: debootstrap's minbase with man-db, procps and systemd.
fn ensure_base() -> anyhow::Result<std::path::PathBuf> {
    let base = kernels::cache_dir()?.join(format!("debian-{SUITE}"));
    if base.join("usr/bin/systemd-analyze").exists() {
        step(&format!("fresh Debian {SUITE}: cached"));
        return Ok(base);
    }
    if output_of(Command::new("sh").args(["-c", "command -v debootstrap"])).is_none() {
        step("debootstrap: installing with apt-get");
        exec(Command::new("apt-get").arg("update"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "debootstrap"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let archive = kernels::debian_archive()?;
    step(&format!(
        "fresh Debian {SUITE}: debootstrap from {archive} (a few minutes, once)"
    ));
    let building = base.with_extension("partial");
    let _ = std::fs::remove_dir_all(&building);
    exec(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=man-db,procps,systemd",
                SUITE,
            ])
            .arg(&building)
            .arg(&archive),
    )?;
    std::fs::rename(&building, &base).context("keeping the fresh system")?;
    Ok(base)
}
