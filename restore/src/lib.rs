//! The restorer: rebuilds a process from an image, with its original pid,
//! memory layout and registers, filling pages on all cores.
//!
//! How, without a parasite blob:
//! 1. The image is verified first (manifests, page store headers): a
//!    damaged one fails before anything is started. Each chunk of pages is
//!    checked as it is filled (format 1.10 reads a store once): a damaged
//!    one fails the restore before the process runs, its stub killed.
//! 2. A stub is forked with `clone3(set_tid = [original pid])`. It maps a
//!    two-page trampoline (a `syscall; int3` code page and a data page) at
//!    an address free in both layouts, then stops under ptrace.
//! 3. Through syscalls injected at the trampoline, everything else of the
//!    stub is unmapped, its vDSO moved to the recorded address, and the
//!    recorded mappings created (`MAP_FIXED`; files opened by path).
//! 4. Pages are decompressed and written with `process_vm_writev` on all
//!    cores, then each mapping gets its final protection.
//! 5. mm fields and auxv are set with `PR_SET_MM_MAP`, the signal mask,
//!    FPU state and registers restored (a thread stopped inside a syscall
//!    redoes it), the trampoline unmapped, and the process let go.
//!
//! Covered: processes with any number of threads whose memory is private
//! (anonymous or file-backed), their descriptors (files, devices, pipes;
//! 0-2 inherited from `cr-ebpf restore`), signal handlers and timers; from
//! a single image or any checkpoint of a chain. Process trees, sockets and
//! shared memory come next.

mod build;
mod inherit;
mod lazy;
mod policy;
mod reap;
mod release;
mod stub;
mod tree;
mod zombie;

use std::{path::Path, time::Duration, time::Instant};

use cr_ebpf_image::{images_dir, Chain, Manifest, MappingKind};
pub use cr_ebpf_resources::{process::cgroup::NewRoot as CgroupRoot, RestoreError};
pub use lazy::{LazyFill, LazyReport};

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Pid of the restored process.
    pub pid: i32,
    /// The image restored (in an images directory, the checkpoint's).
    pub image: std::path::PathBuf,
    /// Pages written.
    pub pages: u64,
    /// Of them, pages read past the page cache (`O_DIRECT`: a store mostly
    /// not in the page cache is read that way, in file order).
    pub direct_pages: u64,
    /// Time to fill the pages.
    pub fill: Duration,
    /// The whole restore, until the process runs.
    pub total: Duration,
    /// Threads that filled pages.
    pub workers: usize,
    /// Where the time went, phase by phase, in order (they add up to `total`).
    pub phases: Vec<Phase>,
    /// The new time namespace's `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME`
    /// offsets (ns), when the process was restored into one.
    pub time_offsets: Option<(u64, u64)>,
    /// Cgroups that were gone and were made again, without the settings
    /// they had (`CONTROLLERS:PATH`, `cgroup2` for v2).
    pub cgroups_made: Vec<String>,
    /// A lazy restore's fill, running: wait for it ([`LazyFill::wait`])
    /// before this program exits, or the pages not yet in read as zeroes.
    pub lazy: Option<LazyFill>,
}

/// One phase of a restore and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Phase {
    /// What was done: `read` (open and verify the chain), `preflight`,
    /// `stub` (fork it with the pid and take it over), `clear` (unmap the
    /// stub's own memory), `vdso`, `map` (the recorded layout), `fill`
    /// (pages), `mm` (protections, mm fields, auxv), `process` (cwd,
    /// limits, signal handlers), `fds`, `threads` (with their state),
    /// `signals` (pending, timers), `resume` (masks, registers, detach).
    pub name: &'static str,
    pub time: Duration,
}

/// Times consecutive phases.
pub(crate) struct Clock {
    last: Instant,
    phases: Vec<Phase>,
}

impl Clock {
    pub(crate) fn new(start: Instant) -> Self {
        Self {
            last: start,
            phases: Vec::new(),
        }
    }

    /// Ends the phase `name`, which began where the previous one ended. A
    /// phase met again (once per process of a tree) adds up.
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let time = now - self.last;
        match self.phases.iter_mut().find(|p| p.name == name) {
            Some(p) => p.time += time,
            None => self.phases.push(Phase { name, time }),
        }
        self.last = now;
    }
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Threads filling pages (0: all cores).
    pub threads: usize,
    /// In an images directory, the checkpoint to restore (name or number);
    /// `None` takes the newest.
    pub checkpoint: Option<String>,
    /// Close established TCP connections (their peers get a reset, the
    /// process a broken connection) instead of re-establishing them.
    pub close_connections: bool,
    /// When to restore into a new time namespace.
    pub time_namespace: TimeNamespace,
    /// Restore a shell job: in our session, with our terminal.
    pub shell_job: bool,
    /// `--cgroup-root`: where the root process's cgroups go instead of
    /// the recorded ones (the others keep their place below them).
    pub cgroup_roots: Vec<CgroupRoot>,
    /// `--inherit-fd`: our descriptor for each outside object the image
    /// names (`pipe:[INODE]`, `socket:[INODE]`), given to the restored
    /// processes wherever they held it.
    pub inherit_fds: Vec<(String, std::os::fd::RawFd)>,
    /// Lazy restore: the process runs before its private anonymous memory
    /// is in; the pages arrive on demand and in the background (see
    /// [`RestoreReport::lazy`]). A single process only.
    pub lazy: bool,
}

