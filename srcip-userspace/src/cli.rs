//! The command line, as docs/reference.md describes it.

use std::{io::IsTerminal, path::PathBuf};

use clap::{Parser, Subcommand};

use srcip_common::{fold::DEFAULT_FOLD_ENTRIES, record::EVENTS_RING_BYTES};

use crate::{
    delivery::{DEFAULT_SOCKET, SinkSpec, SpoolSettings},
    output::Format,
    run::RunConfig,
};

#[derive(Parser)]
#[command(
    name = "srcip",
    version,
    about = "Audits the source address the kernel chooses for every outbound connection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the eBPF programs and audit outbound connections until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Ask the kernel which source it would choose now for every destination of the policy
    /// (or for one DESTINATION), and say why and how to fix it; exit 3 when any is not
    /// allowed. Sends nothing.
    Check(CheckArgs),
    /// Stream the alerts of a running `srcip run` as they happen: first what it is attached
    /// to and the destinations drifting now.
    Watch {
        /// The unix socket `srcip run` listens on.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Output format; default: text on a terminal, json otherwise.
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Ask a running `srcip run` for its state: its policy, the destinations drifting now,
    /// failing pins, its sinks' backlog, its kernel and what it cannot do there, and counts.
    Status {
        /// The unix socket `srcip run` listens on.
        #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Output format; default: text on a terminal, json otherwise.
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Reproduce the multi-IP incident in throw-away network namespaces and show srcip
    /// catching it.
    Demo,
    /// Print shell completions for srcip, for example
    /// `srcip completions bash > /etc/bash_completion.d/srcip`.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages, srcip(1) and one per subcommand, into DIR (for packaging).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Writes `srcip.1` and a page per subcommand (`srcip-run.1`, `srcip-policy-learn.1`, …)
/// into `dir`.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    crate::manual::write_man_pages(dir, <Cli as clap::CommandFactory>::command())
}

/// The shells `srcip completions` writes for.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    /// Writes the completion script for this shell to stdout. Made whole first: the
    /// generator panics when its writer fails (`srcip completions zsh | head`), a write of
    /// ours returns the error.
    pub fn print_completions(self) -> std::io::Result<()> {
        let shell = match self {
            Self::Bash => clap_complete::Shell::Bash,
            Self::Zsh => clap_complete::Shell::Zsh,
            Self::Fish => clap_complete::Shell::Fish,
        };
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "srcip", &mut script);
        std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Policy file (TOML).
    #[arg(long, value_name = "FILE", default_value = "/etc/srcip/policy.toml")]
    policy: PathBuf,
    /// Audit only processes in this cgroup v2 directory and below it; repeatable. An
    /// absolute path, or a path relative to the cgroup2 mount (/system.slice/x.service).
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<String>,
    /// Output format; default: text on a terminal, json otherwise.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Also report every compliant or unmatched connection (`connect` lines).
    #[arg(long)]
    all: bool,
    /// Write no alerts to stdout (the sinks and the watch socket still get them).
    #[arg(long)]
    quiet: bool,
    /// Also deliver alerts here; repeatable: file:PATH, syslog:[PATH],
    /// syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT, nats://HOST:PORT/SUBJECT?stream=NAME
    /// (tls://… for TLS), https://… (a webhook).
    #[arg(long = "sink", value_name = "URL")]
    sinks: Vec<SinkSpec>,
    /// CA certificates (PEM) that https:// and tls:// sinks trust instead of the system's.
    #[arg(long, value_name = "FILE")]
    sink_ca: Option<PathBuf>,
    /// Who nats:// and tls:// sinks are to their server: a .creds file (a user JWT and its
    /// nkey seed) or a file holding a user nkey seed.
    #[arg(long, value_name = "FILE")]
    nats_creds: Option<PathBuf>,
    /// The unix socket `srcip watch` reads (root-only).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where network sinks keep alerts their receiver has not taken yet, across restarts.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/srcip/spool")]
    spool: PathBuf,
    /// Bytes each network sink's spool may hold (suffixes K, M, G: 1024-based); beyond it
    /// the oldest alerts are dropped and counted in a `lost` line.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = byte_size)]
    spool_max: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Size of the kernel→srcip ring buffer: a power of two, at least 4096. Raise it when
    /// `lost` lines appear.
    #[arg(long, value_name = "BYTES", default_value_t = EVENTS_RING_BYTES, value_parser = ring_buffer_size)]
    ring_buffer_size: u32,
    /// Repeats of a violation (same rule, protocol, source, destination, port and cgroup)
    /// within this window after the first are counted in the kernel and written once, as
    /// one `violation` with `count`, when the window closes. `0` writes every one. Not with
    /// `--all`, which writes every connection.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    fold_window: std::time::Duration,
    /// How many violations can be folded at once; beyond that, repeats are written one by
    /// one (never lost).
    #[arg(long, value_name = "ENTRIES", default_value_t = DEFAULT_FOLD_ENTRIES, value_parser = clap::value_parser!(u32).range(1..))]
    fold_table_size: u32,
    /// How long after a change of routes, addresses or rules srcip reads them again: the
    /// rest of a burst arrives first. Until then route drift is not reported, and `block`
    /// still judges sockets that bound no source by the previous prediction.
    #[arg(long, value_name = "DURATION", default_value = "150ms", value_parser = humantime::parse_duration)]
    route_settle: std::time::Duration,
    /// Leave pin and block in force while srcip is stopped or restarting: their programs stay
    /// attached, held by links pinned in --kept-links. The next `srcip run` takes them over,
    /// with or without this flag; to remove them without one, delete that folder.
    #[arg(long)]
    keep_enforcing: bool,
    /// Where --keep-enforcing pins its links (a folder on a bpf file system), and where
    /// `srcip run` looks for those a previous run kept.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/srcip")]
    kept_links: PathBuf,
    #[command(flatten)]
    resolver: ResolverArgs,
    /// How long an address of a policy host name stays in force after the last answer that
    /// held it: programs keep using an address they resolved earlier.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    keep_resolved: std::time::Duration,
}

