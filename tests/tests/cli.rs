//! Command-line behaviour that needs no kernel programs: policy errors, bad flags, and
//! one-shot commands whose output is cut short or cannot be written.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use srcip_tests::{PolicyFile, srcip_bin};

const BAD_POLICY: &str = r#"[[rule]]
name = "partner"
destinations = ["198.51.100.500"]
allowed_sources = []
"#;

/// A valid policy whose one destination is this host's loopback.
const LOOPBACK_POLICY: &str = r#"[[rule]]
name = "loopback"
destinations = ["127.0.0.1"]
allowed_sources = ["127.0.0.1"]
"#;

fn stderr_lines(output: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn validate_reports_every_error_with_its_location_and_exits_2() {
    let policy = PolicyFile::new(BAD_POLICY);
    let output = Command::new(srcip_bin())
        .args(["policy", "validate"])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let file = policy.path.display();
    assert_eq!(
        stderr_lines(&output),
        [
            format!("{file}:3:17: \"198.51.100.500\" is not a valid IP address or CIDR prefix"),
            format!("{file}:4:19: rule \"partner\": allowed_sources must not be empty"),
        ]
    );
    assert!(output.stdout.is_empty());
}

/// `validate` checks what `run` checks before it touches the kernel: a host name that does
/// not resolve and a pin source this host does not have are errors at their places, both in
/// one run, in srcip's words (not the resolver's debug text). `--offline` checks the file
/// alone.
#[test]
fn validate_refuses_an_unresolvable_name_and_a_foreign_pin_source_as_run_would() {
    let policy = PolicyFile::new(
        r#"[[rule]]
name = "by-name"
destinations = ["partner.invalid"]
allowed_sources = ["203.0.113.10"]

[[rule]]
name = "pinned"
destinations = ["198.51.100.70"]
allowed_sources = ["192.0.2.99"]
action = "pin"
"#,
    );
    let folder = tempfile::tempdir().unwrap();
    let resolv_conf = folder.path().join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let output = Command::new(srcip_bin())
        .args(["policy", "validate", "--resolv-conf"])
        .arg(&resolv_conf)
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let file = policy.path.display().to_string();
    let errors: Vec<String> = stderr_lines(&output)
        .into_iter()
        .filter(|line| line.starts_with(&file))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!(
            "{file}:3:17: cannot resolve host name \"partner.invalid\": "
        )) && errors[0].contains(&resolv_conf.display().to_string())
            && !errors[0].contains("Query {"),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with(&format!(
            "{file}:9:20: action = \"pin\" binds to 192.0.2.99, which is not an address of this host"
        )),
        "{errors:#?}"
    );
    assert!(output.stdout.is_empty());

    let offline = Command::new(srcip_bin())
        .args(["policy", "validate", "--offline"])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(
        offline.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
}

#[test]
fn run_with_a_bad_policy_exits_2_with_the_location() {
    let policy = PolicyFile::new(BAD_POLICY);
    let output = Command::new(srcip_bin())
        .args(["run", "--policy"])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let first = stderr_lines(&output).into_iter().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("{}:3:17: ", policy.path.display())),
        "{first}"
    );
    assert!(output.stdout.is_empty(), "no alert may be printed");
}

#[test]
fn validate_accepts_a_good_policy() {
    let policy = PolicyFile::new(srcip_tests::PARTNER_POLICY);
    let output = Command::new(srcip_bin())
        .args(["policy", "validate"])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(
        summary.contains(": valid: 1 rule, 2 destinations,"),
        "{summary}"
    );
}

#[test]
fn a_missing_cgroup_exits_2_and_says_what_to_give() {
    let policy = PolicyFile::new(srcip_tests::PARTNER_POLICY);
    let output = Command::new(srcip_bin())
        .args(["run", "--cgroup", "/no-such-srcip-cgroup", "--policy"])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--cgroup /no-such-srcip-cgroup: no such cgroup directory"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn a_missing_policy_file_exits_2_and_names_it() {
    let output = Command::new(srcip_bin())
        .args(["run", "--policy", "/nonexistent/srcip.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/srcip.toml: cannot read the policy file"),
        "{stderr}"
    );
}

#[test]
fn run_without_privileges_says_what_to_do_and_exits_1() {
    let policy = PolicyFile::new(srcip_tests::PARTNER_POLICY);
    // setuid to nobody drops every capability.
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(srcip_bin())
        .args(["run", "--policy"])
        .arg(&policy.path)
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "srcip needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
        ),
        "{stderr}"
    );
}

