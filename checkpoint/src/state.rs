//! Everything but memory contents, collected while the process is frozen.
//! Shared by full dumps and incremental checkpoints; the latter may reuse
//! what the previous checkpoint asked the process for when the resource log
//! says it cannot have changed.

use std::{fs::File, path::Path};

use cr_ebpf_image::{
    ChainInfo, FdInfo, Manifest, MappingInfo, MappingKind, PosixTimer, ProcessInfo, ShmemObject,
    SigAction, ThreadInfo,
};
use cr_ebpf_tracee::{regs, Frozen, Injector};

use crate::{maps, maps::MapEntry, proc, DumpError};

/// What may have changed since the previous checkpoint, from the resource
/// log. Anything not known (no log, or the log lost events) must be
/// [`Changes::all`]: then every piece of state is asked for again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Nothing is known: re-collect everything.
    pub unknown: bool,
    /// Signal dispositions may have changed (`rt_sigaction`).
    pub sigactions: bool,
    /// Interval or POSIX timers may have been set (`setitimer`, `alarm`,
    /// `timer_create`, `timer_settime`, `timer_delete`).
    pub itimers: bool,
    /// Per-thread state only the thread can be asked for may have changed
    /// (`sigaltstack`, `set_tid_address`, new threads).
    pub thread_state: bool,
    /// Address ranges whose mappings were created, moved or removed
    /// (`mmap`, `munmap`, `mremap`, `brk`, `shmat`/`shmdt`).
    pub layout: Vec<(u64, u64)>,
}

impl Changes {
    /// Nothing known: re-collect everything.
    pub fn all() -> Self {
        Self {
            unknown: true,
            sigactions: true,
            itimers: true,
            thread_state: true,
            layout: Vec::new(),
        }
    }

    /// Nothing changed (no resource-changing syscall at all).
    pub fn none() -> Self {
        Self {
            unknown: false,
            sigactions: false,
            itimers: false,
            thread_state: false,
            layout: Vec::new(),
        }
    }

    /// Whether a reported layout change touched `start..end`. Memory does
    /// not depend on the log being complete: a replaced mapping is no longer
    /// registered with the dirty tracker, which its scan reports.
    pub fn layout_touched(&self, start: u64, end: u64) -> bool {
        self.layout.iter().any(|&(s, e)| s < end && start < e)
    }
}

/// How many injected queries a collection made (each is a few ptrace
/// round trips while the process is frozen).
#[derive(Debug, Clone, Copy, Default)]
pub struct Queries {
    /// Syscalls injected.
    pub injected: u32,
    /// Of which skipped because the previous checkpoint's answer still held.
    pub reused: u32,
}

/// The frozen process's state, memory contents excepted.
pub(crate) struct State {
    pub entries: Vec<MapEntry>,
    pub process: ProcessInfo,
    pub threads: Vec<ThreadInfo>,
    pub fds: Vec<FdInfo>,
    /// Shared memory objects, with their contents.
    pub shmem: Vec<ShmemObject>,
    /// Duplicates of the established TCP connections (see [`crate::fds::Fds`]).
    pub tcp: Vec<(i32, std::os::fd::OwnedFd)>,
    pub pagemap: File,
    pub queries: Queries,
}

