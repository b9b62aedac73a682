//! srcip: audits the source address the kernel chooses for outbound connections.
//!
//! This file wires the subcommands and owns the exit codes: 0 success, 1 runtime failure,
//! 2 bad usage or bad policy, 3 `check` found a destination whose predicted source is not
//! allowed.

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
};

use clap::Parser as _;
use srcip_userspace::{
    cgroup, check,
    cli::{self, Cli, Command, PolicyCommand},
    delivery, demo, features, learn,
    output::counted,
    policy::{self, PolicyLoadError, ResolvConfError},
    run,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_env("SRCIP_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    // A one-shot command whose reader stopped reading (`srcip check | head`) has nothing
    // left to say to anyone: a quiet success. `run` is not one: a daemon whose output went
    // away must be restarted (exit 1, see `run.rs`).
    let one_shot = !matches!(cli.command, Command::Run(_) | Command::Demo);
    let result = match cli.command {
        Command::Check(args) => {
            match runtime().and_then(|rt| rt.block_on(check::check(args.into_config()))) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::from(3),
                Err(error) => Err(error),
            }
        }
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(run::run(args.into_config()))),
        Command::Policy(PolicyCommand::Validate {
            file,
            offline,
            resolver,
        }) => validate(&file, offline, resolver.resolv_conf.as_deref()),
        Command::Policy(PolicyCommand::Learn(args)) => {
            runtime().and_then(|rt| rt.block_on(learn::learn(args.into_config())))
        }
        Command::Watch { socket, format } => {
            delivery::watch(&socket, format.unwrap_or_else(cli::default_format))
        }
        Command::Status { socket, format } => {
            delivery::status(&socket, format.unwrap_or_else(cli::default_format))
        }
        Command::Demo => runtime().and_then(|rt| rt.block_on(demo::demo())),
        Command::Completions { shell } => shell.print_completions().map_err(Into::into),
        Command::Manpages { dir } => cli::write_man_pages(&dir).map_err(|error| {
            anyhow::anyhow!("cannot write man pages to {}: {error}", dir.display())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if one_shot && closed_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(invalid @ PolicyLoadError::Invalid { .. }) = error.downcast_ref() {
                // Exactly the FILE:LINE:COL lines, so editors and CI can jump to them.
                eprintln!("{invalid}");
            } else if let Some(missing) = error.downcast_ref::<features::MissingFeatures>() {
                // One error line per missing feature.
                for line in missing.to_string().lines() {
                    eprintln!("srcip: error: {line}");
                }
            } else {
                eprintln!("srcip: error: {error:#}");
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Whether `error` is a write to a pipe whose reader has gone (EPIPE).
fn closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// 2 when the operator must fix an input (policy, flags), 1 for everything else.
fn exit_code(error: &anyhow::Error) -> u8 {
    let bad_input = error.chain().any(|cause| {
        cause.is::<PolicyLoadError>()
            || cause.is::<cgroup::ScopeError>()
            || cause.is::<ResolvConfError>()
    });
    if bad_input { 2 } else { 1 }
}

/// `srcip policy validate`: the file's own checks; unless `offline`, also those `run` makes
/// of the host before it touches the kernel.
fn validate(
    file: &std::path::Path,
    offline: bool,
    resolv_conf: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let policy = policy::load(file)?;
    if !offline {
        runtime()?.block_on(run::check_policy_on_host(file, resolv_conf))?;
    }
    let destinations: usize = policy
        .rules
        .iter()
        .map(|rule| rule.destinations.len())
        .sum();
    writeln!(
        std::io::stdout(),
        "{}: valid: {}, {}, unmatched connections are {}",
        file.display(),
        counted(policy.rules.len(), "rule", "rules"),
        counted(destinations, "destination", "destinations"),
        match policy.unmatched {
            policy::Unmatched::Ignore => "ignored",
            policy::Unmatched::Alert => "alerted",
        }
    )?;
    Ok(())
}