/// How host names in the policy are resolved.
#[derive(clap::Args)]
pub struct ResolverArgs {
    /// Ask the name servers of this file (resolv.conf format) instead of /etc/resolv.conf.
    #[arg(long, value_name = "FILE")]
    pub resolv_conf: Option<PathBuf>,
}

impl RunArgs {
    pub fn into_config(self) -> RunConfig {
        RunConfig {
            policy: self.policy,
            cgroups: self.cgroups,
            format: self.format.unwrap_or_else(default_format),
            quiet: self.quiet,
            sinks: self.sinks,
            socket: self.socket,
            spool: SpoolSettings {
                folder: self.spool,
                max_bytes: self.spool_max,
            },
            sink_ca: self.sink_ca,
            nats_creds: self.nats_creds,
            metrics: self.metrics,
            report_all: self.all,
            ring_buffer_bytes: self.ring_buffer_size,
            fold_window: self.fold_window,
            fold_entries: self.fold_table_size,
            route_settle: self.route_settle,
            keep_enforcing: self.keep_enforcing,
            kept_links: self.kept_links,
            resolv_conf: self.resolver.resolv_conf,
            keep_resolved: self.keep_resolved,
        }
    }
}

#[derive(clap::Args)]
pub struct CheckArgs {
    /// One destination to ask about instead of a policy: ADDR[:PORT][/tcp|udp], an address
    /// or host name (IPv6 with a port in brackets: [2001:db8::50]:443).
    #[arg(value_name = "DESTINATION", conflicts_with = "policy")]
    destination: Option<crate::check::AdHocDestination>,
    /// With a DESTINATION: whether the kernel would use this source for it (exit 3 when
    /// not), and how to make it.
    #[arg(long, value_name = "SOURCE", requires = "destination")]
    from: Option<std::net::IpAddr>,
    /// Policy file (TOML).
    #[arg(long, value_name = "FILE", default_value = "/etc/srcip/policy.toml")]
    policy: PathBuf,
    /// Output format; default: text on a terminal, json (one object per destination)
    /// otherwise.
    #[arg(long, value_enum)]
    format: Option<Format>,
    #[command(flatten)]
    resolver: ResolverArgs,
    /// Predict for a program running as this user (a name or a uid), so that `ip rule ...
    /// uidrange` policy routing applies as it does to that program; default: the user
    /// running check.
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    uid: Option<u32>,
    /// Predict for a program whose sockets carry this mark (SO_MARK; decimal or 0x…), so
    /// that `ip rule ... fwmark` policy routing applies; default: no mark.
    #[arg(long, value_name = "MARK", value_parser = parse_mark, default_value = "0")]
    mark: u32,
}

