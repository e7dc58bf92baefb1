//! Building the process inside a ptrace-controlled stub.

use std::{collections::HashMap, os::fd::OwnedFd};

use crate::RestoreError;
use cr_ebpf_image::Manifest;
use cr_ebpf_resources::{
    fd::Shared,
    proc::parse_maps,
    process::cgroup::{self, Placement},
    process::namespaces::{self, NsIds},
    sys::{CloneArgs, Injected, Sys as _, PAGE},
};
use cr_ebpf_tracee::Tracee;
use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

/// Code page (`syscall; int3`) plus data page.
pub(crate) const TRAMPOLINE_LEN: u64 = 2 * PAGE;

/// What is made once in the restorer for every process of a restore:
/// the objects descriptors share (pipes, sockets) and shared memory.
pub(crate) struct Natives {
    pub fds: Shared,
    pub shmem: HashMap<u64, OwnedFd>,
    /// The cgroups each process and thread goes into, directories made.
    pub cgroups: Placement,
    /// A lazy restore's chain, and its fill once started (see `lazy.rs`).
    pub lazy: Option<std::sync::Arc<cr_ebpf_image::Chain>>,
    pub lazy_fill: std::sync::Mutex<Option<crate::lazy::LazyFill>>,
}

impl Natives {
    /// The objects of every process in `ms`, which starts with the tree's
    /// root process.
    pub(crate) fn build(
        ms: &[&Manifest],
        opts: &crate::RestoreOptions,
    ) -> Result<Self, RestoreError> {
        let ps: Vec<_> = ms.iter().map(|m| &m.process).collect();
        let cgroups = Placement::plan(&ps, &opts.cgroup_roots, &cgroup::our_mounts())?;
        let shmem = cr_ebpf_resources::shmem::prepare(ms)?;
        let fds = cr_ebpf_resources::fd::prepare(
            ms,
            &cr_ebpf_resources::fd::Prepare {
                close_connections: opts.close_connections,
                shell_job: opts.shell_job,
                shmem: shmem
                    .iter()
                    .map(|(id, fd)| (*id, std::os::fd::AsRawFd::as_raw_fd(fd)))
                    .collect(),
                inherit: opts.inherit_fds.clone(),
                ..Default::default()
            },
        )?;
        Ok(Self {
            fds,
            shmem,
            cgroups,
            lazy: None,
            lazy_fill: std::sync::Mutex::new(None),
        })
    }
}

/// Kills the stub unless disarmed: a half-built process must never run.
pub(crate) struct KillGuard(i32, pub(crate) bool);

impl KillGuard {
    /// The process is done: leave it be.
    pub(crate) fn disarm(&mut self) {
        self.1 = true;
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if !self.1 {
            crate::reap::teardown();
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(self.0), Some(WaitPidFlag::__WALL));
        }
    }
}

pub(crate) fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// An address range of `len` bytes free in both `busy` lists.
fn free_range(len: u64, busy: &[(u64, u64)]) -> Option<u64> {
    (0..4096u64)
        .map(|i| 0x5f00_0000_0000u64 + i * 0x1_0000_0000)
        .find(|&a| busy.iter().all(|&r| !overlaps((a, a + len), r)))
}

/// Addresses free in every layout of `ms` and in ours: the trampoline's,
/// and a span to move the vDSO through.
pub(crate) fn addresses(ms: &[&Manifest]) -> Result<(u64, u64), RestoreError> {
    let own = std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|t| parse_maps(&t).ok())
        .unwrap_or_default();
    let mut busy: Vec<(u64, u64)> = ms
        .iter()
        .flat_map(|m| m.mappings.iter().map(|x| (x.start, x.end)))
        .collect();
    busy.extend(own.iter().map(|x| (x.start, x.end)));
    let tramp = free_range(TRAMPOLINE_LEN, &busy)
        .ok_or_else(|| RestoreError::stub("no free address for the trampoline"))?;
    busy.push((tramp, tramp + TRAMPOLINE_LEN));
    let vdso_span = 64 * PAGE;
    let vdso_tmp = free_range(vdso_span, &busy)
        .ok_or_else(|| RestoreError::stub("no free address to move the vDSO"))?;
    Ok((tramp, vdso_tmp))
}

