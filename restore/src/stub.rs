//! Building the process inside a ptrace-controlled stub.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use cr_ebpf_image::{Chain, Manifest, MappingKind, ThreadInfo, MAP_GROWSDOWN, MAP_SHARED};
use cr_ebpf_resources::{
    fd::{RestoreCx, Shared},
    proc::{parse_maps, MapEntry},
    sys::{CloneArgs, Injected, Sys as _},
};
use cr_ebpf_tracee::{regs, Tracee};
use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use rayon::prelude::*;

use crate::RestoreError;

const PAGE: u64 = 4096;
/// Code page (`syscall; int3`) plus data page.
const TRAMPOLINE_LEN: u64 = 2 * PAGE;

/// What is made once in the restorer for every process of a restore:
/// the objects descriptors share (pipes, sockets) and shared memory.
pub(crate) struct Natives {
    fds: Shared,
    shmem: HashMap<u64, OwnedFd>,
}

impl Natives {
    /// The objects of every process in `ms`.
    pub(crate) fn build(ms: &[&Manifest], close_connections: bool) -> Result<Self, RestoreError> {
        let shmem = cr_ebpf_resources::shmem::prepare(ms)?;
        let fds = cr_ebpf_resources::fd::prepare(
            ms,
            &cr_ebpf_resources::fd::Prepare { close_connections },
        )?;
        Ok(Self { fds, shmem })
    }
}

/// Kills the stub unless disarmed: a half-built process must never run.
pub(crate) struct KillGuard(i32, bool);

impl KillGuard {
    /// The process is done: leave it be.
    pub(crate) fn disarm(&mut self) {
        self.1 = true;
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        if !self.1 {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(self.0), Some(WaitPidFlag::__WALL));
        }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// An address range of `len` bytes free in both `busy` lists.
fn free_range(len: u64, busy: &[(u64, u64)]) -> Option<u64> {
    (0..4096u64)
        .map(|i| 0x5f00_0000_0000u64 + i * 0x1_0000_0000)
        .find(|&a| busy.iter().all(|&r| !overlaps((a, a + len), r)))
}

/// The address of a `syscall` instruction in the restored vDSO.
fn vdso_syscall_insn(pid: i32, m: &Manifest) -> Result<u64, RestoreError> {
    let vdso = m
        .mappings
        .iter()
        .find(|x| x.kind == MappingKind::Vdso)
        .ok_or_else(|| RestoreError::NotSupported("the image has no vDSO".into()))?;
    let mut code = vec![0u8; (vdso.end - vdso.start) as usize];
    cr_ebpf_tracee::read_memory(pid, vdso.start, &mut code).map_err(|source| {
        RestoreError::Build {
            what: "reading the vDSO".into(),
            source,
        }
    })?;
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| vdso.start + i as u64)
        .ok_or_else(|| RestoreError::NotSupported("no syscall instruction in the vDSO".into()))
}

/// Maps the recorded mapping `x` from the stub's descriptor `fd` (closed
/// afterwards, whatever happens).
fn map_fd(
    s: &Injected<'_>,
    x: &cr_ebpf_image::MappingInfo,
    prot: u32,
    share: i32,
    fd: i64,
) -> Result<i64, RestoreError> {
    let r = s.call(
        "mmap",
        libc::SYS_mmap,
        [
            x.start,
            x.end - x.start,
            prot as u64,
            (share | libc::MAP_FIXED) as u64,
            fd as u64,
            x.offset,
        ],
    );
    s.call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    r
}

