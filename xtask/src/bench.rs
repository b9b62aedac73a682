//! `cargo xtask bench`: what srcip costs the host, measured against the same run's baseline.
//!
//! Everything runs in a network namespace and a cgroup of the bench's own, removed at the
//! end (also on failure): the load is `storm` (tests/src/bin/storm.rs), refused TCP connects
//! to 127.0.0.1:9 inside that namespace, which exercise the connect path alone. Modes
//! alternate round by round, so that a noisy neighbour slows every mode alike, and each
//! figure is a median over rounds. Results are printed and written as JSON under
//! `target/bench-results/`. Nothing here asserts a budget: it reports.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::{cargo, exec, output_of, step, workspace_root};

pub struct Settings {
    pub rounds: usize,
    pub seconds: f64,
    /// Empty: every part.
    pub only: Vec<Part>,
}

/// The parts of a bench run, each a section of its JSON.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Tcp,
    Udp,
    Enforce,
    Latency,
    Saturation,
    Policies,
    Matcher,
}

impl Settings {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

/// The bench's own namespace and cgroup; removed on drop.
struct Sandbox {
    netns: String,
    cgroup: PathBuf,
    /// Policies of the bench, removed on drop.
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> anyhow::Result<Self> {
        let name = format!("srcip-bench-{}", std::process::id());
        exec(Command::new("ip").args(["netns", "add", &name]))?;
        let cgroup = cgroup2_mount()?.join(&name);
        let sandbox = Self {
            netns: name.clone(),
            cgroup,
            dir: tempfile::Builder::new().prefix(&name).tempdir()?,
        };
        exec(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        fs::create_dir(&sandbox.cgroup)
            .with_context(|| format!("creating {}", sandbox.cgroup.display()))?;
        Ok(sandbox)
    }

    fn policy(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The storm processes have exited by now; their cgroup is empty.
        if let Err(error) = fs::remove_dir(&self.cgroup) {
            eprintln!("could not remove {}: {error}", self.cgroup.display());
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let point = fields.split_whitespace().nth(4)?;
            (rest.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
        })
        .ok_or_else(|| anyhow!("cgroup v2 is not mounted"))
}

/// A policy whose one rule covers the storm's destination.
fn partner_policy(allowed: &str) -> String {
    format!(
        "[[rule]]\nname = \"bench\"\ndestinations = [\"127.0.0.1\"]\nprotocol = \"tcp\"\nallowed_sources = [\"{allowed}\"]\n"
    )
}

/// `rules` rules with distinct destinations, plus the storm's.
fn generated_policy(rules: usize) -> String {
    let mut text = partner_policy("127.0.0.1");
    for index in 1..rules {
        let [_, a, b, c] = (index as u32).to_be_bytes();
        text.push_str(&format!(
            "[[rule]]\nname = \"partner-{index}\"\ndestinations = [\"10.{a}.{b}.{c}\"]\nports = [443]\nallowed_sources = [\"203.0.113.10\"]\n"
        ));
    }
    text
}

pub fn run(settings: &Settings) -> anyhow::Result<()> {
    step("building srcip and the load generator (release)");
    exec(
        Command::new(cargo())
            .current_dir(workspace_root())
            .args(["build", "--release", "--package", "srcip-userspace"])
            .args(["--package", "srcip-tests", "--bin", "storm"]),
    )?;
    let bins = Binaries {
        srcip: workspace_root().join("target/release/srcip"),
        storm: workspace_root().join("target/release/storm"),
    };
    let bpftrace = ensure_bpftrace()?;
    let sandbox = Sandbox::new()?;

    let part = |part: Part, measure: &dyn Fn() -> anyhow::Result<Value>| {
        if settings.runs(part) {
            measure()
        } else {
            Ok(Value::Null)
        }
    };
    let throughput = part(Part::Tcp, &|| {
        throughput(&bins, &bpftrace, &sandbox, settings)
    })?;
    let datagrams = part(Part::Udp, &|| {
        datagram_throughput(&bins, &sandbox, settings)
    })?;
    let enforcement = part(Part::Enforce, &|| enforcement(&bins, &sandbox, settings))?;
    let latency = part(Part::Latency, &|| latency(&bins, &sandbox))?;
    let saturation = part(Part::Saturation, &|| saturation(&bins, &sandbox))?;
    let policies = part(Part::Policies, &|| policy_sizes(&bins, &sandbox))?;
    let matcher = part(Part::Matcher, &matcher)?;

    let results = json!({
        "machine": machine(),
        "settings": {"rounds": settings.rounds, "seconds_per_round": settings.seconds},
        "throughput": throughput,
        "udp_throughput": datagrams,
        "enforcement": enforcement,
        "latency": latency,
        "saturation": saturation,
        "policies": policies,
        "matcher": matcher,
    });
    let dir = workspace_root().join("target/bench-results");
    fs::create_dir_all(&dir)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let path = dir.join(format!("bench-{stamp}.json"));
    fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    step(&format!("results written to {}", path.display()));
    Ok(())
}

struct Binaries {
    srcip: PathBuf,
    storm: PathBuf,
}

fn ensure_bpftrace() -> anyhow::Result<PathBuf> {
    if output_of(Command::new("bpftrace").arg("--version")).is_none() {
        step("installing bpftrace with apt-get (the comparison users run today)");
        exec(Command::new("apt-get").arg("update"))?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "bpftrace"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(PathBuf::from("bpftrace"))
}

fn machine() -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|line| line.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "cpu": cpu,
    })
}

/// A line of a tool's output and when the bench read it.
type TimedLine = (Instant, String);

/// A running tool (srcip or bpftrace) whose stdout a thread reads (and drops, or keeps).
struct Tool {
    child: Child,
    /// Every line, when kept.
    kept: Option<Arc<Mutex<Vec<TimedLine>>>>,
}

impl Tool {
    /// Starts `command` and waits for a stdout line containing `ready`.
    fn start(command: &mut Command, ready: &str, keep_lines: bool) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let kept = keep_lines.then(|| Arc::new(Mutex::new(Vec::new())));
        let (ready_sender, ready_receiver) = mpsc::channel();
        let ready = ready.to_owned();
        {
            let kept = kept.clone();
            std::thread::spawn(move || {
                let mut ready_sender = Some(ready_sender);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let now = Instant::now();
                    if ready_sender.is_some() && line.contains(&ready) {
                        let _ = ready_sender.take().map(|sender| sender.send(()));
                    }
                    if let Some(kept) = &kept {
                        kept.lock().expect("not poisoned").push((now, line));
                    }
                }
            });
        }
        let mut tool = Self { child, kept };
        if ready_receiver
            .recv_timeout(Duration::from_secs(60))
            .is_err()
        {
            tool.stop();
            bail!("{command:?} did not become ready");
        }
        Ok(tool)
    }

    /// CPU seconds the tool has used so far (user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses: utime and stime are the
        // 12th and 13th of them.
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&index| fields.get(index)?.parse::<f64>().ok())
            .sum();
        ticks / 100.0
    }

    fn resident_kib(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then waits (SIGKILL after 20 s); srcip drains and writes `stopped` first.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn srcip_run(bins: &Binaries, policy: &Path, extra: &[&str], keep: bool) -> anyhow::Result<Tool> {
    Tool::start(
        Command::new(&bins.srcip)
            .args(["run", "--format", "json", "--policy"])
            .arg(policy)
            .args(extra),
        "\"type\":\"started\"",
        keep,
    )
}

/// Runs the storm and returns its JSON report.
fn storm(bins: &Binaries, sandbox: &Sandbox, args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new(&bins.storm)
        .arg("--cgroup")
        .arg(&sandbox.cgroup)
        .args(["--netns", &sandbox.netns])
        .args(args)
        .args(["127.0.0.1", "9"])
        .output()
        .context("running storm")?;
    if !output.status.success() {
        bail!("storm failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text
        .lines()
        .last()
        .ok_or_else(|| anyhow!("storm printed nothing"))?;
    Ok(serde_json::from_str(last)?)
}

/// `violation` folds repeats (the default); `unfolded` writes every one (`--fold-window 0`).
const MODES: &[&str] = &[
    "baseline",
    "compliant",
    "all",
    "violation",
    "unfolded",
    "scoped",
    "bpftrace",
];

/// Connect-storm rates per mode, alternating modes within each round.
fn throughput(
    bins: &Binaries,
    bpftrace: &Path,
    sandbox: &Sandbox,
    settings: &Settings,
) -> anyhow::Result<Value> {
    let compliant = sandbox.policy("compliant.toml", &partner_policy("127.0.0.1"))?;
    let violation = sandbox.policy("violation.toml", &partner_policy("127.0.0.2"))?;
    let cgroup = sandbox.cgroup.to_string_lossy().into_owned();
    let seconds = settings.seconds.to_string();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut cpu_per_100k: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 1..=settings.rounds {
        step(&format!("throughput round {round} of {}", settings.rounds));
        for (index, mode) in MODES.iter().enumerate() {
            let tool = match *mode {
                "baseline" => None,
                "compliant" => Some(srcip_run(bins, &compliant, &[], false)?),
                "all" => Some(srcip_run(bins, &compliant, &["--all"], false)?),
                "violation" => Some(srcip_run(bins, &violation, &[], false)?),
                "unfolded" => Some(srcip_run(bins, &violation, &["--fold-window", "0"], false)?),
                "scoped" => Some(srcip_run(bins, &compliant, &["--cgroup", &cgroup], false)?),
                "bpftrace" => Some(Tool::start(
                    Command::new(bpftrace).args(["-e", BPFTRACE_SCRIPT]),
                    "Attaching",
                    false,
                )?),
                other => unreachable!("mode {other}"),
            };
            let cpu_before = tool.as_ref().map_or(0.0, Tool::cpu_seconds);
            let report = storm(bins, sandbox, &["--threads", "2", "--seconds", &seconds])?;
            let connects = report["connects"].as_f64().unwrap_or(0.0);
            let elapsed = report["seconds"].as_f64().unwrap_or(1.0);
            rates[index].push(connects / elapsed);
            if let Some(mut tool) = tool {
                let cpu = tool.cpu_seconds() - cpu_before;
                cpu_per_100k[index].push(cpu / connects * 100_000.0);
                tool.stop();
            }
        }
    }
    let baseline = median(&rates[0]);
    let mut table = serde_json::Map::new();
    println!(
        "\nconnect storm ({} rounds of {} s, 2 threads)",
        settings.rounds, settings.seconds
    );
    println!(
        "{:<10} {:>14} {:>8} {:>22}",
        "mode", "connects/s", "ratio", "tool CPU s / 100k conn"
    );
    for (index, mode) in MODES.iter().enumerate() {
        let rate = median(&rates[index]);
        let cpu = (!cpu_per_100k[index].is_empty()).then(|| median(&cpu_per_100k[index]));
        println!(
            "{mode:<10} {rate:>14.0} {:>8.2} {:>22}",
            rate / baseline,
            cpu.map_or("-".to_owned(), |cpu| format!("{cpu:.2}"))
        );
        table.insert(
            (*mode).to_owned(),
            json!({
                "connects_per_second_median": rate,
                "ratio_to_baseline": rate / baseline,
                "rounds": rates[index],
                "tool_cpu_seconds_per_100k_connections": cpu,
            }),
        );
    }
    Ok(Value::Object(table))
}

/// UDP send-storm rates: the egress hook runs for every datagram.
fn datagram_throughput(
    bins: &Binaries,
    sandbox: &Sandbox,
    settings: &Settings,
) -> anyhow::Result<Value> {
    let udp_policy = |allowed: &str| {
        format!(
            "[[rule]]\nname = \"bench\"\ndestinations = [\"127.0.0.1\"]\nprotocol = \"udp\"\nallowed_sources = [\"{allowed}\"]\n"
        )
    };
    let compliant = sandbox.policy("udp-compliant.toml", &udp_policy("127.0.0.1"))?;
    let violation = sandbox.policy("udp-violation.toml", &udp_policy("127.0.0.2"))?;
    let seconds = settings.seconds.to_string();
    let modes = ["baseline", "compliant", "violation"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 1..=settings.rounds {
        step(&format!("UDP round {round} of {}", settings.rounds));
        for (index, mode) in modes.iter().enumerate() {
            let tool = match *mode {
                "baseline" => None,
                "compliant" => Some(srcip_run(bins, &compliant, &[], false)?),
                _ => Some(srcip_run(bins, &violation, &[], false)?),
            };
            let storm_args = ["--udp", "--threads", "2", "--seconds", &seconds];
            rates[index].push(storm_rate(bins, sandbox, &storm_args)?);
            if let Some(mut tool) = tool {
                tool.stop();
            }
        }
    }
    println!(
        "\nUDP send storm ({} rounds of {} s, 2 threads, one socket each)",
        settings.rounds, settings.seconds
    );
    Ok(rate_table(&modes, &rates, "datagrams"))
}

/// Runs the storm and returns its rate per second (connections, or datagrams with `--udp`).
fn storm_rate(bins: &Binaries, sandbox: &Sandbox, args: &[&str]) -> anyhow::Result<f64> {
    let report = storm(bins, sandbox, args)?;
    Ok(report["connects"].as_f64().unwrap_or(0.0) / report["seconds"].as_f64().unwrap_or(1.0))
}

/// Prints the median rate of each mode and its ratio to the first (the baseline), and returns
/// them as JSON; `unit` names what is counted (`datagrams`: `datagrams_per_second_median`).
fn rate_table(modes: &[&str], rates: &[Vec<f64>], unit: &str) -> Value {
    let baseline = median(&rates[0]);
    println!("{:<10} {:>14} {:>8}", "mode", format!("{unit}/s"), "ratio");
    let mut table = serde_json::Map::new();
    for (mode, rounds) in modes.iter().zip(rates) {
        let rate = median(rounds);
        println!("{mode:<10} {rate:>14.0} {:>8.2}", rate / baseline);
        table.insert(
            (*mode).to_owned(),
            json!({
                format!("{unit}_per_second_median"): rate,
                "ratio_to_baseline": rate / baseline,
                "rounds": rounds,
            }),
        );
    }
    Value::Object(table)
}

/// `srcip run` inside the bench's network namespace, where the storm's sockets live: `pin`
/// sets a datagram's source only for sockets of srcip's own namespace, where it has seen
/// the pin source.
fn srcip_run_in_sandbox(bins: &Binaries, sandbox: &Sandbox, policy: &Path) -> anyhow::Result<Tool> {
    Tool::start(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", sandbox.netns))
            .arg(&bins.srcip)
            .args(["run", "--format", "json", "--policy"])
            .arg(policy),
        "\"type\":\"started\"",
        false,
    )
}

/// What `pin` and `block` cost the connect and send paths: TCP connect storms and UDP send
/// storms under an auditing policy, a blocking one whose traffic is compliant (each
/// `connect()` and, for UDP, each datagram looks its rule up), and a pinning one (each
/// connection is bound and reported as pinned; for UDP the sendmsg programs are attached, and
/// every datagram takes the socket lock around them). srcip runs in the bench's namespace.
fn enforcement(bins: &Binaries, sandbox: &Sandbox, settings: &Settings) -> anyhow::Result<Value> {
    let policy = |name: &str, protocol: &str, action: &str| {
        sandbox.policy(
            name,
            &format!(
                "[[rule]]\nname = \"bench\"\ndestinations = [\"127.0.0.1\"]\nprotocol = \"{protocol}\"\nallowed_sources = [\"127.0.0.1\"]\naction = \"{action}\"\n"
            ),
        )
    };
    let modes = ["baseline", "alert", "block", "pin"];
    let seconds = settings.seconds.to_string();
    let mut table = serde_json::Map::new();
    for (protocol, storm_args) in [
        ("tcp", vec!["--threads", "2", "--seconds", &seconds]),
        (
            "udp",
            vec!["--udp", "--threads", "2", "--seconds", &seconds],
        ),
    ] {
        let policies = [
            policy(&format!("{protocol}-alert.toml"), protocol, "alert")?,
            policy(&format!("{protocol}-block.toml"), protocol, "block")?,
            policy(&format!("{protocol}-pin.toml"), protocol, "pin")?,
        ];
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 1..=settings.rounds {
            step(&format!(
                "enforcement ({protocol}) round {round} of {}",
                settings.rounds
            ));
            for (index, rate) in rates.iter_mut().enumerate() {
                let tool = match index {
                    0 => None,
                    _ => Some(srcip_run_in_sandbox(bins, sandbox, &policies[index - 1])?),
                };
                rate.push(storm_rate(bins, sandbox, &storm_args)?);
                if let Some(mut tool) = tool {
                    tool.stop();
                }
            }
        }
        println!(
            "\n{protocol} under enforcing policies ({} rounds of {} s, 2 threads)",
            settings.rounds, settings.seconds
        );
        let unit = if protocol == "tcp" {
            "connects"
        } else {
            "datagrams"
        };
        table.insert(protocol.to_owned(), rate_table(&modes, &rates, unit));
    }
    Ok(Value::Object(table))
}

/// What users run today: print every connection's fields as its SYN leaves.
const BPFTRACE_SCRIPT: &str = r#"tracepoint:sock:inet_sock_set_state /args->newstate == 2/ { printf("%d %s %d %d %d %d %d\n", pid, comm, uid, cgroup, args->family, args->sport, args->dport); }"#;

/// Connect-to-alert latency of violations, at a modest rate.
fn latency(bins: &Binaries, sandbox: &Sandbox) -> anyhow::Result<Value> {
    step("latency: 400 violations at 200 per second");
    let violation = sandbox.policy("violation.toml", &partner_policy("127.0.0.2"))?;
    let cgroup = sandbox.cgroup.to_string_lossy().into_owned();
    // Every violation written, so that each connection's latency can be measured.
    let unfolded = ["--cgroup", &cgroup, "--fold-window", "0"];
    let mut tool = srcip_run(bins, &violation, &unfolded, true)?;
    let output = Command::new(&bins.storm)
        .arg("--cgroup")
        .arg(&sandbox.cgroup)
        .args(["--netns", &sandbox.netns])
        .args([
            "--rate",
            "200",
            "--seconds",
            "2",
            "--report-each",
            "127.0.0.1",
            "9",
        ])
        .output()?;
    std::thread::sleep(Duration::from_millis(500));
    tool.stop();
    // Connect times are wall-clock nanoseconds; arrival times are Instants: convert once.
    let (wall_now, instant_now) = (SystemTime::now(), Instant::now());
    let arrival_ns = |at: Instant| -> f64 {
        let wall = wall_now - instant_now.duration_since(at);
        wall.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_nanos() as f64)
    };
    // Ports are reused within a run: each port's connections, in order, are matched with its
    // violations, in order.
    let mut connected: HashMap<u64, VecDeque<f64>> = HashMap::new();
    let mut connections = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let (Some(port), Some(ns)) = (value["src_port"].as_u64(), value["unix_ns"].as_f64()) {
            connected.entry(port).or_default().push_back(ns);
            connections += 1;
        }
    }
    let mut latencies_ms = Vec::new();
    let kept = tool
        .kept
        .as_ref()
        .expect("lines are kept")
        .lock()
        .expect("not poisoned");
    for (at, line) in kept.iter() {
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if value["type"] != "violation" {
            continue;
        }
        let sent = value["src_port"]
            .as_u64()
            .and_then(|port| connected.get_mut(&port)?.pop_front());
        if let Some(sent) = sent {
            latencies_ms.push((arrival_ns(*at) - sent) / 1e6);
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies_ms
            .get(((latencies_ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (p50, p99, max) = (pick(0.5), pick(0.99), pick(1.0));
    println!(
        "\nviolation latency, connect() to alert line read ({} of {} matched): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
        latencies_ms.len(),
        connections
    );
    Ok(
        json!({"matched": latencies_ms.len(), "connections": connections, "p50_ms": p50, "p99_ms": p99, "max_ms": max}),
    )
}

/// `--all` at rising rates: the first rate at which records are lost, and whether every
/// connection is accounted for (`connect` lines + `lost` counts = connections made).
fn saturation(bins: &Binaries, sandbox: &Sandbox) -> anyhow::Result<Value> {
    let compliant = sandbox.policy("compliant.toml", &partner_policy("127.0.0.1"))?;
    let cgroup = sandbox.cgroup.to_string_lossy().into_owned();
    let mut steps = Vec::new();
    println!("\nsaturation (--all, 2 s per rate)");
    for rate in ["10000", "25000", "50000", "100000", "unlimited"] {
        step(&format!("saturation at {rate} connects/s"));
        let mut tool = srcip_run(bins, &compliant, &["--all", "--cgroup", &cgroup], true)?;
        let mut args = vec!["--threads", "2", "--seconds", "2"];
        if rate != "unlimited" {
            args.extend(["--rate", rate]);
        }
        let report = storm(bins, sandbox, &args)?;
        tool.stop();
        let made = report["connects"].as_u64().unwrap_or(0);
        let (mut reported, mut lost) = (0u64, 0u64);
        for (_, line) in tool
            .kept
            .as_ref()
            .expect("kept")
            .lock()
            .expect("not poisoned")
            .iter()
        {
            let Ok(value) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            match value["type"].as_str() {
                Some("connect") => reported += 1,
                Some("lost") => lost += value["count"].as_u64().unwrap_or(0),
                _ => {}
            }
        }
        let achieved = made as f64 / report["seconds"].as_f64().unwrap_or(1.0);
        println!(
            "  asked {rate:>9}/s, made {achieved:>9.0}/s: {made} connections, {reported} reported, {lost} lost, accounted: {}",
            reported + lost == made
        );
        steps.push(json!({
            "asked_per_second": rate,
            "achieved_per_second": achieved,
            "connections": made,
            "reported": reported,
            "lost": lost,
            "all_accounted_for": reported + lost == made,
        }));
    }
    let first_loss = steps
        .iter()
        .find(|step| step["lost"].as_u64().unwrap_or(0) > 0)
        .map(|step| step["achieved_per_second"].clone());
    Ok(json!({"steps": steps, "first_loss_at_per_second": first_loss}))
}

/// Validation and start times, and resident memory, by policy size.
fn policy_sizes(bins: &Binaries, sandbox: &Sandbox) -> anyhow::Result<Value> {
    let cgroup = sandbox.cgroup.to_string_lossy().into_owned();
    let mut rows = Vec::new();
    println!("\npolicy size: validate, run start, resident memory");
    for rules in [10, 1_000, 10_000, 100_000] {
        let policy = sandbox.policy(&format!("rules-{rules}.toml"), &generated_policy(rules))?;
        let started = Instant::now();
        exec(
            Command::new(&bins.srcip)
                .args(["policy", "validate"])
                .arg(&policy)
                .stdout(Stdio::null()),
        )?;
        let validate = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut tool = srcip_run(bins, &policy, &["--cgroup", &cgroup], false)?;
        let start = started.elapsed().as_secs_f64();
        let resident_mib = tool.resident_kib() as f64 / 1024.0;
        tool.stop();
        println!(
            "  {rules:>7} rules: validate {validate:.3} s, start {start:.3} s, resident {resident_mib:.1} MiB"
        );
        rows.push(json!({
            "rules": rules,
            "validate_seconds": validate,
            "start_seconds": start,
            "resident_mib": resident_mib,
        }));
    }
    Ok(Value::Array(rows))
}

/// The criterion benchmark of user space's matcher with 100,000 rules.
fn matcher() -> anyhow::Result<Value> {
    step("matcher: criterion benchmark, 100,000 rules");
    let output = Command::new(cargo())
        .current_dir(workspace_root())
        .args([
            "bench",
            "--package",
            "srcip-userspace",
            "--bench",
            "matcher",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    if !output.status.success() {
        bail!("the matcher benchmark failed");
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // `thrpt:  [low Melem/s estimate Melem/s high Melem/s]`: the middle one.
    let estimate = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("thrpt:"))
        .and_then(|range| {
            let words: Vec<&str> = range
                .trim_matches([' ', '[', ']'])
                .split_whitespace()
                .collect();
            let scale = match *words.get(3)? {
                "Melem/s" => 1e6,
                "Kelem/s" => 1e3,
                "Gelem/s" => 1e9,
                _ => 1.0,
            };
            Some(words.get(2)?.parse::<f64>().ok()? * scale)
        })
        .ok_or_else(|| anyhow!("no throughput in the matcher benchmark's output"))?;
    println!(
        "
matcher, 100,000 rules: {:.2} M decisions per second on one core",
        estimate / 1e6
    );
    Ok(json!({"rules": 100_000, "decisions_per_second": estimate}))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