/// When the restored process gets a time namespace of its own, whose
/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` go on from their values at the
/// checkpoint. The restorer itself moves there for the children it makes
/// from then on (`unshare(CLONE_NEWTIME)`), so a long-lived caller should
/// leave it at `Never`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TimeNamespace {
    /// Only when the clocks here are behind the checkpoint's (a restore
    /// after a reboot or on another machine): the process would see them
    /// go backwards.
    Auto,
    /// Always (offsets of zero when the clocks here are ahead).
    Always,
    /// Never: the clocks are this machine's (the default for the library).
    #[default]
    Never,
}

/// Fails when `pid` is taken, naming what holds it.
pub(crate) fn pid_free(pid: i32) -> Result<(), RestoreError> {
    if let Ok(status) = cr_ebpf_resources::proc::Status::of(pid) {
        let field = |k: &str| status.field(k).unwrap_or_default().to_string();
        let comm = if field("State").starts_with('Z') {
            format!(
                "{}, a zombie its parent pid {} has not reaped",
                field("Name"),
                field("PPid")
            )
        } else {
            field("Name")
        };
        return Err(RestoreError::PidInUse { pid, comm });
    }
    Ok(())
}

/// Checks everything that can be checked before anything is started.
pub(crate) fn preflight(m: &Manifest, opts: &RestoreOptions) -> Result<(), RestoreError> {
    // SAFETY: getres[ug]id write three ids each.
    let ours = unsafe {
        let (mut r, mut e, mut s) = (0, 0, 0);
        let (mut gr, mut ge, mut gs) = (0, 0, 0);
        libc::getresuid(&mut r, &mut e, &mut s);
        libc::getresgid(&mut gr, &mut ge, &mut gs);
        [
            r,
            e,
            s,
            libc::setfsuid(u32::MAX) as u32,
            gr,
            ge,
            gs,
            libc::setfsgid(u32::MAX) as u32,
        ]
    };
    policy::credentials(
        m,
        ours,
        &cr_ebpf_resources::process::creds::ours()?,
        cr_ebpf_tracee::can_suspend_seccomp(),
    )?;
    pid_free(m.process.pid)?;
    if cr_ebpf_resources::process::terminal::needs_shell_job(m) {
        if !opts.shell_job {
            return Err(RestoreError::NotSupported(format!(
                "process {} was checkpointed as a shell job (its session and terminal were \
                 its shell's): restore it with --shell-job, which puts it in cr-ebpf's \
                 session with cr-ebpf's terminal",
                m.process.pid
            )));
        }
        cr_ebpf_resources::process::terminal::check_shell_job_terminal()?;
    }
    cr_ebpf_resources::fd::preflight(m)?;
    for map in &m.mappings {
        if map.flags & cr_ebpf_image::MAP_SHARED != 0
            && !matches!(map.kind, MappingKind::File | MappingKind::Shmem)
        {
            return Err(RestoreError::NotSupported(format!(
                "shared anonymous memory at {:#x}",
                map.start
            )));
        }
        if map.kind == MappingKind::File {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&map.path).map_err(|e| RestoreError::File {
                path: map.path.clone(),
                what: format!("cannot be opened: {e}"),
            })?;
            if meta.ino() != map.inode {
                return Err(RestoreError::File {
                    path: map.path.clone(),
                    what: format!(
                        "was replaced since the checkpoint (inode {} now, {} then)",
                        meta.ino(),
                        map.inode
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Moves the restorer's future children into a new time namespace whose
/// clocks continue from the checkpoint's, when `mode` asks for it; returns
/// the offsets.
pub(crate) fn time_namespace(
    p: &cr_ebpf_image::ProcessInfo,
    mode: TimeNamespace,
) -> Result<Option<(u64, u64)>, RestoreError> {
    let (mono, boot) = (
        cr_ebpf_resources::proc::clock_ns(libc::CLOCK_MONOTONIC),
        cr_ebpf_resources::proc::clock_ns(libc::CLOCK_BOOTTIME),
    );
    let behind = p.monotonic_ns > mono || p.boottime_ns > boot;
    let wanted = match mode {
        TimeNamespace::Never => false,
        TimeNamespace::Always => true,
        TimeNamespace::Auto => behind,
    };
    if !wanted {
        return Ok(None);
    }
    let offsets = (
        p.monotonic_ns.saturating_sub(mono),
        p.boottime_ns.saturating_sub(boot),
    );
    // SAFETY: plain syscall; only children made from now on enter it.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(RestoreError::Syscall {
            call: "unshare(CLONE_NEWTIME) (a time namespace, so the clocks do not go back)".into(),
            err: std::io::Error::last_os_error(),
        });
    }
    let text = format!(
        "monotonic {} {}\nboottime {} {}\n",
        offsets.0 / 1_000_000_000,
        offsets.0 % 1_000_000_000,
        offsets.1 / 1_000_000_000,
        offsets.1 % 1_000_000_000
    );
    std::fs::write("/proc/self/timens_offsets", text).map_err(|err| RestoreError::Syscall {
        call: "writing /proc/self/timens_offsets".into(),
        err,
    })?;
    Ok(Some(offsets))
}

/// Restores the image in `dir`, or, when `dir` is an images directory,
/// its checkpoint `opts.checkpoint` (default: the newest), resolving pages
/// through the checkpoint's parents. Returns once the process runs; it is a
/// child of the caller (wait for it with `waitpid`).
pub fn restore(dir: &Path, opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    let start = Instant::now();
    let mut clock = Clock::new(start);
    cr_ebpf_image::trust::check_trusted(dir)?;
    let dir = images_dir::locate(dir, opts.checkpoint.as_deref())?;
    if cr_ebpf_image::tree::is_tree(&dir) {
        if opts.lazy {
            return Err(RestoreError::NotSupported(
                "--lazy for a process tree: restore it without --lazy".into(),
            ));
        }
        return tree::restore_tree(&dir, opts, start, clock);
    }
    // Reads the image and its ancestors, maps their page stores and checks
    // their headers before anything is started.
    cr_ebpf_image::progress::start("reading the image", 0);
    let mut chain = Chain::open(&dir)?;
    chain.load_shmem()?;
    let chain = std::sync::Arc::new(chain);
    if opts.lazy {
        // What the process needs before it runs, read while it is built.
        chain.read_ahead();
        lazy::prefetch(&chain);
    }
    clock.mark("read");
    let manifest = chain.manifest();
    preflight(manifest, opts)?;
    let time_offsets = time_namespace(&manifest.process, opts.time_namespace)?;
    clock.mark("preflight");
    let workers = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let (pid, filled, cgroups_made, lazy) =
        restore_single(manifest, &chain, workers, opts, &mut clock)?;
    Ok(RestoreReport {
        pid,
        image: dir,
        pages: filled.pages,
        direct_pages: filled.direct_pages,
        fill: filled.took,
        total: clock.last - start,
        workers,
        phases: clock.phases,
        time_offsets,
        cgroups_made,
        lazy,
    })
}

/// What filling a process's memory did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Filled {
    /// Pages of its image.
    pub(crate) pages: u64,
    /// Of them, pages read past the page cache (a cold store, see
    /// `direct.rs`).
    pub(crate) direct_pages: u64,
    /// Time taken.
    pub(crate) took: std::time::Duration,
}

impl std::ops::AddAssign for Filled {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.direct_pages += o.direct_pages;
        self.took += o.took;
    }
}

/// What [`restore_single`] returns: (pid, what filling its memory did,
/// cgroups made, a lazy fill running).
type Single = (i32, Filled, Vec<String>, Option<LazyFill>);

/// Rebuilds one process: a stub with its pid, its whole state, then it
/// runs. Returns (pid, what filling its memory did, cgroups made, a lazy fill).
fn restore_single(
    m: &Manifest,
    chain: &std::sync::Arc<Chain>,
    workers: usize,
    opts: &RestoreOptions,
    clock: &mut Clock,
) -> Result<Single, RestoreError> {
    let (tramp, vdso_tmp) = stub::addresses(&[m])?;
    let mut natives = stub::Natives::build(&[m], opts)?;
    if opts.lazy {
        natives.lazy = Some(chain.clone());
    }
    let (t, guard) = stub::spawn_root(m.process.pid, tramp)?;
    let pid = m.process.pid;
    natives.cgroups.enter(pid).map_err(|e| e.in_process(pid))?;
    stub::enter_namespaces(
        &t,
        tramp,
        &m.process,
        Default::default(),
        &mut Default::default(),
    )
    .map_err(|e| e.in_process(pid))?;
    // Its session and controlling terminal before anything else.
    if m.process.sid == pid {
        stub::stub_syscall(&t, tramp, "setsid", libc::SYS_setsid, [0; 6])?;
    } else if m.process.pgid == pid {
        stub::stub_syscall(&t, tramp, "setpgid", libc::SYS_setpgid, [0; 6])?;
    }
    stub::terminal(&t, tramp, &natives, &m.process)?;
    stub::foreground(&t, tramp, &m.process)?;
    let ready = build::build_in(
        t, guard, m, chain, workers, &natives, clock, tramp, vdso_tmp,
    )
    .map_err(|e| e.in_process(pid))?;
    // The restorer's own ends of pipes and FIFOs go before the process
    // runs: it must not see a reader or writer more than it had.
    let made = natives.cgroups.made.clone();
    let lazy = natives.lazy_fill.lock().expect("not poisoned").take();
    drop(natives);
    if let Some(l) = &lazy {
        l.guarded().map_err(|e| e.in_process(pid))?;
    }
    let (pid, filled) = release::release(ready).map_err(|e| e.in_process(pid))?;
    if let Some(l) = &lazy {
        l.go();
    }
    clock.mark("resume");
    Ok((pid, filled, made, lazy))
}
