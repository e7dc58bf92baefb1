//! `cr-ebpf`: always-on checkpoint/restore of live Linux processes.
//!
//! Commands: `check` (what this machine supports), `trace` (the live
//! resource and dirty-page log of a process tree), `dump`, `restore` and
//! `inspect` (checkpoints of single processes), `track` (the always-on
//! service taking incremental checkpoints), `snapshot` (one checkpoint now)
//! and `compact` (keeping chains short); `unlock` (the network lock a
//! dump leaves for its restore); `completions` and `man` (shell
//! completions and the manual page, generated from these definitions).

mod args;
mod check;
mod dump;
mod gate;
mod inspect;
mod netlock;
mod progress;
mod restore;
mod run;
mod snapshot;
mod sys;
mod trace;
mod track;

use clap::{CommandFactory as _, Parser, Subcommand};

/// Always-on checkpoint/restore of live Linux processes, driven by eBPF.
#[derive(Parser)]
#[command(name = "cr-ebpf", version, about, after_help = EXIT_STATUS)]
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
    #[command(
        after_help = "Standard input, output and error that were connected outside the \
                      checkpoint (a pipe or FIFO whose other end was not checkpointed) become \
                      the restorer's own descriptors 0, 1 and 2 (`inspect` lists them as \
                      `inherited`), or with `--inherit-fd N:pipe:[INODE]` its descriptor N. A \
                      unix connection to a named socket outside, taken by `dump --ext-unix-sk`, \
                      is connected to that name again (or given `--inherit-fd \
                      N:socket:[INODE]`). Any other descriptor connected outside is refused at \
                      checkpoint time. Those of 0, 1 and 2 the process did not have are \
                      closed."
    )]
    Restore(restore::Args),
    /// Remove the network lock that holds a dumped process's TCP connections
    /// until its restore (for an image that will not be restored).
    Unlock(netlock::Args),
    /// Show what an image holds, or the chain of an images directory.
    Inspect(inspect::Args),
    /// Track a process and checkpoint it incrementally, every interval and on request.
    Track(track::Args),
    /// Run a command as a service: tracked from its start, restored from its
    /// newest checkpoint when it crashes (`run [OPTIONS] --images-dir DIR -- CMD...`).
    Run(run::Args),
    /// Take a checkpoint now (through the running `track` service, or standalone).
    Snapshot(snapshot::Args),
    /// Rewrite a checkpoint as a full image, or keep only the newest K.
    Compact(snapshot::CompactArgs),
    /// Print shell completions for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        /// An error as one JSON line (the completions are the shell's
        /// script either way).
        #[arg(long)]
        json: bool,
    },
    /// Print cr-ebpf's manual page (roff: `cr-ebpf man > cr-ebpf.1`), or
    /// with `--dir` write it and one page per command (`cr-ebpf-run.1`, ...)
    /// into a directory.
    Man {
        /// Write `cr-ebpf.1` and the commands' pages into this directory
        /// (made when missing) instead of printing the main page.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
        /// With `--dir`, what was written as one JSON line (`{"ok",
        /// "pages": [FILE...]}`); an error as one JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// The exit statuses, as `--help` and the manual page give them.
const EXIT_STATUS: &str = "Exit status: 0 done (`track`: detached, the process running on); \
     1 failed; 2 bad usage; 3 refused (`not supported: WHAT`, the process left running); \
     4 `track`: the tracked process ended; 5 `run`: the service kept crashing, given up \
     (otherwise `run` exits with the service's status, and `restore` without `--detach` with \
     the restored process's). With `--json`, an error is also one JSON line on standard \
     output: {\"ok\": false, \"error\", \"refused\", \"exit\"}.";

/// Exit statuses of `cr-ebpf` (`restore` without `--detach` exits with
/// the restored process's own status instead, 128 + N when signal N
/// killed it).
pub mod exit {
    /// Done as asked (`track`: detached by Ctrl-C, SIGTERM or `--count`).
    pub const OK: u8 = 0;
    /// Failed: an error other than a refusal (the process, if any, is left
    /// running unless the command is one that kills it and had done so).
    pub const FAILED: u8 = 1;
    /// Bad usage: unknown option, missing or malformed value (clap's).
    pub const USAGE: u8 = 2;
    /// Refused: the process holds something cr-ebpf cannot carry exactly
    /// (`not supported: WHAT`); it was left running.
    pub const REFUSED: u8 = 3;
    /// `track`: the tracked process exited or was killed, ending the
    /// service (its checkpoints are kept for a restore).
    pub const TARGET_GONE: u8 = 4;
    /// `run`: the service kept crashing (`--restarts` restores within
    /// `--restart-window`), given up. Otherwise `run` exits with the
    /// service's own status.
    pub const GAVE_UP: u8 = 5;
}

/// Output piped into `head` ends quietly when the reader goes.
fn quiet_sigpipe() {
    // SAFETY: restoring a signal's default action.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The exit status of an error: a refusal or another failure.
fn status_of(e: &anyhow::Error) -> u8 {
    let refused = e
        .chain()
        .any(|c| c.to_string().starts_with("not supported"));
    if refused {
        exit::REFUSED
    } else {
        exit::FAILED
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A command line clap refuses (exit status 2), or `--help` and
/// `--version` (0). With `--json` among the options (before `--`), the
/// error is also one JSON line on standard output, as other errors are.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    // Help and version go to standard output, as asked.
    if !json || !e.use_stderr() {
        e.exit();
    }
    let _ = e.print();
    // clap's message on one line, without its "error: " and the usage
    // and hints after its first blank line.
    let rendered = e.render().to_string();
    let text = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    println!(
        "{}",
        serde_json::json!({
            "ok": false,
            "error": text,
            "refused": false,
            "exit": exit::USAGE,
        })
    );
    std::process::ExitCode::from(exit::USAGE)
}

/// `cr-ebpf man`: the main page on standard output, or every page into
/// `dir`.
fn manual(dir: Option<&std::path::Path>, json: bool) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context as _;
    match dir {
        None => {
            quiet_sigpipe();
            main_page(&mut std::io::stdout())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            let page = dir.join("cr-ebpf.1");
            let mut f = std::fs::File::create(&page)
                .with_context(|| format!("writing {}", page.display()))?;
            main_page(&mut f)?;
            if json {
                let mut pages: Vec<String> = std::fs::read_dir(dir)?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("cr-ebpf") && n.ends_with(".1"))
                    .collect();
                pages.sort();
                println!("{}", serde_json::json!({"ok": true, "pages": pages}));
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The main manual page: clap's sections, with the exit statuses in a
/// section of their own.
fn main_page(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(Cli::command().disable_help_subcommand(true));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for (code, what) in [
        (exit::OK, "done as asked; track detached (Ctrl-C, SIGTERM, --count reached), the process running on"),
        (exit::FAILED, "failed: an error other than a refusal, named on standard error"),
        (exit::USAGE, "bad usage: an unknown option, a missing or malformed value"),
        (exit::REFUSED, "refused (not supported: WHAT): the process holds something a checkpoint cannot carry exactly, and was left running"),
        (exit::TARGET_GONE, "track: the tracked process exited or was killed, ending the service (its checkpoints are kept)"),
        (exit::GAVE_UP, "run: the service kept crashing (--restarts restores within --restart-window), given up; otherwise run exits with the service's own status"),
    ] {
        writeln!(w, ".TP\n{code}\n{what}")?;
    }
    writeln!(
        w,
        ".PP\nrestore without --detach exits with the restored process's status (128 + N when \
         signal N killed it). With --json, an error is also printed as one JSON line on \
         standard output: {{\"ok\": false, \"error\": ..., \"refused\": ..., \"exit\": N}}."
    )?;
    man.render_version_section(w)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CR_EBPF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let json = match &cli.command {
        Command::Check(a) => a.json,
        Command::Trace(a) => a.json,
        Command::Dump(a) => a.json,
        Command::Restore(a) => a.json,
        Command::Inspect(a) => a.json,
        Command::Track(a) => a.json,
        Command::Snapshot(a) => a.json,
        Command::Compact(a) => a.json,
        Command::Run(a) => a.json,
        Command::Unlock(a) => a.json,
        Command::Completions { json, .. } | Command::Man { json, .. } => *json,
    };
    let result = match cli.command {
        Command::Check(args) => check::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Dump(args) => dump::run(&args),
        Command::Restore(args) => restore::run(&args),
        Command::Unlock(args) => netlock::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Track(args) => track::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Snapshot(args) => snapshot::run(&args),
        Command::Compact(args) => snapshot::compact(&args),
        Command::Completions { shell, .. } => {
            quiet_sigpipe();
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cr-ebpf",
                &mut std::io::stdout(),
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Man { dir, json } => manual(dir.as_deref(), json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let status = status_of(&e);
            eprintln!("cr-ebpf: error: {e:#}");
            if json {
                // Machine output stays machine-readable on failure too.
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": false,
                        "error": format!("{e:#}"),
                        "refused": status == exit::REFUSED,
                        "exit": status,
                    })
                );
            }
            std::process::ExitCode::from(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Retention is on by default, by count and by age, for `track` and
    /// `run` alike.
    #[test]
    fn retention_has_defaults_by_count_and_age() {
        let week = Some(std::time::Duration::from_secs(7 * 86400));
        let cli = Cli::try_parse_from(["cr-ebpf", "track", "--pid", "1", "--images-dir", "d"]);
        let Ok(Cli {
            command: Command::Track(a),
        }) = cli
        else {
            panic!("track")
        };
        assert_eq!((a.keep.0, a.keep_for.0), (Some(20), week));
        let cli = Cli::try_parse_from(["cr-ebpf", "run", "--images-dir", "d", "--", "x"]);
        let Ok(Cli {
            command: Command::Run(a),
        }) = cli
        else {
            panic!("run")
        };
        assert_eq!((a.keep.0, a.keep_for.0), (Some(20), week));
        let cli = Cli::try_parse_from([
            "cr-ebpf",
            "track",
            "--pid",
            "1",
            "--images-dir",
            "d",
            "--keep",
            "all",
            "--keep-for",
            "forever",
        ]);
        let Ok(Cli {
            command: Command::Track(a),
        }) = cli
        else {
            panic!("track")
        };
        assert_eq!((a.keep.0, a.keep_for.0), (None, None));
    }
}
