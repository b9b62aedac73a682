//! `srcip demo` tells the incident end to end and leaves nothing behind.

use std::process::Command;

use srcip_tests::srcip_bin;

#[test]
fn demo_shows_the_violation_and_the_fix_and_cleans_up() {
    let output = Command::new(srcip_bin()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let violation = stdout
        .lines()
        .position(|line| {
            line.contains("VIOLATION rule=payment-gateway tcp 203.0.113.11:")
                && line.contains("-> 198.51.100.50:443 allowed=[203.0.113.10]")
        })
        .unwrap_or_else(|| panic!("no violation in the demo:\n{stdout}"));
    let compliant_after = stdout
        .lines()
        .skip(violation)
        .any(|line| line.contains("connect (compliant) rule=payment-gateway tcp 203.0.113.10:"));
    assert!(
        compliant_after,
        "the fix is not shown as compliant:\n{stdout}"
    );

    let pid = output_pid(&stdout);
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(
        !namespaces.contains(&format!("srcip-demo-{pid}-")),
        "the demo left namespaces behind:\n{namespaces}"
    );
}

/// The demo names its namespaces `srcip-demo-<pid>-…`; read the pid back from its output.
fn output_pid(stdout: &str) -> String {
    let start = stdout
        .find("srcip-demo-")
        .expect("the demo prints its namespaces")
        + "srcip-demo-".len();
    stdout[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}