/// `/proc/PID/timers` (no remaining time there) and an injected
/// `timer_gettime` for each timer: armed timers count down, so they are
/// asked every time.
fn posix_timers(
    pid: i32,
    injector: &Injector,
    main: &cr_ebpf_tracee::Tracee,
    queries: &mut Queries,
) -> Result<Vec<PosixTimer>, DumpError> {
    let path = format!("/proc/{pid}/timers");
    let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path.clone()))?;
    let bad = |what: &str| DumpError::NotSupported {
        pid,
        what: format!("an unreadable {what} in {path}"),
    };
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let (key, value) = line.split_once(':').ok_or_else(|| bad("line"))?;
        let value = value.trim();
        if key == "ID" {
            out.push(PosixTimer {
                id: value.parse().map_err(|_| bad("timer id"))?,
                ..PosixTimer::default()
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad("timer"))?;
        match key {
            // signal: 10/0000000000000abc
            "signal" => {
                let (signo, v) = value.split_once('/').ok_or_else(|| bad("signal"))?;
                t.signo = signo.parse().map_err(|_| bad("signal"))?;
                t.value = u64::from_str_radix(v, 16).map_err(|_| bad("signal value"))?;
            }
            // notify: signal/pid.8224, none/pid.8224, signal/tid.8225
            "notify" => {
                let (how, target) = value.split_once('/').ok_or_else(|| bad("notify"))?;
                t.notify = match how {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    _ => {
                        return Err(DumpError::NotSupported {
                            pid,
                            what: format!("POSIX timer {} notifying by {how:?}", t.id),
                        })
                    }
                };
                if let Some(tid) = target.strip_prefix("tid.") {
                    t.notify |= libc::SIGEV_THREAD_ID;
                    t.tid = tid.parse().map_err(|_| bad("notify tid"))?;
                }
            }
            "ClockID" => t.clockid = value.parse().map_err(|_| bad("clock"))?,
            _ => {}
        }
    }
    out.sort_by_key(|t| t.id);
    let trace = |source| DumpError::Trace { pid, source };
    for t in &mut out {
        queries.injected += 1;
        let (ret, its) = injector
            .call_out(main, libc::SYS_timer_gettime, 32, |at| {
                [t.id as u64, at, 0, 0, 0, 0]
            })
            .map_err(trace)?;
        if ret != 0 {
            return Err(DumpError::NotSupported {
                pid,
                what: format!("timer_gettime of POSIX timer {} failed ({ret})", t.id),
            });
        }
        let w = |i: usize| u64::from_le_bytes(its[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        t.interval_ns = w(0) * 1_000_000_000 + w(1);
        t.remaining_ns = w(2) * 1_000_000_000 + w(3);
    }
    Ok(out)
}

pub(crate) fn proc_err(pid: i32, path: String) -> impl FnOnce(std::io::Error) -> DumpError {
    move |source| DumpError::Proc { pid, path, source }
}

/// Collects the state of the frozen process. `prev` is the previous
/// checkpoint of the same process, whose injected answers are reused where
/// `changes` says they still hold.
pub(crate) fn collect(
    frozen: &Frozen,
    prev: Option<&Manifest>,
    changes: &Changes,
) -> Result<State, DumpError> {
    collect_in(frozen, prev, changes, None)
}

/// [`collect`] for one process of a tree checkpointed as a whole: its
/// children are part of the checkpoint, and `scope` is shared by the tree.
pub(crate) fn collect_in(
    frozen: &Frozen,
    prev: Option<&Manifest>,
    changes: &Changes,
    tree: Option<&mut crate::fds::TreeScope>,
) -> Result<State, DumpError> {
    let pid = frozen.pid();
    let trace = |source| DumpError::Trace { pid, source };
    let mut queries = Queries::default();
    let maps_path = format!("/proc/{pid}/maps");
    let maps_text =
        std::fs::read_to_string(&maps_path).map_err(proc_err(pid, maps_path.clone()))?;
    let mut entries = maps::parse_maps(&maps_text).map_err(|e| DumpError::Proc {
        pid,
        path: maps_path.clone(),
        source: std::io::Error::other(e),
    })?;
    maps::mark_tmpfs(pid, &mut entries);
    if let Some(m) = entries
        .iter()
        .find(|m| m.kind() == MappingKind::File && m.path.ends_with(" (deleted)"))
    {
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "a mapping of the deleted file {} at {:#x}-{:#x}",
                m.path, m.start, m.end
            ),
        });
    }
    // A process confined to another root directory cannot be rebuilt yet.
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .map_err(proc_err(pid, format!("/proc/{pid}/root")))?;
    if root != Path::new("/") {
        return Err(DumpError::NotSupported {
            pid,
            what: format!("a root directory other than / ({})", root.display()),
        });
    }
    // Children would be lost: a restored parent waiting for them would
    // wait forever. (A process with children is checkpointed as a tree; one
    // forked after the tree was listed lands here.)
    let children = proc::children(pid);
    if !children.is_empty() && tree.is_none() {
        let list: Vec<String> = children.iter().map(i32::to_string).collect();
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "child processes ({}) that appeared while it was being checkpointed (try again)",
                list.join(", ")
            ),
        });
    }
    // Descriptors first: an unsupported one fails before the long part.
    let mut tree = tree;
    let crate::fds::Fds { fds, tcp } = crate::fds::collect(pid, tree.as_deref_mut())?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).map_err(proc_err(pid, pagemap_path))?;

    let injector = Injector::new(pid).map_err(trace)?;
    let mut threads = Vec::new();
    for t in frozen.threads() {
        // Registers first: injected calls below must not show in them.
        let r = t.regs().map_err(trace)?;
        let rseq = t.rseq().map_err(trace)?;
        let before = prev
            .filter(|_| !changes.thread_state && !changes.unknown)
            .and_then(|p| p.threads.iter().find(|x| x.tid == t.tid()));
        let (clear_child_tid, sigaltstack) = match before {
            Some(b) => {
                queries.reused += 2;
                (b.clear_child_tid, b.sigaltstack)
            }
            None => {
                queries.injected += 2;
                let (ret, out) = injector
                    .call_out(t, libc::SYS_prctl, 8, |at| {
                        [libc::PR_GET_TID_ADDRESS as u64, at, 0, 0, 0, 0]
                    })
                    .map_err(trace)?;
                let clear_child_tid = if ret == 0 {
                    u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
                } else {
                    0
                };
                let (ret, ss) = injector
                    .call_out(t, libc::SYS_sigaltstack, 24, |at| [0, at, 0, 0, 0, 0])
                    .map_err(trace)?;
                let sigaltstack = if ret == 0 {
                    let w =
                        |i: usize| u64::from_le_bytes(ss[i..i + 8].try_into().expect("8 bytes"));
                    (w(0), w(8) as u32, w(16))
                } else {
                    (0, libc::SS_DISABLE as u32, 0)
                };
                (clear_child_tid, sigaltstack)
            }
        };
        threads.push(ThreadInfo {
            tid: t.tid(),
            regs: regs::to_bytes(&r),
            xstate: t.xstate().map_err(trace)?,
            rseq: rseq.map_or((0, 0, 0), |q| (q.ptr, q.len, q.sig)),
            robust_list: t.robust_list().map_err(trace)?,
            clear_child_tid,
            sigaltstack,
            pending: t.pending_signals(false).map_err(trace)?,
            comm: std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", t.tid()))
                .map(|c| c.trim_end_matches('\n').chars().take(15).collect())
                .unwrap_or_default(),
            sigmask: proc::sigmask(pid, t.tid()).map_err(proc_err(
                pid,
                format!("/proc/{pid}/task/{}/status", t.tid()),
            ))?,
        });
    }
    let brk = entries
        .iter()
        .find(|m| m.kind() == MappingKind::Heap)
        .map(|m| m.end);
    let mut mm = proc::mm_fields(pid, 0).map_err(proc_err(pid, format!("/proc/{pid}/stat")))?;
    mm[5] = brk.unwrap_or(mm[4]);
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(proc_err(pid, format!("/proc/{pid}/auxv")))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(proc_err(pid, format!("/proc/{pid}/exe")))?
        .display()
        .to_string();

    // Process-wide state only the process can be asked for.
    let main = &frozen.threads()[0];
    let known = prev.filter(|_| !changes.unknown);
    let sigactions = match known.filter(|_| !changes.sigactions) {
        Some(p) => {
            queries.reused += 62;
            p.process.sigactions.clone()
        }
        None => {
            let mut sigactions = Vec::new();
            for signo in 1..=64u32 {
                if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
                    continue;
                }
                queries.injected += 1;
                let (ret, out) = injector
                    .call_out(main, libc::SYS_rt_sigaction, 32, |at| {
                        [signo as u64, 0, at, 8, 0, 0]
                    })
                    .map_err(trace)?;
                if ret != 0 {
                    continue;
                }
                let w = |i: usize| {
                    u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                let a = SigAction {
                    signo,
                    handler: w(0),
                    flags: w(1),
                    restorer: w(2),
                    mask: w(3),
                };
                if a.handler != 0 || a.flags != 0 || a.mask != 0 {
                    sigactions.push(a);
                }
            }
            sigactions
        }
    };
    // A timer that was never armed stays disarmed until a setitimer/alarm;
    // an armed one counts down, so it is asked for again every time.
    let mut itimers = [(0u64, 0u64); 3];
    let prev_timers = known
        .filter(|_| !changes.itimers)
        .map(|p| p.process.itimers);
    for (which, slot) in itimers.iter_mut().enumerate() {
        if prev_timers.is_some_and(|t| t[which] == (0, 0)) {
            queries.reused += 1;
            continue;
        }
        queries.injected += 1;
        let (ret, out) = injector
            .call_out(main, libc::SYS_getitimer, 32, |at| {
                [which as u64, at, 0, 0, 0, 0]
            })
            .map_err(trace)?;
        if ret == 0 {
            let w =
                |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *slot = (w(0) * 1_000_000 + w(1), w(2) * 1_000_000 + w(3));
        }
    }
    let posix_timers = posix_timers(pid, &injector, main, &mut queries)?;
    let shmem = crate::shmem::capture(pid, &entries, &fds, tree.map(|t| &mut t.shmem_taken))?;
    let pending = main.pending_signals(true).map_err(trace)?;
    let creds = proc::creds(pid).map_err(proc_err(pid, format!("/proc/{pid}/status")))?;
    let umask = proc::umask(pid).map_err(proc_err(pid, format!("/proc/{pid}/status")))?;
    let personality =
        proc::personality(pid).map_err(proc_err(pid, format!("/proc/{pid}/personality")))?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map_err(proc_err(pid, format!("/proc/{pid}/cwd")))?
        .display()
        .to_string();
    let rlimits = proc::rlimits(pid).map_err(proc_err(pid, "prlimit64".into()))?;
    Ok(State {
        entries,
        process: ProcessInfo {
            pid,
            exe,
            mm,
            auxv,
            taken_unix_ns: 0,
            freeze_ns: 0,
            umask,
            personality,
            cwd,
            rlimits,
            sigactions,
            itimers,
            pending,
            creds,
            posix_timers,
            monotonic_ns: crate::monotonic_ns(),
            boottime_ns: crate::clock_ns(libc::CLOCK_BOOTTIME),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap_or_default()
                .trim()
                .to_string(),
        },
        threads,
        fds,
        shmem,
        tcp,
        pagemap,
        queries,
    })
}

impl State {
    /// The image record of mapping `m`.
    pub fn mapping(m: &MapEntry, pages_stored: u64, flags: u32) -> MappingInfo {
        MappingInfo {
            start: m.start,
            end: m.end,
            prot: m.prot,
            flags: m.image_flags() | flags,
            offset: m.offset,
            kind: m.kind(),
            path: m.path.clone(),
            dev: m.dev,
            inode: m.inode,
            pages_stored,
        }
    }

    /// The manifest, stamped with the time of writing and the freeze.
    pub fn manifest(
        &self,
        mappings: Vec<MappingInfo>,
        freeze_ns: u64,
        chain: Option<ChainInfo>,
    ) -> Manifest {
        let mut process = self.process.clone();
        process.taken_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        process.freeze_ns = freeze_ns;
        Manifest {
            process,
            threads: self.threads.clone(),
            mappings,
            fds: self.fds.clone(),
            chain,
            shmem: self.shmem.clone(),
        }
    }
}
