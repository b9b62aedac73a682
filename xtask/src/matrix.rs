//! The kernel matrix: the integration tests, built once on the host, run again inside a VM
//! of each kernel of [`kernels::MATRIX`].
//!
//! The VM (virtme-ng, under software emulation: these machines have no KVM) sees the host's
//! file system read-only, so it runs the very binaries the host built. A folder of the run,
//! shared read-write, carries the guest's script in and its output out; the host prints that
//! output as it grows.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};

use crate::{
    Tally, cargo,
    kernels::{self, Kernel},
    step, workspace_root,
};

/// One VM's whole run, boot included, so that a hung guest ends. 5.10's run, the longest,
/// took 15 minutes on one day and more than 25 on another on the same kind of machine
/// (software emulation's speed varies with the host's load): a limit only a hung guest
/// reaches is well above both.
const VM_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Integration tests that do not depend on the kernel (command-line parsing and errors, the
/// package's contents and install): they run once, on the host, not in every VM.
const HOST_ONLY: &[&str] = &["cli", "package"];

/// The integration-test executables of the `srcip-tests` package that depend on the kernel,
/// built (release) if needed.
pub fn kernel_test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let binaries = integration_test_binaries()?;
    Ok(binaries
        .into_iter()
        .filter(|binary| {
            // Cargo names each `NAME-HASH`.
            let name = binary.file_name().and_then(|name| name.to_str());
            let test = name
                .and_then(|name| name.rsplit_once('-'))
                .map(|(test, _)| test);
            !test.is_some_and(|test| HOST_ONLY.contains(&test))
        })
        .collect())
}

/// The integration-test executables of the `srcip-tests` package, built (release) if needed.
fn integration_test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    step("building the integration tests");
    let output = Command::new(cargo())
        .current_dir(workspace_root())
        .args([
            "test",
            "--release",
            "--package",
            "srcip-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        return Err(anyhow!("building the integration tests failed"));
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["profile"]["test"].as_bool() == Some(true);
        let integration = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|kind| kind == "test"));
        if let (true, true, Some(path)) = (is_test, integration, message["executable"].as_str()) {
            binaries.push(PathBuf::from(path));
        }
    }
    if binaries.is_empty() {
        return Err(anyhow!("cargo built no integration-test executable"));
    }
    Ok(binaries)
}

/// How many tests `binaries` hold (those `filter` selects, when given): every kernel must
/// run them all.
pub fn test_count(binaries: &[PathBuf], filter: Option<&str>) -> anyhow::Result<u64> {
    let mut count = 0;
    for binary in binaries {
        let listed = Command::new(binary)
            .args(["--list", "--format", "terse"])
            .args(filter)
            .current_dir(workspace_root().join("tests"))
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("listing the tests of {}", binary.display()))?;
        if !listed.status.success() {
            return Err(anyhow!("{} cannot list its tests", binary.display()));
        }
        count += String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter(|line| line.ends_with(": test"))
            .count() as u64;
    }
    Ok(count)
}

/// Lines of a kernel's log that say the kernel itself went wrong: a test run that passed on
/// such a kernel did not pass.
const KERNEL_TROUBLE: &[&str] = &[
    "WARNING: CPU:",
    "BUG: ",
    "Oops:",
    "Kernel panic",
    "self-detected stall",
    "detected stalls on CPU",
    "general protection fault",
];

