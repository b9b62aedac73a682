//! `cargo xtask`: what cargo alone cannot do. `setup` installs the eBPF toolchain pieces a
//! fresh machine lacks, `demo` and `test` set up, build and run as root.

mod bench;
mod install_check;
mod kernels;
mod matrix;
mod package;
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
    /// Set up, build, and run every test (needs root): the unit and integration tests on
    /// the host's kernel, then the integration tests inside a VM of each kernel of the
    /// matrix (Debian's 5.10, 6.1 and 6.12). Kernels and VM tools are installed and cached
    /// on first use.
    Test {
        /// Run on this kernel only: `host`, or a series of the matrix (`5.10`, `6.1`, `6.12`).
        #[arg(long)]
        kernel: Option<String>,
        /// Run only the tests whose name contains this.
        filter: Option<String>,
    },
    /// Set up, build, and make the Debian package `target/debian/srcip_VERSION_ARCH.deb`
    /// (arm64: cross-compiled, with Debian's cross toolchain, installed on first use).
    Package {
        #[arg(long, value_enum, default_value = "amd64")]
        arch: package::Arch,
    },
    /// Build the package and install it on a fresh Debian 12 made with debootstrap (root;
    /// cached after the first run): dpkg -i, --version, man, the example policy, the unit.
    /// arm64: on the same Debian made multiarch, the binary run by qemu's user-mode
    /// emulator. `test` runs both, after the host's tests.
    InstallCheck {
        #[arg(long, value_enum, default_value = "amd64")]
        arch: package::Arch,
    },
    /// Set up, build, and measure what srcip costs (root; not part of `test`): connect
    /// storms against a baseline and bpftrace, alert latency, saturation, policy sizes.
    Bench {
        /// Rounds of each throughput mode, alternated.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per throughput round.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Run only these parts (comma-separated): tcp, udp, enforce, latency, saturation, policies,
        /// matcher. All of them by default; a partial run is for iterating, not for
        /// BENCHMARKS.md.
        #[arg(long, value_delimiter = ',', value_enum)]
        only: Vec<bench::Part>,
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
        Task::Test { kernel, filter } => test(kernel.as_deref(), filter.as_deref()),
        Task::Package { arch } => {
            setup::build_tools()?;
            let deb = package::run(arch)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::InstallCheck { arch } => {
            setup::run()?;
            install_check::run(&package::run(arch)?, arch)
        }
        Task::Bench {
            rounds,
            seconds,
            only,
        } => {
            setup::run()?;
            bench::run(&bench::Settings {
                rounds,
                seconds,
                only,
            })
        }
    }
}

/// The host first (its failures show fastest), then each VM; one total per kernel and one
/// over all of them, the last line of the output.
fn test(kernel: Option<&str>, filter: Option<&str>) -> anyhow::Result<()> {
    let on_host = kernel.is_none_or(|kernel| kernel == "host");
    let series = match kernel {
        Some("host") => Vec::new(),
        other => matrix::selected(other)?,
    };
    setup::run()?;
    let vm_tools = if series.is_empty() {
        None
    } else {
        Some(kernels::ensure_vm_tools()?)
    };
    let kernels = kernels::ensure_kernels(&series)?;
    // Builds srcip too; the package tests read both packages.
    let deb = package::run(package::Arch::Amd64)?;
    // Cross-compiled, for the host's package tests and install check only.
    let arm64_deb = on_host
        .then(|| package::run(package::Arch::Arm64))
        .transpose()?;
    let srcip = workspace_root().join("target/release/srcip");

    let mut totals: Vec<(String, Tally)> = Vec::new();
    if on_host {
        let release = output_of(Command::new("uname").arg("-r")).unwrap_or_default();
        let tally = run_tests(
            Command::new(cargo())
                .current_dir(workspace_root())
                // Every test binary runs, whatever fails before it.
                .args(["test", "--release", "--no-fail-fast"])
                .args(filter)
                .env("SRCIP_BIN", &srcip)
                .env("SRCIP_DEB", &deb)
                .envs(arm64_deb.iter().map(|deb| ("SRCIP_DEB_ARM64", deb)))
                .env("SRCIP_NATS_SERVER", setup::nats_server()?),
        )?;
        totals.push((format!("kernel host {}", release.trim()), tally));
        // Each package on a fresh Debian: one check each, counted like a test.
        let packages = [(package::Arch::Amd64, &deb)]
            .into_iter()
            .chain(arm64_deb.iter().map(|deb| (package::Arch::Arm64, deb)));
        for (arch, deb) in packages {
            let installed = install_check::run(deb, arch);
            if let Err(error) = &installed {
                eprintln!("[xtask] install check failed: {error:#}");
            }
            totals.push((
                format!(
                    "{} package install check on a fresh Debian bookworm",
                    arch.debian()
                ),
                Tally {
                    passed: u64::from(installed.is_ok()),
                    failed: u64::from(installed.is_err()),
                    ..Tally::default()
                },
            ));
        }
    }
    if let Some(vng_dir) = vm_tools {
        let binaries = matrix::kernel_test_binaries()?;
        let expected = matrix::test_count(&binaries, filter)?;
        for kernel in &kernels {
            let tally = matrix::run_in_vm(&vng_dir, kernel, &binaries, &srcip, filter, expected)?;
            totals.push((
                format!("kernel {} {}", kernel.series, kernel.release),
                tally,
            ));
        }
    }

    let mut overall = Tally::default();
    for (what, tally) in &totals {
        println!("{what}: {} passed, {} failed", tally.passed, tally.failed);
        overall.passed += tally.passed;
        overall.failed += tally.failed;
    }
    println!(
        "total: {} passed, {} failed",
        overall.passed, overall.failed
    );
    if overall.failed > 0 {
        bail!("{} tests failed", overall.failed);
    }
    Ok(())
}

/// Passed and failed tests, counted from test binaries' `test result:` lines.
#[derive(Default)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    /// Whether the test binary running now has printed its result line yet.
    result_seen: bool,
}

impl Tally {
    pub fn read_line(&mut self, line: &str) {
        if let Some(counts) = line.strip_prefix("test result: ") {
            self.passed += count_before(counts, " passed");
            self.failed += count_before(counts, " failed");
            self.result_seen = true;
        } else if line.starts_with(matrix::RUNNING) {
            self.result_seen = false;
        } else if line.starts_with(matrix::EXITED) && !self.result_seen {
            // The binary died before it could report: one failure at least.
            self.failed += 1;
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

/// `$VARIABLE`, else `$HOME/fallback`: where cargo's and the cache's folders live.
pub fn home_folder(variable: &str, fallback: &str) -> anyhow::Result<PathBuf> {
    if let Some(folder) = std::env::var_os(variable) {
        return Ok(PathBuf::from(folder));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow::anyhow!("neither {variable} nor HOME is set"))?;
    Ok(PathBuf::from(home).join(fallback))
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

/// Runs `cargo test`, passing its output through, and tallies every test binary's results:
/// cargo's own last line is that of whichever binary ran last. A build failure is an error;
/// failed tests are in the tally.
fn run_tests(command: &mut Command) -> anyhow::Result<Tally> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("stdout is piped")).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        tally.read_line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    if !status.success() && tally.failed == 0 {
        bail!("{shown} failed before any test failed: {status}");
    }
    Ok(tally)
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
