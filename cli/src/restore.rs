//! `cr-ebpf restore`: rebuild a process from an image.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use cr_ebpf_restore::{restore, RestoreOptions, TimeNamespace};
use nix::{
    sys::wait::{waitpid, WaitStatus},
    unistd::Pid,
};

/// Options of `cr-ebpf restore`.
#[derive(clap::Args)]
pub struct Args {
    /// The image to restore, or an images directory (then its newest
    /// checkpoint, or the one named by --checkpoint).
    #[arg(long)]
    pub images_dir: PathBuf,
    /// In an images directory, the checkpoint to restore (`ckpt-000007` or `7`).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Return once the process runs instead of waiting for it to exit
    /// (with --lazy, once its memory is all in).
    #[arg(long)]
    pub detach: bool,
    /// Start the process before its memory is in: its private anonymous
    /// pages are loaded when it first touches them and in the background
    /// meanwhile (userfaultfd), the newest checkpoint's first. cr-ebpf
    /// stays until every page is in (SIGINT and SIGTERM wait for that):
    /// killed before, the process would read zeroes where pages were still
    /// due. A damaged chunk found after the start kills the process. One
    /// process only (not a tree).
    #[arg(long)]
    pub lazy: bool,
    /// Threads filling memory (default: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::args::threads)]
    pub threads: usize,
    /// Close the process's established TCP connections (their peers get a
    /// reset) instead of re-establishing them.
    #[arg(long)]
    pub close_connections: bool,
    /// When to give the process a time namespace whose CLOCK_MONOTONIC and
    /// CLOCK_BOOTTIME go on from the checkpoint's: `auto` (when this
    /// machine's clocks are behind them: after a reboot, on another
    /// machine), `always`, `never`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub time_namespace: String,
    /// Restore a shell job (an image taken with `dump --shell-job`): the
    /// process joins cr-ebpf's session and controlling terminal (it does
    /// not take the session; it leads a process group of its own again if
    /// it led one, else it joins cr-ebpf's), and its descriptors on its old
    /// terminal get new open files of cr-ebpf's standard input, which must
    /// be cr-ebpf's controlling terminal. A job that was its terminal's
    /// foreground job gets the foreground of ours when we have it (as a
    /// shell's `fg`), and we take it back when it ends (with --detach, the
    /// shell does). Such an image is refused without it.
    #[arg(long)]
    pub shell_job: bool,
    /// Put the restored tree under another cgroup: the root process's
    /// cgroup in the hierarchy of CONTROLLER (`cpu`, `name=systemd`,
    /// `cgroup2` for v2; none: every hierarchy not named otherwise)
    /// becomes PATH, the other processes keep their place below it.
    /// Missing directories are created. Repeatable.
    #[arg(long, value_name = "[CONTROLLER:]PATH")]
    pub cgroup_root: Vec<cr_ebpf_restore::CgroupRoot>,
    /// Give the restored process cr-ebpf's own descriptor N wherever it
    /// held the outside object NAME, as `cr-ebpf inspect` names it: a
    /// standard stream connected outside (`pipe:[INODE]`, otherwise the
    /// restorer's own 0, 1 or 2), a unix connection to a socket outside
    /// (`socket:[INODE]`, otherwise connected to its name again). A name
    /// the image does not hold is refused. Repeatable.
    #[arg(long, value_name = "N:NAME", value_parser = inherit_fd)]
    pub inherit_fd: Vec<(i32, String)>,
    /// Print what the restore did (pid, pages, time per phase) as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    // (Its errors name the path.)
    let locks = crate::netlock::locks_of(&args.images_dir, args.checkpoint.as_deref())?;
    // Restore removes them once the connections exist again; one already
    // gone let the peers' packets through meanwhile.
    let gone: Vec<&String> = locks
        .iter()
        .filter(|n| !cr_ebpf_loader::netlock::exists(n))
        .collect();
    let bar = crate::progress::Bar::start(!args.json);
    let r = restore(
        &args.images_dir,
        &RestoreOptions {
            threads: args.threads,
            checkpoint: args.checkpoint.clone(),
            close_connections: args.close_connections,
            shell_job: args.shell_job,
            time_namespace: match args.time_namespace.as_str() {
                "always" => TimeNamespace::Always,
                "never" => TimeNamespace::Never,
                _ => TimeNamespace::Auto,
            },
            cgroup_roots: args.cgroup_root.clone(),
            inherit_fds: args
                .inherit_fd
                .iter()
                .map(|(n, name)| (name.clone(), *n))
                .collect(),
            lazy: args.lazy,
        },
    );
    drop(bar);
    let r = r
        .with_context(|| format!("restoring {}", args.images_dir.display()))
        .inspect_err(|_| {
            // As a failed `criu restore`: a lock not removed yet stays, for
            // another try.
            for name in locks.iter().filter(|n| cr_ebpf_loader::netlock::exists(n)) {
                eprintln!(
                    "cr-ebpf: the network lock {name} still holds the process's TCP connections: \
                 restore again, or `cr-ebpf unlock --images-dir {}` lets them go",
                    args.images_dir.display()
                );
            }
        })?;
    if let Err(e) = crate::netlock::release(&locks, &gone) {
        eprintln!("cr-ebpf: {e:#}");
    }
    eprintln!(
        "cr-ebpf: restored pid {} from {} ({} pages filled in {:.1} ms by {} workers, {:.1} ms in all)",
        r.pid,
        r.image.display(),
        r.pages,
        r.fill.as_secs_f64() * 1e3,
        r.workers,
        r.total.as_secs_f64() * 1e3
    );
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|p| format!("{} {:.1}", p.name, p.time.as_secs_f64() * 1e3))
        .collect();
    eprintln!("cr-ebpf: restore phases (ms): {}", phases.join(", "));
    if !r.cgroups_made.is_empty() {
        eprintln!(
            "cr-ebpf: cgroups that were gone were made again, without the settings they had: {}",
            r.cgroups_made.join(", ")
        );
    }
    if let Some((mono, boot)) = r.time_offsets {
        eprintln!(
            "cr-ebpf: restored into a new time namespace: CLOCK_MONOTONIC +{:.3} s, CLOCK_BOOTTIME +{:.3} s",
            mono as f64 / 1e9,
            boot as f64 / 1e9
        );
    }
    if args.json {
        let phases: serde_json::Map<String, serde_json::Value> = r
            .phases
            .iter()
            .map(|p| (p.name.to_string(), (p.time.as_secs_f64() * 1e3).into()))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "pid": r.pid,
                "image": r.image,
                "pages": r.pages,
                "direct_pages": r.direct_pages,
                "workers": r.workers,
                "fill_ms": r.fill.as_secs_f64() * 1e3,
                "total_ms": r.total.as_secs_f64() * 1e3,
                "phases_ms": phases,
                "cgroups_made": r.cgroups_made,
                "time_offsets_ns": r.time_offsets.map(|(m, b)| serde_json::json!({"monotonic": m, "boottime": b})),
            })
        );
    }
    if let Some(fill) = &r.lazy {
        wait_lazy(fill, r.pid, args.json)?;
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let status = waitpid(Pid::from_raw(r.pid), None).context("waiting for the restored process");
    if args.shell_job {
        take_terminal_back();
    }
    match status? {
        WaitStatus::Exited(_, code) => Ok(ExitCode::from(code as u8)),
        WaitStatus::Signaled(_, sig, _) => {
            eprintln!(
                "cr-ebpf: the restored process {} was killed by {sig}",
                r.pid
            );
            Ok(ExitCode::from(128 + sig as u8))
        }
        other => {
            eprintln!(
                "cr-ebpf: the restored process {} ended with {other:?}",
                r.pid
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// A shell job may have had the foreground of our terminal: take it back
/// for our own process group before the shell sees us end.
fn take_terminal_back() {
    // SAFETY: signal dispositions and terminal calls on our own stdin.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(0, libc::getpgrp());
        libc::signal(libc::SIGTTOU, old);
    }
}

/// `N:NAME` of `--inherit-fd`: an open descriptor of ours and the name of
/// an outside object (`pipe:[INODE]`, `socket:[INODE]`).
fn inherit_fd(s: &str) -> Result<(i32, String), String> {
    let (n, name) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not N:NAME (`3:socket:[12345]`)"))?;
    let n: i32 = n
        .parse()
        .map_err(|_| format!("{n:?} is not a descriptor number"))?;
    let inode = ["pipe:[", "socket:["]
        .iter()
        .find_map(|p| name.strip_prefix(p)?.strip_suffix(']'));
    if !inode.is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!(
            "{name:?} is not an outside object as `cr-ebpf inspect` names it \
             (`pipe:[INODE]`, `socket:[INODE]`)"
        ));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return Err(format!("descriptor {n} is not open in cr-ebpf"));
    }
    Ok((n, name.to_string()))
}

/// Waits for a lazy restore's fill, SIGINT, SIGTERM and SIGHUP held until
/// it ends (they would leave the pages still due to read as zeroes).
fn wait_lazy(fill: &cr_ebpf_restore::LazyFill, pid: i32, json: bool) -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut held = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        held.add(s);
    }
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held), Some(&mut old))
        .context("holding signals during the lazy fill")?;
    let bar = crate::progress::Bar::start(!json);
    let r = fill.wait();
    drop(bar);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    let r = r.with_context(|| format!("loading the memory of process {pid} (it was killed)"))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "pid": pid,
                "lazy_fill": {
                    "pages": r.pages,
                    "faults": r.faults,
                    "worst_fault_ms": r.worst_fault.as_secs_f64() * 1e3,
                    "took_ms": r.took.as_secs_f64() * 1e3,
                },
            })
        );
    } else {
        eprintln!(
            "cr-ebpf: all memory of pid {pid} in after {:.1} ms ({} pages, {} faults answered, \
             the slowest in {:.2} ms)",
            r.took.as_secs_f64() * 1e3,
            r.pages,
            r.faults,
            r.worst_fault.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