/// POSIX timers with their ids (`PR_TIMER_CREATE_RESTORE_IDS`: while on,
/// `timer_create` takes the id from the `timer_t` it is given), clocks,
/// notification, and remaining time and interval.
fn posix_timers(s: &Injected<'_>, p: &cr_ebpf_image::ProcessInfo) -> Result<(), RestoreError> {
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    s.call(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
    )
    .map_err(|e| {
        RestoreError::NotSupported(format!(
            "POSIX timers keep their ids only on kernels with PR_TIMER_CREATE_RESTORE_IDS \
             (Linux 6.16+): {e}"
        ))
    })?;
    for t in &p.posix_timers {
        // struct sigevent: sigev_value, sigev_signo, sigev_notify, _tid.
        let mut ev = vec![0u8; 64];
        ev[0..8].copy_from_slice(&t.value.to_le_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
        ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
        ev[16..20].copy_from_slice(&t.tid.to_le_bytes());
        let ev_at = s.put(0, &ev)?;
        let id_at = s.put(128, &t.id.to_le_bytes())?;
        s.call(
            "timer_create",
            libc::SYS_timer_create,
            [t.clockid as u64, ev_at, id_at, 0, 0, 0],
        )
        .map_err(|e| RestoreError::NotSupported(format!("POSIX timer {}: {e}", t.id)))?;
    }
    s.call(
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
        libc::SYS_prctl,
        [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
    )?;
    for t in p.posix_timers.iter().filter(|t| t.remaining_ns > 0) {
        let mut its = Vec::with_capacity(32);
        for v in [
            t.interval_ns / 1_000_000_000,
            t.interval_ns % 1_000_000_000,
            t.remaining_ns / 1_000_000_000,
            t.remaining_ns % 1_000_000_000,
        ] {
            its.extend_from_slice(&v.to_le_bytes());
        }
        let at = s.put(256, &its)?;
        s.call(
            "timer_settime",
            libc::SYS_timer_settime,
            [t.id as u64, 0, at, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// Sets a thread's own kernel state by syscalls in that thread; returns the
/// registers it must resume with.
fn thread_state(
    s: &Injected<'_>,
    t: &Tracee,
    info: &ThreadInfo,
) -> Result<regs::Regs, RestoreError> {
    s.on(t).call(
        "set_robust_list",
        libc::SYS_set_robust_list,
        [info.robust_list.0, info.robust_list.1, 0, 0, 0, 0],
    )?;
    s.on(t).call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        [info.clear_child_tid, 0, 0, 0, 0, 0],
    )?;
    if info.rseq.0 != 0 {
        s.on(t).call(
            "rseq",
            libc::SYS_rseq,
            [info.rseq.0, info.rseq.1 as u64, 0, info.rseq.2 as u64, 0, 0],
        )?;
    }
    if !info.comm.is_empty() {
        let mut name = info.comm.clone().into_bytes();
        name.truncate(15);
        name.push(0);
        let at = s.put(0, &name)?;
        s.on(t).call(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            [libc::PR_SET_NAME as u64, at, 0, 0, 0, 0],
        )?;
    }
    if info.sigaltstack.1 & libc::SS_DISABLE as u32 == 0 {
        let mut ss = info.sigaltstack.0.to_le_bytes().to_vec();
        ss.extend_from_slice(&(info.sigaltstack.1 & !(libc::SS_ONSTACK as u32)).to_le_bytes());
        ss.extend_from_slice(&0u32.to_le_bytes());
        ss.extend_from_slice(&info.sigaltstack.2.to_le_bytes());
        let at = s.put(0, &ss)?;
        s.on(t)
            .call("sigaltstack", libc::SYS_sigaltstack, [at, 0, 0, 0, 0, 0])?;
    }
    // Signals that were pending for this thread, queued again (all signals
    // are blocked until the thread's own mask is set, last).
    for siginfo in &info.pending {
        let signo = i32::from_le_bytes(siginfo[0..4].try_into().expect("4 bytes"));
        let at = s.put(0, siginfo)?;
        s.on(t).call(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            [s.pid() as u64, info.tid as u64, signo as u64, at, 0, 0],
        )?;
    }
    if !info.xstate.is_empty() {
        t.set_xstate(&info.xstate)
            .map_err(|source| RestoreError::Build {
                what: format!("setting the FPU state of thread {}", info.tid),
                source,
            })?;
    }
    let saved = regs::from_bytes(&info.regs)
        .ok_or_else(|| RestoreError::NotSupported("registers of an unknown size".into()))?;
    Ok(regs::restarted(&saved, true))
}

/// Builds the process. Returns (pid, pages written, fill time).
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
        .ok_or_else(|| RestoreError::NotSupported("no free address for the trampoline".into()))?;
    busy.push((tramp, tramp + TRAMPOLINE_LEN));
    let vdso_span = 64 * PAGE;
    let vdso_tmp = free_range(vdso_span, &busy)
        .ok_or_else(|| RestoreError::NotSupported("no free address to move the vDSO".into()))?;
    Ok((tramp, vdso_tmp))
}

/// Rebuilds one process: a stub with its pid, its whole state, then it runs.
pub fn build(
    m: &Manifest,
    chain: &Chain,
    workers: usize,
    close_connections: bool,
    clock: &mut crate::Clock,
) -> Result<(i32, u64, Duration), RestoreError> {
    let (tramp, vdso_tmp) = addresses(&[m])?;
    let (t, guard) = spawn_root(m.process.pid, tramp)?;
    let natives = Natives::build(&[m], close_connections)?;
    let ready = build_in(
        t, guard, m, chain, workers, &natives, clock, tramp, vdso_tmp,
    )?;
    let done = release(ready)?;
    clock.mark("resume");
    Ok(done)
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
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                return 92;
            }
            libc::kill(libc::getpid(), libc::SIGSTOP);
        }
        93
    };
    let got = cr_ebpf_tracee::fork_with_pid(pid, child).map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) {
            RestoreError::PidInUse {
                pid,
                comm: "taken just now".into(),
            }
        } else {
            RestoreError::NotSupported(format!("clone3 with set_tid = {pid}: {e}"))
        }
    })?;
    let guard = KillGuard(got, false);
    match waitpid(Pid::from_raw(got), Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        other => {
            return Err(RestoreError::NotSupported(format!(
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

/// A child of the bare stub `parent` with pid `pid` (an injected `clone3`),
/// a copy of it: same trampoline, stopped under ptrace.
pub(crate) fn spawn_child(
    parent: &Tracee,
    tramp: u64,
    pid: i32,
) -> Result<(Tracee, KillGuard), RestoreError> {
    let s = Injected::new(parent, parent.tid(), tramp, tramp + PAGE);
    let got = s
        .clone3(&CloneArgs {
            flags: 0,
            exit_signal: libc::SIGCHLD as u64,
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
        return Err(RestoreError::NotSupported(format!(
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

/// A process built and stopped, waiting for [`release`].
pub(crate) struct Ready {
    t: Tracee,
    guard: KillGuard,
    others: Vec<(Tracee, regs::Regs, u64)>,
    final_regs: regs::Regs,
    sigmask: u64,
    vdso_insn: u64,
    tramp: u64,
    pages: u64,
    fill: Duration,
}

/// Builds the process `m` inside the stub `t` (everything but letting it run).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per kind of restore"
)]
pub(crate) fn build_in(
    t: Tracee,
    guard: KillGuard,
    m: &Manifest,
    chain: &Chain,
    workers: usize,
    natives: &Natives,
    clock: &mut crate::Clock,
    tramp: u64,
    vdso_tmp: u64,
) -> Result<Ready, RestoreError> {
    let got = t.tid();
    // The pidfd descriptors are handed over through stays clear of the
    // process's own numbers.
    let floor = m.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) as u64 + 32;
    let s = Injected::new(&t, got, tramp, tramp + PAGE).with_floor(floor);

    // 0. The stub's rseq area is about to vanish: the kernel would fault on
    //    it at the next preemption.
    if let Some(q) = t.rseq().map_err(|source| RestoreError::Build {
        what: "reading the stub's rseq area".into(),
        source,
    })? {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        s.call(
            "rseq(unregister)",
            libc::SYS_rseq,
            [
                q.ptr,
                q.len as u64,
                RSEQ_FLAG_UNREGISTER,
                q.sig as u64,
                0,
                0,
            ],
        )?;
    }

    clock.mark("stub");

    // 1. Everything of the stub goes but the trampoline and the vDSO.
    let stub_maps = std::fs::read_to_string(format!("/proc/{got}/maps"))
        .ok()
        .and_then(|t| parse_maps(&t).ok())
        .ok_or_else(|| RestoreError::NotSupported("cannot read the stub's maps".into()))?;
    let is_special = |e: &MapEntry| {
        matches!(
            e.kind(),
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        )
    };
    for e in &stub_maps {
        if overlaps((e.start, e.end), (tramp, tramp + TRAMPOLINE_LEN)) || is_special(e) {
            continue;
        }
        s.call(
            "munmap",
            libc::SYS_munmap,
            [e.start, e.end - e.start, 0, 0, 0, 0],
        )?;
    }

    clock.mark("clear");

    // 2. The vDSO and its data pages to the recorded addresses (through a
    //    free area first, in case the two layouts overlap).
    let specials: Vec<&MapEntry> = stub_maps
        .iter()
        .filter(|e| matches!(e.kind(), MappingKind::Vdso | MappingKind::Vvar))
        .collect();
    let lo = specials.iter().map(|e| e.start).min().unwrap_or(0);
    for e in &specials {
        let len = e.end - e.start;
        let want = m.mappings.iter().find(|x| x.path == e.path);
        match want {
            Some(w) if w.end - w.start != len => {
                return Err(RestoreError::NotSupported(format!(
                    "{} is {} pages on this kernel, {} in the image (taken on another kernel?)",
                    e.path,
                    len / PAGE,
                    (w.end - w.start) / PAGE
                )));
            }
            _ => {}
        }
        s.call(
            "mremap",
            libc::SYS_mremap,
            [
                e.start,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                vdso_tmp + (e.start - lo),
                0,
            ],
        )?;
    }
    for e in &specials {
        let len = e.end - e.start;
        let at = vdso_tmp + (e.start - lo);
        match m.mappings.iter().find(|x| x.path == e.path) {
            Some(w) => {
                s.call(
                    "mremap",
                    libc::SYS_mremap,
                    [
                        at,
                        len,
                        len,
                        (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                        w.start,
                        0,
                    ],
                )?;
            }
            None => {
                s.call("munmap", libc::SYS_munmap, [at, len, 0, 0, 0, 0])?;
            }
        }
    }

    clock.mark("vdso");

    // Shared memory objects, with their contents, for the mappings and
    // memfd descriptors that refer to them.
    let shm = &natives.shmem;

    // 3. The recorded mappings, writable where pages will be filled.
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for x in &m.mappings {
        if matches!(
            x.kind,
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        ) {
            continue;
        }
        let len = x.end - x.start;
        let prot = if x.pages_stored > 0 {
            x.prot | rw
        } else {
            x.prot
        };
        let share = if x.flags & MAP_SHARED != 0 {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let sysv = x.kind == MappingKind::Shmem
            && m.shmem
                .iter()
                .any(|o| o.id == x.inode && o.kind == cr_ebpf_image::ShmemKind::SysV);
        let got_addr = if sysv && x.offset > 0 {
            // The rest of a segment attached at a lower address.
            s.call(
                "mprotect",
                libc::SYS_mprotect,
                [x.start, len, prot as u64, 0, 0, 0],
            )?;
            x.start as i64
        } else if sysv {
            let mut flags = 0;
            if x.prot & libc::PROT_WRITE as u32 == 0 {
                flags |= libc::SHM_RDONLY;
            }
            if x.prot & libc::PROT_EXEC as u32 != 0 {
                flags |= libc::SHM_EXEC;
            }
            s.call(
                "shmat",
                libc::SYS_shmat,
                [x.inode, x.start, flags as u64, 0, 0, 0],
            )?
        } else if x.kind == MappingKind::Shmem {
            let ours = shm.get(&x.inode).ok_or_else(|| {
                RestoreError::NotSupported(format!(
                    "shared memory at {:#x} was not rebuilt",
                    x.start
                ))
            })?;
            let fd = s.adopt(ours.as_fd())?;
            map_fd(&s, x, prot, share, fd)?
        } else if x.kind == MappingKind::File {
            let mut path = x.path.clone().into_bytes();
            path.push(0);
            if path.len() as u64 > PAGE {
                return Err(RestoreError::NotSupported(format!(
                    "path longer than a page: {}",
                    x.path
                )));
            }
            let at = s.put(0, &path)?;
            let mode = if share == libc::MAP_SHARED && x.prot & libc::PROT_WRITE as u32 != 0 {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = s.call(
                "openat",
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as u64,
                    at,
                    (mode | libc::O_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )?;
            map_fd(&s, x, prot, share, fd)?
        } else {
            let mut flags = share | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
            if x.flags & MAP_GROWSDOWN != 0 {
                flags |= libc::MAP_GROWSDOWN;
            }
            s.call(
                "mmap",
                libc::SYS_mmap,
                [x.start, len, prot as u64, flags as u64, u64::MAX, 0],
            )?
        };
        if got_addr as u64 != x.start {
            return Err(RestoreError::NotSupported(format!(
                "mapping {:#x} landed at {got_addr:#x}",
                x.start
            )));
        }
    }

    clock.mark("map");

    // 4. Pages, on all cores.
    let fill_start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("restore-fill-{i}"))
        .build()
        .map_err(|e| RestoreError::NotSupported(format!("starting the fill threads: {e}")))?;
    let pages = chain.pages();
    pool.install(|| {
        chain
            .fills()
            .par_iter()
            .try_for_each_init(Vec::new, |buf, f| {
                chain.read(
                    f,
                    buf,
                    |addr, bytes| {
                        cr_ebpf_tracee::write_memory(got, addr, bytes).map_err(|source| {
                            RestoreError::Build {
                                what: format!("filling pages at {addr:#x}"),
                                source,
                            }
                        })
                    },
                    |e| RestoreError::NotSupported(format!("page data: {e}")),
                )
            })
    })?;
    let fill = fill_start.elapsed();
    clock.mark("fill");
    for x in &m.mappings {
        if x.pages_stored > 0
            && x.prot != x.prot | rw
            && !matches!(
                x.kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
            )
        {
            s.call(
                "mprotect",
                libc::SYS_mprotect,
                [x.start, x.end - x.start, x.prot as u64, 0, 0, 0],
            )?;
        }
    }

    // 5. mm fields and auxv in one PR_SET_MM_MAP.
    let p = &m.process;
    if p.auxv.len() as u64 > PAGE - 256 {
        return Err(RestoreError::NotSupported(
            "auxv larger than expected".into(),
        ));
    }
    // The executable, so that /proc/PID/exe names it again (the stub's own
    // binary is no longer mapped, which the kernel requires).
    let mut exe = p.exe.clone().into_bytes();
    exe.push(0);
    let exe_fd = if exe.len() <= 2048 {
        let at = s.put(2048, &exe)?;
        s.call(
            "openat(exe)",
            libc::SYS_openat,
            [
                libc::AT_FDCWD as u64,
                at,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )
        .ok()
    } else {
        None
    };
    let auxv_at = s.put(256, &p.auxv)?;
    let mut mm_map = Vec::with_capacity(104);
    for v in p.mm {
        mm_map.extend_from_slice(&v.to_le_bytes());
    }
    mm_map.extend_from_slice(&auxv_at.to_le_bytes());
    mm_map.extend_from_slice(&(p.auxv.len() as u32).to_le_bytes());
    let exe_at = mm_map.len();
    mm_map.extend_from_slice(&exe_fd.map_or(u32::MAX, |fd| fd as u32).to_le_bytes());
    let set_mm = |mm_map: &[u8]| -> Result<i64, RestoreError> {
        let map_at = s.put(0, mm_map)?;
        s.call(
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            [
                libc::PR_SET_MM as u64,
                libc::PR_SET_MM_MAP as u64,
                map_at,
                mm_map.len() as u64,
                0,
                0,
            ],
        )
    };
    if set_mm(&mm_map).is_err() && exe_fd.is_some() {
        // The executable could not be set (replaced, or not executable):
        // the process still restores; /proc/PID/exe keeps the stub's name.
        mm_map[exe_at..exe_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        set_mm(&mm_map)?;
    }
    if let Some(fd) = exe_fd {
        s.call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    }

    clock.mark("mm");

    // 6. Process-wide state.
    let mut cwd = p.cwd.clone().into_bytes();
    cwd.push(0);
    if cwd.len() as u64 <= PAGE {
        let at = s.put(0, &cwd)?;
        s.call("chdir", libc::SYS_chdir, [at, 0, 0, 0, 0, 0])
            .map_err(|e| RestoreError::File {
                path: p.cwd.clone(),
                what: format!("(the working directory) cannot be entered: {e}"),
            })?;
    }
    s.call("umask", libc::SYS_umask, [p.umask as u64, 0, 0, 0, 0, 0])?;
    s.call(
        "personality",
        libc::SYS_personality,
        [p.personality as u64, 0, 0, 0, 0, 0],
    )?;
    for (res, &(cur, max)) in p.rlimits.iter().enumerate() {
        let mut lim = cur.to_le_bytes().to_vec();
        lim.extend_from_slice(&max.to_le_bytes());
        let at = s.put(0, &lim)?;
        s.call(
            "prlimit64",
            libc::SYS_prlimit64,
            [0, res as u64, at, 0, 0, 0],
        )
        .map_err(|e| {
            RestoreError::NotSupported(format!(
                "resource limit {res} of the image ({cur}, {max}) cannot be set here \
                     (raising a hard limit needs CAP_SYS_RESOURCE): {e}"
            ))
        })?;
    }
    for a in &p.sigactions {
        let mut act = Vec::with_capacity(32);
        for v in [a.handler, a.flags, a.restorer, a.mask] {
            act.extend_from_slice(&v.to_le_bytes());
        }
        let at = s.put(0, &act)?;
        s.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            [a.signo as u64, at, 0, 8, 0, 0],
        )?;
    }

    clock.mark("process");

    // 7. File descriptors.
    let cx = RestoreCx {
        sys: &s,
        shared: &natives.fds,
        shmem: shm,
    };
    cr_ebpf_resources::fd::restore(&cx, m)?;
    s.close_adopter()?;
    cr_ebpf_resources::shmem::seal(&m.shmem, shm)?;
    clock.mark("fds");

    // 8. Threads, each with its own tid, then each thread's own state.
    let mut others = Vec::new();
    for info in &m.threads[1..] {
        const THREAD_FLAGS: u64 = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let new = s.clone3(&CloneArgs {
            flags: THREAD_FLAGS,
            exit_signal: 0,
            set_tid: info.tid,
        })?;
        if new != info.tid as i64 {
            return Err(RestoreError::NotSupported(format!(
                "thread {} came back as {new}",
                info.tid
            )));
        }
        let nt = Tracee::adopt_clone(info.tid).map_err(|source| RestoreError::Build {
            what: format!("taking over thread {}", info.tid),
            source,
        })?;
        let regs = thread_state(&s, &nt, info)?;
        others.push((nt, regs, info.sigmask));
    }
    let final_regs = thread_state(&s, &t, &m.threads[0])?;
    clock.mark("threads");
    // Signals pending for the whole process.
    for siginfo in &p.pending {
        let signo = i32::from_le_bytes(siginfo[0..4].try_into().expect("4 bytes"));
        let at = s.put(0, siginfo)?;
        s.call(
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            [s.pid() as u64, signo as u64, at, 0, 0, 0],
        )?;
    }

    // 9. Timers last: a timer firing now would interrupt the build.
    for (which, &(interval, value)) in p.itimers.iter().enumerate() {
        if interval == 0 && value == 0 {
            continue;
        }
        let mut v = Vec::with_capacity(32);
        for x in [
            interval / 1_000_000,
            interval % 1_000_000,
            value / 1_000_000,
            value % 1_000_000,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        let at = s.put(0, &v)?;
        s.call(
            "setitimer",
            libc::SYS_setitimer,
            [which as u64, at, 0, 0, 0, 0],
        )?;
    }
    posix_timers(&s, p)?;
    clock.mark("signals");
    let vdso_insn = vdso_syscall_insn(got, m)?;
    Ok(Ready {
        t,
        guard,
        others,
        final_regs,
        sigmask: m.threads[0].sigmask,
        vdso_insn,
        tramp,
        pages,
        fill,
    })
}

/// Lets a built process run: each thread gets its own mask and registers.
pub(crate) fn release(r: Ready) -> Result<(i32, u64, Duration), RestoreError> {
    let Ready {
        t,
        mut guard,
        others,
        final_regs,
        sigmask,
        vdso_insn,
        tramp,
        pages,
        fill,
    } = r;
    let got = t.tid();
    let s = Injected::new(&t, got, tramp, tramp + PAGE);
    // Each other thread: its own signal mask as its last syscall, its own
    // registers at that syscall's exit, then it runs (a pending signal it
    // does not block is delivered right then, as the kernel would).
    for (nt, regs, mask) in others {
        let tid = nt.tid();
        let at = s.put(0, &mask.to_le_bytes())?;
        let base = nt.regs().map_err(|source| RestoreError::Build {
            what: format!("reading the registers of thread {tid}"),
            source,
        })?;
        let r = nt
            .run_syscall(
                &base,
                tramp,
                libc::SYS_rt_sigprocmask,
                [libc::SIG_SETMASK as u64, at, 0, 8, 0, 0],
            )
            .map_err(|source| RestoreError::Build {
                what: format!("setting the signal mask of thread {tid}"),
                source,
            })?;
        if r != 0 {
            return Err(RestoreError::Syscall {
                call: format!("rt_sigprocmask in thread {tid}"),
                err: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        nt.set_regs(&regs).map_err(|source| RestoreError::Build {
            what: format!("setting the registers of thread {tid}"),
            source,
        })?;
        nt.detach().map_err(|source| RestoreError::Build {
            what: format!("letting thread {tid} run"),
            source,
        })?;
    }

    // 7. Last syscall: the trampoline goes; at its exit the thread gets its
    //    own registers and runs.
    let base = t.regs().map_err(|source| RestoreError::Build {
        what: "reading registers".into(),
        source,
    })?;
    let r = t
        .run_syscall(
            &base,
            tramp,
            libc::SYS_munmap,
            [tramp, TRAMPOLINE_LEN, 0, 0, 0, 0],
        )
        .map_err(|source| RestoreError::Build {
            what: "removing the trampoline".into(),
            source,
        })?;
    if r != 0 {
        return Err(RestoreError::Syscall {
            call: "munmap(trampoline)".into(),
            err: std::io::Error::from_raw_os_error(-r as i32),
        });
    }
    // The main thread's own mask, last, through the vDSO's `syscall`
    // instruction (the trampoline is gone), with the mask written just
    // below its stack pointer and the bytes there put back.
    let insn = vdso_insn;
    let scratch = (final_regs.rsp - 4096) & !15;
    let mut saved = [0u8; 8];
    let mem = |what: &str, source| RestoreError::Build {
        what: what.into(),
        source,
    };
    cr_ebpf_tracee::read_memory(got, scratch, &mut saved)
        .map_err(|e| mem("reading the stack", e))?;
    cr_ebpf_tracee::write_memory(got, scratch, &sigmask.to_le_bytes())
        .map_err(|e| mem("writing the stack", e))?;
    let base = t.regs().map_err(|e| mem("reading registers", e))?;
    let r = t
        .run_syscall(
            &base,
            insn,
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as u64, scratch, 0, 8, 0, 0],
        )
        .map_err(|e| mem("setting the signal mask", e))?;
    cr_ebpf_tracee::write_memory(got, scratch, &saved)
        .map_err(|e| mem("restoring the stack", e))?;
    if r != 0 {
        return Err(RestoreError::Syscall {
            call: "rt_sigprocmask".into(),
            err: std::io::Error::from_raw_os_error(-r as i32),
        });
    }
    t.set_regs(&final_regs)
        .map_err(|source| RestoreError::Build {
            what: "setting the registers".into(),
            source,
        })?;
    t.detach().map_err(|source| RestoreError::Build {
        what: "letting the process run".into(),
        source,
    })?;
    guard.1 = true;
    Ok((got, pages, fill))
}
