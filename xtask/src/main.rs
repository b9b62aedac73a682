//! `cargo xtask`: what cargo alone cannot do. `setup` installs the eBPF toolchain pieces a
//! fresh machine lacks, `demo` and `test` set up, build and run as root.

mod setup;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, bail};
use clap::Parser;

#[derive(Parser)]
#[command(name = "cargo xtask")]
enum Task {
    /// Install what building the eBPF programs needs: rust-src for the nightly toolchain,
    /// bpf-linker built against the nightly's own LLVM, and iproute2. Idempotent.
    Setup,
    /// Set up, build, and run `srcip demo`.
    Demo,
    /// Set up, build, and run every test: unit tests and the integration tests that load
    /// the real programs (needs root).
    Test {
        /// Extra arguments for `cargo test`, such as a test name.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Task::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("[xtask] error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::run(),
        Task::Demo => {
            setup::run()?;
            build_release()?;
            exec(Command::new(workspace_root().join("target/release/srcip")).arg("demo"))
        }
        Task::Test { cargo_test_args } => {
            setup::run()?;
            build_release()?;
            let srcip = workspace_root().join("target/release/srcip");
            run_tests(
                Command::new(cargo())
                    .current_dir(workspace_root())
                    .args(["test", "--release"])
                    .args(&cargo_test_args)
                    .env("SRCIP_BIN", srcip),
            )
        }
    }
}

fn build_release() -> anyhow::Result<()> {
    step("building srcip (release)");
    exec(
        Command::new(cargo())
            .current_dir(workspace_root())
            .args(["build", "--release"]),
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// The cargo that runs this xtask, so that a toolchain override carries over.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Progress goes to stderr, like every log of this project.
pub fn step(message: &str) {
    eprintln!("[xtask] {message}");
}

/// Runs a command to completion, with an error that names it.
pub fn exec(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line that totals
/// every test binary's results: cargo's own last line is that of whichever binary ran last.
fn run_tests(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(counts) = line.strip_prefix("test result: ") {
            passed += count_before(counts, " passed");
            failed += count_before(counts, " failed");
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    println!("total: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// In `ok. 15 passed; 0 failed; …`, the number before `label`.
fn count_before(counts: &str, label: &str) -> u64 {
    counts
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|number| number.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0)
}

/// Runs a command and returns its stdout, or `None` when it cannot run or fails.
pub fn output_of(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
