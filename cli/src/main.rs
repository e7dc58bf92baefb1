//! `cr-ebpf`: always-on checkpoint/restore of live Linux processes.
//!
//! Commands so far: `check` (what this machine supports), `trace` (the live
//! resource and dirty-page log of a process tree), `dump`, `restore` and
//! `inspect` (full checkpoints of single processes).

mod check;
mod dump;
mod inspect;
mod restore;
mod sys;
mod trace;

use clap::{Parser, Subcommand};

/// Always-on checkpoint/restore of live Linux processes, driven by eBPF.
#[derive(Parser)]
#[command(name = "cr-ebpf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Probe the kernel and privileges for everything cr-ebpf relies on.
    Check(check::Args),
    /// Print the live log of a process tree's resource changes and write faults.
    Trace(trace::Args),
    /// Checkpoint a live process into a new image directory.
    Dump(dump::Args),
    /// Rebuild a process from an image, with its original pid.
    Restore(restore::Args),
    /// Show what an image holds.
    Inspect(inspect::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CR_EBPF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Dump(args) => dump::run(&args),
        Command::Restore(args) => restore::run(&args),
        Command::Inspect(args) => inspect::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cr-ebpf: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
