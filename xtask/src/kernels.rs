//! The kernels of the test matrix and the tools that boot them, installed and cached on
//! first use.
//!
//! Kernels are Debian's own generic `-amd64-unsigned` packages (the `cloud` flavour lacks the
//! 9p module that the VM's root file system needs), fetched with `apt-get download` through
//! a private sources list and private state folders: the machine's own apt configuration is
//! never changed. The archive is the one the machine's apt already uses.

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};

use crate::{exec, home_folder, output_of, step};

/// A kernel series of the matrix: the Debian release that carries it and the long-term
/// kernels it stands for.
pub struct Series {
    pub version: &'static str,
    suite: &'static str,
}

/// Debian 11, 12 and 13. 5.10 is the floor for RHEL 9 (5.14) and Ubuntu 22.04 (5.15); 6.1 is
/// also Amazon Linux 2023's.
pub const MATRIX: &[Series] = &[
    Series {
        version: "5.10",
        suite: "bullseye",
    },
    Series {
        version: "6.1",
        suite: "bookworm",
    },
    Series {
        version: "6.12",
        suite: "trixie",
    },
];

pub fn series(version: &str) -> anyhow::Result<&'static Series> {
    MATRIX
        .iter()
        .find(|series| series.version == version)
        .ok_or_else(|| {
            let known: Vec<_> = MATRIX.iter().map(|series| series.version).collect();
            anyhow!(
                "--kernel {version}: the matrix has {} (or `host`)",
                known.join(", ")
            )
        })
}

/// A kernel unpacked in the cache, ready to boot.
pub struct Kernel {
    pub series: &'static str,
    /// The release, as `uname -r` prints it in the VM.
    pub release: String,
    pub image: PathBuf,
}

/// Where kernels, apt state and virtme-ng live between runs: outside `target/`, so that a
/// `cargo clean` does not download them again.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    Ok(home_folder("XDG_CACHE_HOME", ".cache")?.join("srcip-vm"))
}

/// qemu, the module tools virtme-ng calls, busybox for its initramfs, and virtme-ng itself in
/// a virtual environment of its own. Returns the folder holding `vng`.
pub fn ensure_vm_tools() -> anyhow::Result<PathBuf> {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("depmod", "kmod"),
        ("busybox", "busybox-static"),
    ]
    .into_iter()
    .filter(|(command, _)| {
        output_of(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_none()
    })
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        step("qemu, kmod, busybox: present");
    } else {
        step(&format!("installing {} with apt-get", missing.join(", ")));
        exec(Command::new("apt-get").arg("update"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }

    let venv = cache_dir()?.join("venv");
    let bin = venv.join("bin");
    if output_of(Command::new(bin.join("vng")).arg("--version")).is_some() {
        step("virtme-ng: present");
        return Ok(bin);
    }
    step(&format!(
        "virtme-ng {VIRTME_NG_VERSION}: installing from PyPI into {}",
        venv.display()
    ));
    exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    exec(Command::new(bin.join("pip")).args([
        "install",
        "--quiet",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))?;
    Ok(bin)
}

/// The release that booted Debian's kernels here (TOOLCHAIN notes).
const VIRTME_NG_VERSION: &str = "1.42";

/// The newest generic kernel of each series, downloaded and unpacked once; Debian's package
/// lists are read at most once per call.
pub fn ensure_kernels(series: &[&'static Series]) -> anyhow::Result<Vec<Kernel>> {
    let mut apt = None;
    series
        .iter()
        .map(|series| ensure_kernel(series, &mut apt))
        .collect()
}

fn ensure_kernel(series: &'static Series, apt: &mut Option<PrivateApt>) -> anyhow::Result<Kernel> {
    let kernels = cache_dir()?.join("kernels");
    if let Some(kernel) = newest_unpacked(&kernels, series)? {
        step(&format!(
            "kernel {}: cached ({})",
            series.version, kernel.release
        ));
        return link_modules(kernel);
    }
    let apt = match apt {
        Some(apt) => apt,
        None => {
            let fresh = PrivateApt::new(&cache_dir()?.join("apt"))?;
            fresh.update()?;
            apt.insert(fresh)
        }
    };
    let package = apt.newest_generic_image(series)?;
    let archives = cache_dir()?.join("downloads");
    fs::create_dir_all(&archives)?;
    step(&format!("kernel {}: downloading {package}", series.version));
    exec(
        apt.command("apt-get")
            .arg("download")
            .args(["-o", "APT::Sandbox::User=root"])
            .arg(&package)
            .current_dir(&archives),
    )?;
    let deb = fs::read_dir(&archives)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
                })
        })
        .ok_or_else(|| {
            anyhow!(
                "apt-get download left no {package}_*.deb in {}",
                archives.display()
            )
        })?;
    let target = kernels.join(&package);
    // Unpack beside, then rename, so that an interrupted unpack is never taken for a kernel.
    let partial = kernels.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    exec(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &target)?;
    fs::remove_file(&deb)?;
    let kernel = newest_unpacked(&kernels, series)?
        .ok_or_else(|| anyhow!("{package} holds no boot/vmlinuz-{}*", series.version))?;
    link_modules(kernel)
}

fn newest_unpacked(kernels: &Path, series: &'static Series) -> anyhow::Result<Option<Kernel>> {
    let Ok(entries) = fs::read_dir(kernels) else {
        return Ok(None);
    };
    let mut found: Vec<Kernel> = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let boot = entry.path().join("boot");
        let Ok(images) = fs::read_dir(&boot) else {
            continue;
        };
        for image in images.filter_map(Result::ok) {
            let name = image.file_name().to_string_lossy().into_owned();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            if in_series(release, series.version) {
                found.push(Kernel {
                    series: series.version,
                    release: release.to_owned(),
                    image: image.path(),
                });
            }
        }
    }
    found.sort_by(|a, b| compare_versions(&a.release, &b.release));
    Ok(found.pop())
}