#[test]
fn a_kernel_without_a_feature_gets_one_short_line_per_missing_feature() {
    let policy = PolicyFile::new("");
    let output = Command::new(srcip_bin())
        .args(["run", "--policy"])
        .arg(&policy.path)
        // What a user of Linux 5.4 (no ring buffer) sees, on any kernel.
        .env("SRCIP_TEST_MISSING_FEATURE", "ring-buffer")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(
        stderr_lines(&output),
        [format!(
            "srcip: error: this kernel ({}) lacks BPF ring buffer maps, which srcip needs for passing connection records from the kernel to srcip: run srcip on Linux 5.8 or later",
            release.trim()
        )]
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish_and_other_shells_are_refused() {
    for (shell, marker) in [
        ("bash", "complete -F _srcip"),
        ("zsh", "#compdef srcip"),
        ("fish", "complete -c srcip"),
    ] {
        let output = Command::new(srcip_bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        // Every subcommand is offered.
        for subcommand in ["run", "policy", "demo", "completions"] {
            assert!(script.contains(subcommand), "{shell} lacks {subcommand}");
        }
    }
    let output = Command::new(srcip_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
}

#[test]
fn version_is_printed() {
    let output = Command::new(srcip_bin()).arg("--version").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("srcip {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_resolv_conf_that_cannot_be_read_exits_2_and_names_it() {
    let policy = PolicyFile::new(srcip_tests::PARTNER_POLICY);
    let output = Command::new(srcip_bin())
        .args([
            "check",
            "--resolv-conf",
            "/nonexistent/resolv.conf",
            "--policy",
        ])
        .arg(&policy.path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--resolv-conf /nonexistent/resolv.conf"),
        "{stderr}"
    );
}

/// A pipe whose reader is already gone: every write to it fails with EPIPE, as a write of
/// `srcip check | head` does once `head` has its lines.
fn closed_pipe() -> Stdio {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// `srcip completions zsh | head`, `srcip policy validate FILE | head`, `srcip check | head`:
/// a one-shot command whose reader stopped reading has nothing left to tell anyone, and
/// exits 0 without a word (no panic, no "Broken pipe").
#[test]
fn one_shot_commands_exit_quietly_when_their_reader_is_gone() {
    let policy = PolicyFile::new(LOOPBACK_POLICY);
    let path = policy.path.to_str().unwrap();
    for args in [
        &["completions", "zsh"][..],
        &["policy", "validate", path],
        &["check", "--policy", path],
    ] {
        let output = Command::new(srcip_bin())
            .args(args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        assert_eq!(
            (output.status.code(), stderr_lines(&output)),
            (Some(0), Vec::<String>::new()),
            "srcip {args:?}"
        );
    }
}

/// `policy learn --output` into a folder that does not exist fails at once, naming it, not
/// after the whole `--duration`.
#[test]
fn learn_into_a_missing_folder_fails_at_once_and_names_it() {
    let started = Instant::now();
    let output = Command::new(srcip_bin())
        .args([
            "policy",
            "learn",
            "--duration",
            "10m",
            "--output",
            "/nonexistent-srcip-folder/policy.toml",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "learn failed only after {:?}",
        started.elapsed()
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_lines(&output);
    assert!(
        stderr
            .iter()
            .any(|line| line.contains("/nonexistent-srcip-folder")),
        "{stderr:#?}"
    );
}

/// A start that fails after srcip began to listen for watchers (here: a sink file it cannot
/// make) leaves no socket behind.
#[test]
fn a_failed_start_leaves_no_watch_socket_behind() {
    let policy = PolicyFile::new(LOOPBACK_POLICY);
    let folder = tempfile::tempdir().unwrap();
    let socket = folder.path().join("srcip.sock");
    let output = Command::new(srcip_bin())
        .args(["run", "--policy"])
        .arg(&policy.path)
        .arg("--socket")
        .arg(&socket)
        .args(["--sink", "file:/dev/null/alerts.json"])
        .arg("--spool")
        .arg(folder.path().join("spool"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{:#?}",
        stderr_lines(&output)
    );
    assert!(
        stderr_lines(&output)
            .iter()
            .any(|line| line.contains("file:/dev/null/alerts.json")),
        "{:#?}",
        stderr_lines(&output)
    );
    // It was listening before the sink failed.
    assert!(
        stderr_lines(&output)
            .iter()
            .any(|line| line.contains("srcip watch can attach at")),
        "{:#?}",
        stderr_lines(&output)
    );
    assert!(!socket.exists(), "the watch socket was left behind");
}