/// A stub with pid `pid`, a child of ours, stopped under ptrace with its
/// trampoline at `tramp` and every signal blocked.
pub(crate) fn spawn_root(pid: i32, tramp: u64) -> Result<(Tracee, KillGuard), RestoreError> {
    let child = move || -> i32 {
        // SAFETY: raw syscalls only (the parent may have other threads).
        unsafe {
            let p = libc::mmap(
                tramp as *mut libc::c_void,
                TRAMPOLINE_LEN as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if p as u64 != tramp {
                return 90;
            }
            let code = p as *mut u8;
            // syscall; int3
            code.write(0x0f);
            code.add(1).write(0x05);
            code.add(2).write(0xcc);
            if libc::mprotect(p, PAGE as usize, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return 91;
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            // Every signal blocked while the process is built: a timer or a
            // queued signal waits until each thread gets its own mask back.
            let all: u64 = !0;
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                &all as *const u64,
                0usize,
                8usize,
            );
            // Every disposition at its default: the image holds the others,
            // and the restorer's own (SIGPIPE ignored, SIGSEGV and SIGBUS
            // handled by the Rust runtime) must not stay in the process.
            let default = [0u64; 4];
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        default.as_ptr(),
                        0usize,
                        8usize,
                    );
                }
            }
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return 92;
            }
            libc::kill(libc::getpid(), libc::SIGSTOP);
        }
        93
    };
    // SAFETY: `child` makes raw syscalls only.
    let got = unsafe { cr_ebpf_tracee::fork_with_pid(pid, child) }.map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) {
            RestoreError::PidInUse {
                pid,
                comm: "taken just now".into(),
            }
        } else {
            RestoreError::stub(format!("clone3 with set_tid = {pid}: {e}"))
        }
    })?;
    let guard = KillGuard(got, false);
    match waitpid(Pid::from_raw(got), Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        other => {
            return Err(RestoreError::stub(format!(
                "the restore stub did not stop as expected: {other:?}"
            )));
        }
    }
    let t = Tracee::adopt_traceme_child(got).map_err(|source| RestoreError::Build {
        what: "taking over the stub".into(),
        source,
    })?;
    Ok((t, guard))
}

/// A child of the bare stub `parent` with pid `pid` (an injected `clone3`
/// with `flags`: `CLONE_FILES` to share its descriptor table,
/// `CLONE_PARENT` to be its sibling), a copy of it: same trampoline,
/// stopped under ptrace.
pub(crate) fn spawn_child(
    parent: &Tracee,
    tramp: u64,
    pid: i32,
    flags: u64,
) -> Result<(Tracee, KillGuard), RestoreError> {
    let s = Injected::new(parent, parent.tid(), tramp, tramp + PAGE);
    let got = s
        .clone3(&CloneArgs {
            flags,
            // With CLONE_PARENT the child takes its parent's exit signal
            // (clone3 wants 0 here).
            exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
                0
            } else {
                libc::SIGCHLD as u64
            },
            set_tid: pid,
        })
        .map_err(|e| match e {
            RestoreError::Syscall { err, .. } if err.raw_os_error() == Some(libc::EEXIST) => {
                RestoreError::PidInUse {
                    pid,
                    comm: "taken just now".into(),
                }
            }
            other => other,
        })?;
    if got != pid as i64 {
        return Err(RestoreError::stub(format!(
            "process {pid} came back as {got}"
        )));
    }
    let guard = KillGuard(pid, false);
    let t = Tracee::adopt_clone(pid).map_err(|source| RestoreError::Build {
        what: format!("taking over the stub of process {pid}"),
        source,
    })?;
    Ok((t, guard))
}

