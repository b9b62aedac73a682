//! The Debian package: it holds every file an operator expects, its unit passes
//! `systemd-analyze verify`, and what it installs works (`--version`, the man page, the
//! example policy). `cargo xtask test` builds it first and names it in `SRCIP_DEB`.

use std::{path::PathBuf, process::Command};

use srcip_tests::run;

fn deb() -> PathBuf {
    let path = PathBuf::from(
        std::env::var_os("SRCIP_DEB")
            .expect("SRCIP_DEB names the package: run the tests with `cargo xtask test`"),
    );
    assert!(path.exists(), "{} is missing", path.display());
    path
}

#[test]
fn the_package_holds_the_binary_unit_policy_manuals_and_completions() {
    let listing =
        String::from_utf8(run("dpkg-deb", &["-c", deb().to_str().unwrap()]).stdout).unwrap();
    for path in [
        "./usr/bin/srcip",
        "./usr/lib/systemd/system/srcip.service",
        "./etc/srcip/policy.toml",
        "./etc/default/srcip",
        "./usr/share/man/man1/srcip.1.gz",
        "./usr/share/man/man1/srcip-run.1.gz",
        "./usr/share/man/man1/srcip-watch.1.gz",
        "./usr/share/man/man1/srcip-policy-learn.1.gz",
        "./usr/share/bash-completion/completions/srcip",
        "./usr/share/zsh/vendor-completions/_srcip",
        "./usr/share/fish/vendor_completions.d/srcip.fish",
        "./usr/share/doc/srcip/copyright",
        "./usr/share/doc/srcip/reference.md.gz",
    ] {
        assert!(
            listing.lines().any(|line| line.ends_with(path)),
            "{path} is not in the package:\n{listing}"
        );
    }
    let conffiles = run("dpkg-deb", &["-I", deb().to_str().unwrap(), "conffiles"]);
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        "/etc/srcip/policy.toml\n/etc/default/srcip\n"
    );
}

#[test]
fn what_the_package_installs_works_and_its_unit_verifies() {
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().to_str().unwrap();
    run("dpkg-deb", &["-x", deb().to_str().unwrap(), root_path]);
    let srcip = root.path().join("usr/bin/srcip");
    let version = run(srcip.to_str().unwrap(), &["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("srcip "));
    let policy = root.path().join("etc/srcip/policy.toml");
    run(
        srcip.to_str().unwrap(),
        &["policy", "validate", policy.to_str().unwrap()],
    );
    let manual = Command::new("man")
        .arg("-l")
        .arg(root.path().join("usr/share/man/man1/srcip-run.1.gz"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("running man");
    let text = String::from_utf8_lossy(&manual.stdout);
    assert!(
        manual.status.success(),
        "{}",
        String::from_utf8_lossy(&manual.stderr)
    );
    assert!(
        text.contains("--policy") && text.contains("--sink"),
        "{text}"
    );
    // The unit as installed, checked inside the unpacked tree. What a Debian system around
    // it provides comes from this machine: the targets it is ordered against and `kill`
    // (ExecReload). Man pages are checked above, by `man` itself.
    let units = root.path().join("usr/lib/systemd/system");
    for target in [
        "sysinit.target",
        "basic.target",
        "multi-user.target",
        "network.target",
        "shutdown.target",
        "sockets.target",
        "paths.target",
        "timers.target",
        "slices.target",
    ] {
        let host = std::path::Path::new("/usr/lib/systemd/system").join(target);
        std::fs::copy(&host, units.join(target))
            .unwrap_or_else(|error| panic!("{} (from systemd): {error}", host.display()));
    }
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.path().join("bin/kill")).expect("/bin/kill (procps)");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={root_path}"))
        .arg(root.path().join("usr/lib/systemd/system/srcip.service"))
        .output()
        .expect("running systemd-analyze");
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !complaints.contains("srcip.service"),
        "systemd-analyze verify: {complaints}"
    );
}

/// The arm64 package, cross-compiled here: its control file says arm64, its binary is a
/// stripped aarch64 executable that runs (under qemu's user-mode emulation, with Debian's
/// arm64 C library) and validates the example policy it ships, and it holds the same files
/// as the amd64 one.
#[test]
fn the_arm64_package_holds_an_arm64_binary_that_runs() {
    let arm64 =
        PathBuf::from(std::env::var_os("SRCIP_DEB_ARM64").expect(
            "SRCIP_DEB_ARM64 names the arm64 package: run the tests with `cargo xtask test`",
        ));
    let field = run(
        "dpkg-deb",
        &["--field", arm64.to_str().unwrap(), "Architecture"],
    );
    assert_eq!(String::from_utf8_lossy(&field.stdout).trim(), "arm64");

    let files = |deb: &std::path::Path| -> Vec<String> {
        let listing = run("dpkg-deb", &["-c", deb.to_str().unwrap()]).stdout;
        let mut paths: Vec<String> = String::from_utf8(listing)
            .unwrap()
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5).map(str::to_owned))
            .collect();
        paths.sort();
        paths
    };
    assert_eq!(files(&arm64), files(&deb()));

    let root = tempfile::tempdir().unwrap();
    run(
        "dpkg-deb",
        &["-x", arm64.to_str().unwrap(), root.path().to_str().unwrap()],
    );
    let srcip = root.path().join("usr/bin/srcip");
    let elf = |flag: &str| {
        String::from_utf8(run("readelf", &[flag, "-W", srcip.to_str().unwrap()]).stdout).unwrap()
    };
    let header = elf("-h");
    assert!(header.contains("AArch64"), "{header}");
    let sections = elf("-S");
    assert!(!sections.contains(".symtab"), "not stripped: {sections}");
    let emulated = |args: &[&str]| {
        let mut command = vec!["-L", "/usr/aarch64-linux-gnu", srcip.to_str().unwrap()];
        command.extend(args);
        run("qemu-aarch64-static", &command)
    };
    let version = emulated(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("srcip {}", env!("CARGO_PKG_VERSION"))
    );
    let policy = root.path().join("etc/srcip/policy.toml");
    emulated(&["policy", "validate", policy.to_str().unwrap()]);
}