/// A user name, or a uid.
fn parse_user(given: &str) -> Result<u32, String> {
    if let Ok(uid) = given.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(given) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(format!(
            "no user named \"{given}\" on this host; give a name from /etc/passwd or a number"
        )),
        Err(error) => Err(format!("cannot look up user \"{given}\": {error}")),
    }
}

/// A mark as `ip rule` writes it: decimal, or hexadecimal with 0x.
fn parse_mark(given: &str) -> Result<u32, String> {
    let parsed = match given
        .strip_prefix("0x")
        .or_else(|| given.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => given.parse(),
    };
    parsed.map_err(|_| {
        format!("\"{given}\" is not a mark: give a number such as 7 or 0x7 (at most 32 bits)")
    })
}

impl CheckArgs {
    pub fn into_config(self) -> crate::check::CheckConfig {
        crate::check::CheckConfig {
            question: match self.destination {
                Some(destination) => crate::check::Question::Destination {
                    destination,
                    from: self.from,
                },
                None => crate::check::Question::Policy(self.policy),
            },
            format: self.format.unwrap_or_else(default_format),
            resolv_conf: self.resolver.resolv_conf,
            program: crate::route::Program {
                uid: self.uid,
                mark: self.mark,
            },
        }
    }
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file as `srcip run` would before it touches the kernel (host names
    /// resolve, pin sources are addresses of this host); print a summary, or every error as
    /// FILE:LINE:COL: message.
    Validate {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Check the file alone: no name lookups, no look at this host's addresses (for a
        /// policy written for another host, or a build machine).
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        resolver: ResolverArgs,
    },
    /// Watch outbound connections for a while and write the policy that allows exactly the
    /// sources seen per destination (and port and protocol).
    Learn(LearnArgs),
}

#[derive(clap::Args)]
pub struct LearnArgs {
    /// How long to watch; `0` watches until Ctrl-C (SIGINT) or SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Watch only processes in this cgroup v2 directory and below it; repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    cgroups: Vec<String>,
    /// Write the policy here instead of to stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Learn only the connections made in this network namespace: a name of `ip netns`
    /// (`/run/netns/NAME`) or a path such as `/proc/PID/ns/net`.
    #[arg(long, value_name = "NAME|PATH")]
    netns: Option<String>,
}

impl LearnArgs {
    pub fn into_config(self) -> crate::learn::LearnConfig {
        crate::learn::LearnConfig {
            duration: self.duration,
            cgroups: self.cgroups,
            output: self.output,
            netns: self.netns,
        }
    }
}

pub fn default_format() -> Format {
    if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    }
}

/// `1048576`, `512K`, `256M`, `2G`.
fn byte_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => {
            return Err(format!(
                "{text}: expected a number of bytes, with K, M or G"
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(scale))
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("{text}: expected a number of bytes above 0, with K, M or G"))
}

/// The kernel wants a power of two and a multiple of the page size.
fn ring_buffer_size(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .parse()
        .map_err(|_| format!("{text} is not a number of bytes"))?;
    if bytes.is_power_of_two() && bytes >= 4096 {
        Ok(bytes)
    } else {
        Err(format!("{bytes} is not a power of two of at least 4096"))
    }
}