/// Gives the bare stub `t` of process `p` its UTS and IPC namespaces,
/// where they are not the ones it inherited, and fills an IPC namespace
/// it made; returns its namespaces (see `enter_all`).
pub(crate) fn enter_namespaces(
    t: &Tracee,
    tramp: u64,
    p: &cr_ebpf_image::ProcessInfo,
    inherited: NsIds,
    made: &mut HashMap<u64, i32>,
) -> Result<NsIds, RestoreError> {
    let s = Injected::new(t, t.tid(), tramp, tramp + PAGE);
    if namespaces::enter_all(&s, p, inherited, made)? {
        if let Some(n) = &p.membership.ipc {
            cr_ebpf_resources::ipc::populate(p.pid, n)?;
        }
    }
    Ok(NsIds::of(p))
}

/// Injects syscall `nr` into the bare stub `t`.
pub(crate) fn stub_syscall(
    t: &Tracee,
    tramp: u64,
    name: &str,
    nr: i64,
    args: [u64; 6],
) -> Result<i64, RestoreError> {
    Injected::new(t, t.tid(), tramp, tramp + PAGE).call(name, nr, args)
}

/// A child of the stub `parent` with pid `pid`, in process group `pgid`,
/// which no process leads any more: a stand-in child of `parent` with pid
/// `pgid` leads the group, makes the child as its sibling
/// (`CLONE_PARENT`) with `flags`, exits, and `parent` reaps it.
pub(crate) fn spawn_in_orphan_group(
    parent: &Tracee,
    tramp: u64,
    pid: i32,
    pgid: i32,
    flags: u64,
) -> Result<(Tracee, KillGuard), RestoreError> {
    let (leader, mut lguard) = spawn_child(parent, tramp, pgid, 0)?;
    stub_syscall(&leader, tramp, "setpgid", libc::SYS_setpgid, [0; 6])?;
    let made = spawn_child(&leader, tramp, pid, flags | libc::CLONE_PARENT as u64)?;
    let r = stub_syscall(&leader, tramp, "exit_group", libc::SYS_exit_group, [0; 6]);
    if !matches!(r, Err(RestoreError::Build { .. })) {
        return Err(RestoreError::stub(format!(
            "the stand-in leader {pgid} of process group {pgid} did not exit: {r:?}"
        )));
    }
    leader.forget();
    lguard.disarm();
    // Ours to reap first as its tracer; then its parent's.
    let mut status = 0;
    // SAFETY: plain waitpid on a task we trace.
    unsafe { libc::waitpid(pgid, &mut status, libc::__WALL) };
    stub_syscall(
        parent,
        tramp,
        "wait4(stand-in group leader)",
        libc::SYS_wait4,
        [pgid as u64, 0, libc::__WALL as u64, 0, 0, 0],
    )?;
    Ok(made)
}

/// Gives the stub `t`, just made and in its session, the controlling
/// terminal of process `p` (before it makes children, which inherit it).
pub(crate) fn terminal(
    t: &Tracee,
    tramp: u64,
    natives: &Natives,
    p: &cr_ebpf_image::ProcessInfo,
) -> Result<(), RestoreError> {
    use cr_ebpf_resources::sys::Sys as _;
    let current = cr_ebpf_resources::proc::stat(t.tid()).map_or(0, |s| s.tty_nr);
    let s = Injected::new(t, t.tid(), tramp, tramp + PAGE);
    cr_ebpf_resources::process::terminal::take_controlling(&s, &natives.fds, p, current)?;
    s.release_adopter()
}

/// Sets the foreground process group of the terminal session leader `p`
/// controls (once every process group exists).
pub(crate) fn foreground(
    t: &Tracee,
    tramp: u64,
    p: &cr_ebpf_image::ProcessInfo,
) -> Result<(), RestoreError> {
    let s = Injected::new(t, t.tid(), tramp, tramp + PAGE);
    cr_ebpf_resources::process::terminal::set_foreground(&s, p)
}
