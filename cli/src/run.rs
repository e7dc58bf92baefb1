//! `cr-ebpf run`: a service started, tracked from its start, and brought
//! back from its newest checkpoint when it crashes.
//!
//! `run` is the service's parent (and the subreaper of what it forks): it
//! starts the command (or, with `--resume`, restores the newest checkpoint
//! of the images directory), tracks it as `track` does, and when it ends
//! looks at how: an exit is the service's own decision (`run` exits with
//! its status), a death by a signal (SIGSEGV, SIGKILL, the OOM killer) is
//! a crash, after which the newest checkpoint is restored, with a backoff,
//! a bounded number of times. SIGTERM or SIGINT to `run` is passed on to
//! the service as SIGTERM; `run` then exits with the service's status.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::gate;

/// Options of `cr-ebpf run`.
#[derive(clap::Args)]
pub struct Args {
    /// Where the checkpoints go; kept after `run` ends (`--resume` starts
    /// from the newest).
    #[arg(long)]
    pub images_dir: PathBuf,
    /// Time between checkpoints (as `track --interval`).
    #[arg(long, default_value = "1s", value_parser = crate::args::parse_duration)]
    pub interval: Duration,
    /// Keep the newest K checkpoints (as `track --keep`).
    #[arg(long, default_value = "20", value_name = "K|all", value_parser = crate::args::keep_or_all)]
    pub keep: crate::args::Keep,
    /// Also merge away checkpoints older than this (as `track --keep-for`).
    #[arg(long, default_value = "7d", value_name = "AGE|forever", value_parser = crate::args::keep_for_or_forever)]
    pub keep_for: crate::args::KeepFor,
    /// Keep the images directory under this size (as `track --max-disk`).
    #[arg(long, value_name = "SIZE", value_parser = crate::args::size)]
    pub max_disk: Option<u64>,
    /// Do not copy dirty pages before the freeze (as `track --no-precopy`).
    #[arg(long)]
    pub no_precopy: bool,
    /// Most bytes of one shared memory object stored (as `track
    /// --shm-limit`).
    #[arg(long, default_value = "4G", value_parser = crate::args::size)]
    pub shm_limit: u64,
    /// Serve the counters in Prometheus' text format at this address (as
    /// `track --metrics`; they count from the service's latest start or
    /// restore).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// CPU priority of cr-ebpf's own work (as `track --nice`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,
    /// Start by restoring the newest checkpoint of the images directory,
    /// when it has one (after a reboot, or on another machine), instead of
    /// starting the command.
    #[arg(long)]
    pub resume: bool,
    /// Restores after crashes before giving up (exit status 5); counted
    /// anew once the service has run for `--restart-window`.
    #[arg(long, default_value_t = 5)]
    pub restarts: u32,
    /// Wait before the first restore after a crash, doubled for each next
    /// one (at most a minute).
    #[arg(long, default_value = "1s", value_parser = crate::args::parse_duration)]
    pub backoff: Duration,
    /// How long a restored service must run for its crashes to count anew.
    #[arg(long, default_value = "60s", value_parser = crate::args::parse_duration)]
    pub restart_window: Duration,
    /// Take unix stream connections to named sockets outside (a stdout to
    /// journald), as `track --ext-unix-sk`.
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Checkpoint reports as JSON lines (as `track --json`), and an error
    /// as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments (after `--`). It runs in a session of
    /// its own with standard input from /dev/null and `run`'s standard
    /// output and error; it must not daemonize (it is the service).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// How the service ended one round of tracking.
enum Ended {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
    /// `run` was told to stop; the service was asked to end, with this
    /// exit status for `run`.
    Stopped(u8),
}

pub fn run(args: &Args) -> Result<ExitCode> {
    // What the service forks is ours to reap when it is orphaned.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Held for the whole run: a SIGTERM or SIGINT that comes between two
    // rounds (a restore, a backoff) is not lost.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    // Checkpoints numbered above this one are of the service as it runs
    // now: a crash restores the newest of them, or starts the command
    // anew when there is none yet (not one of an earlier run of it).
    let mut ours_after = newest(args);
    let (mut pid, mut gate) = if args.resume && ours_after > 0 {
        ours_after -= 1;
        (restore(args)?, None)
    } else {
        start(args)?
    };
    let mut restarts = 0u32;
    let mut since = Instant::now();
    loop {
        let ended = rt.block_on(async {
            tokio::select! {
                r = round(args, pid, gate.take()) => r,
                _ = term.recv() => stop(pid).await,
                _ = int.recv() => stop(pid).await,
            }
        })?;
        let sig = match ended {
            Ended::Exited(code) => {
                eprintln!("cr-ebpf: the service (pid {pid}) exited with status {code}");
                return Ok(ExitCode::from(code.clamp(0, 255) as u8));
            }
            Ended::Stopped(code) => return Ok(ExitCode::from(code)),
            Ended::Killed(sig) => sig,
        };
        if since.elapsed() >= args.restart_window {
            restarts = 0;
        }
        if restarts >= args.restarts {
            eprintln!(
                "cr-ebpf: the service (pid {pid}) was killed by signal {sig} after {restarts} \
                 restore(s) within {:?}: giving up",
                args.restart_window
            );
            return Ok(ExitCode::from(crate::exit::GAVE_UP));
        }
        let wait = (args.backoff * 2u32.saturating_pow(restarts)).min(Duration::from_secs(60));
        let checkpointed = newest(args) > ours_after;
        eprintln!(
            "cr-ebpf: the service (pid {pid}) was killed by signal {sig}: {} in {wait:?} \
             (restart {} of at most {})",
            if checkpointed {
                "restoring its newest checkpoint"
            } else {
                "no checkpoint of it yet, starting the command again"
            },
            restarts + 1,
            args.restarts
        );
        std::thread::sleep(wait);
        restarts += 1;
        since = Instant::now();
        (pid, gate) = if checkpointed {
            (restore(args)?, None)
        } else {
            ours_after = newest(args);
            start(args)?
        };
    }
}

/// The number of the newest checkpoint of the images directory (0: none).
fn newest(args: &Args) -> u64 {
    cr_ebpf_image::images_dir::list(&args.images_dir)
        .ok()
        .and_then(|l| l.last().map(|e| e.seq))
        .unwrap_or(0)
}

/// Starts the command as the service: forked, waiting at its exec until
/// `track` lets it go (see [`gate`]), so that it is tracked from its
/// first instruction.
fn start(args: &Args) -> Result<(i32, Option<gate::Gate>)> {
    let g = gate::Gate::fork(&args.command)?;
    eprintln!(
        "cr-ebpf: started the service, pid {}: {:?}",
        g.pid, args.command
    );
    Ok((g.pid, Some(g)))
}

/// Restores the newest checkpoint; the restored service is our child.
fn restore(args: &Args) -> Result<i32> {
    let bar = crate::progress::Bar::start(!args.json);
    let r = cr_ebpf_restore::restore(&args.images_dir, &Default::default());
    drop(bar);
    let r = r.with_context(|| {
        format!(
            "restoring the newest checkpoint of {}",
            args.images_dir.display()
        )
    })?;
    eprintln!(
        "cr-ebpf: restored the service, pid {}, from {}",
        r.pid,
        r.image.display()
    );
    Ok(r.pid)
}

/// Tracks the service until it ends or `run` is told to stop; a service
/// just started is let go at its exec once it is tracked.
async fn round(args: &Args, pid: i32, gate: Option<gate::Gate>) -> Result<Ended> {
    let targs = crate::track::Args {
        pid,
        images_dir: args.images_dir.clone(),
        interval: args.interval,
        keep: args.keep,
        keep_for: args.keep_for,
        max_disk: args.max_disk,
        no_precopy: args.no_precopy,
        ext_unix_sk: args.ext_unix_sk,
        shm_limit: args.shm_limit,
        metrics: args.metrics,
        nice: args.nice,
        count: None,
        json: args.json,
        gate: std::sync::Mutex::new(gate),
    };
    let code = match crate::track::track(&targs).await {
        Ok(code) => code,
        // Its exec failed: it never ran (and is reaped).
        Err(e) if e.chain().any(|c| c.is::<gate::StartFailed>()) => return Err(e),
        Err(e) => {
            // Ended under it (a crash before the first checkpoint): a
            // round like any other.
            if let Some(ended) = ended(pid, Duration::from_millis(500)) {
                return Ok(ended);
            }
            // Not trackable (refused, say): the service is not left
            // running unsupervised.
            eprintln!("cr-ebpf: the service (pid {pid}) cannot be tracked: {e:#}");
            stop(pid).await?;
            return Err(e);
        }
    };
    if code == crate::exit::OK {
        // Interrupted or terminated: the service goes too.
        return stop(pid).await;
    }
    wait(pid, Duration::from_secs(10))
}

/// Asks the service to end (SIGTERM; SIGKILL after 30 s) and reaps it.
async fn stop(pid: i32) -> Result<Ended> {
    eprintln!("cr-ebpf: stopping the service (pid {pid}) with SIGTERM");
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait(pid, Duration::from_secs(30))?;
    Ok(Ended::Stopped(match status {
        Ended::Exited(c) => c.clamp(0, 255) as u8,
        Ended::Killed(libc::SIGTERM) => crate::exit::OK,
        Ended::Killed(s) => 128 + s as u8,
        Ended::Stopped(c) => c,
    }))
}

/// How the service ended, if it does within `within` (reaped then).
fn ended(pid: i32, within: Duration) -> Option<Ended> {
    let deadline = Instant::now() + within;
    loop {
        // SAFETY: an all-zero siginfo_t is valid (waitid fills it).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our child, WNOWAIT: it is left to reap.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid of the siginfo waitid filled (0: not ended).
        if r == 0 && unsafe { info.si_pid() } == pid {
            // It has ended: reaped at once.
            return wait(pid, Duration::from_secs(10)).ok();
        }
        if r != 0 {
            // Reaped already: by track's own wait for a ptrace stop.
            return reaped(pid);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the service ended if tracking it reaped it: a tracer that is also
/// the parent gets its child's exit when it waits for a ptrace stop.
fn reaped(pid: i32) -> Option<Ended> {
    Some(match cr_ebpf_tracee::take_reaped(pid)? {
        cr_ebpf_tracee::Ending::Exited(c) => Ended::Exited(c),
        cr_ebpf_tracee::Ending::Killed(s) => Ended::Killed(s),
    })
}

/// Reaps the service; SIGKILL after `grace`. Then what else ended.
fn wait(pid: i32, grace: Duration) -> Result<Ended> {
    let deadline = Instant::now() + grace;
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            if let Some(ended) = reaped(pid) {
                return Ok(ended);
            }
            bail!(
                "waiting for the service (pid {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
        if Instant::now() >= deadline {
            // SAFETY: plain kill of our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Orphans reparented to us.
    // SAFETY: reaping without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    Ok(if libc::WIFSIGNALED(status) {
        Ended::Killed(libc::WTERMSIG(status))
    } else {
        Ended::Exited(libc::WEXITSTATUS(status))
    })
}