/// `6.1.0-50-amd64` is in 6.1, `6.12.117+deb13-amd64` in 6.12, and not the other way round.
fn in_series(release: &str, series: &str) -> bool {
    release
        .strip_prefix(series)
        .is_some_and(|rest| rest.starts_with(['.', '-']))
}

/// virtme-ng looks for a kernel's modules in `/lib/modules/RELEASE`; the package keeps them
/// in `lib/modules` (5.10, 6.1) or `usr/lib/modules` (6.12). A symlink points there.
fn link_modules(kernel: Kernel) -> anyhow::Result<Kernel> {
    let root = kernel
        .image
        .parent()
        .and_then(Path::parent)
        .expect("an image lives in PACKAGE/boot");
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(&kernel.release))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| anyhow!("no modules for {} under {}", kernel.release, root.display()))?;
    let link = Path::new("/lib/modules").join(&kernel.release);
    if fs::read_link(&link).ok().as_deref() != Some(modules.as_path()) {
        fs::create_dir_all("/lib/modules")?;
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&modules, &link)
            .with_context(|| format!("linking {} to {}", link.display(), modules.display()))?;
    }
    Ok(kernel)
}

/// apt with a sources list and state of its own, for Debian's releases that carry the
/// matrix's kernels.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "parts", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let archive = debian_archive()?;
        let sources: String = MATRIX
            .iter()
            .map(|series| {
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {archive} {} main\n",
                    series.suite
                )
            })
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let dir = &self.dir;
        for (option, path) in [
            ("Dir::Etc::sourcelist", dir.join("sources.list")),
            ("Dir::Etc::sourceparts", dir.join("parts")),
            ("Dir::State::Lists", dir.join("lists")),
            ("Dir::Cache", dir.join("cache")),
        ] {
            command
                .arg("-o")
                .arg(format!("{option}={}", path.display()));
        }
        command
    }

    fn update(&self) -> anyhow::Result<()> {
        step(
            "reading Debian's package lists for bullseye, bookworm and trixie (private apt state)",
        );
        exec(self.command("apt-get").args(["-q", "update"]))
    }

    /// `linux-image-VERSION-amd64-unsigned` with the highest VERSION in the series.
    fn newest_generic_image(&self, series: &Series) -> anyhow::Result<String> {
        let names = output_of(self.command("apt-cache").args(["pkgnames", "linux-image-"]))
            .ok_or_else(|| anyhow!("apt-cache pkgnames failed"))?;
        names
            .lines()
            .filter_map(|name| {
                let version = name
                    .strip_prefix("linux-image-")?
                    .strip_suffix("-amd64-unsigned")?;
                // Generic flavour only: `cloud` and `rt` put their name before `-amd64`.
                (in_series(version, series.version)
                    && !version.contains("cloud")
                    && !version.ends_with("-rt"))
                .then(|| name.to_owned())
            })
            .max_by(|a, b| compare_versions(a, b))
            .ok_or_else(|| {
                anyhow!(
                    "Debian {} has no linux-image-{}*-amd64-unsigned package",
                    series.suite,
                    series.version
                )
            })
    }
}

/// The Debian archive the machine's apt already uses, so that no address is configured
/// twice; `SRCIP_DEBIAN_ARCHIVE` overrides it.
pub fn debian_archive() -> anyhow::Result<String> {
    if let Ok(archive) = std::env::var("SRCIP_DEBIAN_ARCHIVE") {
        return Ok(archive);
    }
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(text);
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = path.to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                texts.extend(fs::read_to_string(&path));
            }
        }
    }
    texts
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .map(|word| word.trim_end_matches('/'))
        .find(|word| word.contains("://") && word.ends_with("/debian"))
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow!(
                "the machine's apt sources name no Debian archive (a URI ending in /debian): add one, or set SRCIP_DEBIAN_ARCHIVE"
            )
        })
}

/// Orders `6.1.0-47` before `6.1.0-50` and `6.12.107` before `6.12.117`: digit runs compare
/// as numbers, everything else as text.
fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(text: &str) -> Vec<(bool, &str)> {
        let mut chunks = Vec::new();
        let mut start = 0;
        let bytes = text.as_bytes();
        for index in 1..=bytes.len() {
            if index == bytes.len()
                || bytes[index].is_ascii_digit() != bytes[start].is_ascii_digit()
            {
                chunks.push((bytes[start].is_ascii_digit(), &text[start..index]));
                start = index;
            }
        }
        chunks
    }
    let (a, b) = (chunks(a), chunks(b));
    for ((a_digits, a), (b_digits, b)) in a.iter().zip(&b) {
        let order = if *a_digits && *b_digits {
            a.parse::<u64>()
                .unwrap_or(0)
                .cmp(&b.parse::<u64>().unwrap_or(0))
        } else {
            a.cmp(b)
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert_eq!(
            compare_versions("6.1.0-47-amd64", "6.1.0-50-amd64"),
            Ordering::Less
        );
        assert_eq!(
            compare_versions("6.12.117+deb13", "6.12.107+deb13"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("5.10.0-9", "5.10.0-32"), Ordering::Less);
    }

    #[test]
    fn series_membership_is_exact() {
        assert!(in_series("6.1.0-50-amd64", "6.1"));
        assert!(!in_series("6.12.117+deb13-amd64", "6.1"));
        assert!(in_series("6.12.117+deb13-amd64", "6.12"));
    }
}
