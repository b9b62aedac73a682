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