/// Boots `kernel` and runs every binary in it (each with `filter`, when given); returns the
/// tally of the guest's `test result:` lines. A binary that ends without one, a VM that does
/// not finish, fewer tests run than `expected`, and a kernel warning, bug or RCU stall in
/// the VM's console each count as a failure: nothing is skipped silently.
pub fn run_in_vm(
    vng_dir: &Path,
    kernel: &Kernel,
    binaries: &[PathBuf],
    srcip: &Path,
    filter: Option<&str>,
    expected: u64,
) -> anyhow::Result<Tally> {
    let run_dir = workspace_root().join("target/vm").join(kernel.series);
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let script = run_dir.join("guest.sh");
    let nats_server = crate::setup::nats_server()?;
    fs::write(
        &script,
        guest_script(&run_dir, binaries, srcip, &nats_server, filter),
    )?;
    let log = run_dir.join("guest.log");
    fs::write(&log, "")?;

    step(&format!(
        "kernel {}: booting {} in a VM (software emulation; the first lines take about 20 s)",
        kernel.series, kernel.release
    ));
    let console = fs::File::create(run_dir.join("console.log"))?;
    let path = format!(
        "{}:{}",
        vng_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut vm = Command::new(vng_dir.join("vng"))
        .arg("--run")
        .arg(&kernel.image)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            "2G",
            // The kernel's log goes to console.log, whose tail is shown when a VM stops
            // early: without it a guest crash leaves no trace.
            "--verbose",
        ])
        .arg("--rwdir")
        .arg(&run_dir)
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        // vng refuses to run from inside a kernel source tree; the run folder is not one.
        .current_dir(&run_dir)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting vng")?;

    let prefix = format!("[{}] ", kernel.series);
    let mut tally = Tally::default();
    let mut follower = LogFollower::new(&log);
    let started = Instant::now();
    let finished = loop {
        for line in follower.new_lines()? {
            println!("{prefix}{line}");
            tally.read_line(&line);
        }
        if wait_briefly(&mut vm)? {
            break true;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = vm.kill();
            let _ = vm.wait();
            break false;
        }
    };
    for line in follower.new_lines()? {
        println!("{prefix}{line}");
        tally.read_line(&line);
    }
    let completed = fs::read_to_string(run_dir.join("done")).is_ok();
    let console = fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    let trouble: Vec<&str> = console
        .lines()
        .filter(|line| KERNEL_TROUBLE.iter().any(|needle| line.contains(needle)))
        .collect();
    if !trouble.is_empty() {
        for line in &trouble {
            println!("{prefix}console: {line}");
        }
        println!(
            "{prefix}the kernel reported trouble during the run (see target/vm/{}/console.log): counted as one failure",
            kernel.series
        );
        tally.failed += 1;
    }
    let ran = tally.passed + tally.failed;
    if completed && ran < expected {
        println!(
            "{prefix}the VM ran {ran} tests of {expected}: the {} missing count as failures",
            expected - ran
        );
        tally.failed += expected - ran;
    }
    if !finished || !completed {
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            println!("{prefix}console: {line}");
        }
        println!(
            "{prefix}the VM {} before the tests finished: counted as one failure",
            if finished { "stopped" } else { "timed out" }
        );
        tally.failed += 1;
    }
    Ok(tally)
}

fn guest_script(
    run_dir: &Path,
    binaries: &[PathBuf],
    srcip: &Path,
    nats_server: &Path,
    filter: Option<&str>,
) -> String {
    let log = run_dir.join("guest.log");
    let mut script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask test`; runs inside the VM.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export SRCIP_BIN='{srcip}'\n\
         export SRCIP_NATS_SERVER='{nats}'\n\
         cd '{tests}'\n\
         exec >>'{log}' 2>&1\n\
         echo \"kernel $(uname -r)\"\n",
        srcip = srcip.display(),
        nats = nats_server.display(),
        tests = workspace_root().join("tests").display(),
        log = log.display(),
    );
    let filter = filter
        .map(|filter| format!(" '{filter}'"))
        .unwrap_or_default();
    for binary in binaries {
        // Each binary runs its tests two at a time, as many as the VM has CPUs.
        script.push_str(&format!(
            "echo '{RUNNING} {binary}'\n'{binary}' --test-threads 2{filter} || echo \"{EXITED} $?\"\n",
            binary = binary.display(),
        ));
    }
    script.push_str(&format!(
        "echo done > '{}'\n",
        run_dir.join("done").display()
    ));
    script
}

/// The guest's line before each test binary.
pub const RUNNING: &str = "xtask: running";
/// The guest's line after a test binary that failed; with no `test result:` line since the
/// binary started, it crashed.
pub const EXITED: &str = "xtask: test binary exited with";

/// Waits up to a second for the VM to end; true when it has.
fn wait_briefly(vm: &mut Child) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if vm.try_wait()?.is_some() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(false)
}

/// Reads the lines a file gained since the last call.
struct LogFollower {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogFollower {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: String::new(),
        }
    }

    fn new_lines(&mut self) -> anyhow::Result<Vec<String>> {
        let mut file = fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        self.offset += file.read_to_end(&mut bytes)? as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_owned).collect();
        self.partial = lines.pop().unwrap_or_default();
        Ok(lines)
    }
}

/// Every kernel of the matrix, or the one `--kernel` names.
pub fn selected(kernel: Option<&str>) -> anyhow::Result<Vec<&'static kernels::Series>> {
    match kernel {
        None => Ok(kernels::MATRIX.iter().collect()),
        Some(version) => Ok(vec![kernels::series(version)?]),
    }
}
