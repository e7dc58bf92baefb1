//! Process-wide resources: one file per kind, each holding its save side
//! (asked of the frozen process through `/proc` or an injected syscall),
//! its restore side (syscalls in the process being built, through
//! [`Sys`]) and the logged syscalls after which its saved answers must be
//! asked for again. [`KINDS`] is the registry; the restore runs each kind
//! in its [`Phase`], in registry order.
//!
//! Per-thread state ([`threads`]) is saved and restored thread by thread
//! by the engines; its kind is in the registry for the syscalls that
//! invalidate it.

pub mod cgroup;
pub mod creds;
pub mod flags;
pub mod itimers;
pub mod mm;
pub mod namespaces;
pub mod pending;
pub mod posix_timers;
pub mod prctl;
pub mod scheduling;
pub mod security;
pub mod session;
pub mod settings;
pub mod sharing;
pub mod sigactions;
pub mod terminal;
pub mod threads;

use cr_ebpf_image::{Manifest, ProcessInfo};

use crate::{sys::Sys, RestoreError, SaveError};

/// Every process-wide kind, in restore order within each phase.
pub static KINDS: &[&dyn ProcessKind] = &[
    &namespaces::Namespaces,
    &cgroup::Cgroups,
    &security::Security,
    &terminal::Terminal,
    &session::Session,
    &sharing::Sharing,
    &flags::Flags,
    &scheduling::Scheduling,
    &mm::Mm,
    &settings::Settings,
    &sigactions::SigActions,
    &threads::Threads,
    &pending::Pending,
    &itimers::ITimers,
    &posix_timers::PosixTimers,
    &prctl::Prctls,
];

/// When a kind is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// With the memory layout, once pages are filled (`mm`).
    Mm,
    /// Before the descriptors (`process`).
    Process,
    /// Last, once every thread exists (`signals`): a timer firing or a
    /// signal queued earlier would interrupt the build.
    Signals,
    /// Thread by thread, by the engine.
    Threads,
}

/// One process-wide kind of state.
pub trait ProcessKind: Sync {
    /// Its name, for errors.
    fn name(&self) -> &'static str;

    /// When it is restored.
    fn phase(&self) -> Phase;

    /// Syscalls (numbers of `cr_ebpf_common::syscalls`) after which its
    /// saved answers no longer hold.
    fn invalidated_by(&self) -> &'static [u32] {
        &[]
    }

    /// Marks `changes` for one of [`ProcessKind::invalidated_by`].
    fn invalidate(&self, _changes: &mut Changes) {}

    /// Fills its part of `p` from the frozen process.
    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError>;

    /// Sets its part of `p` in the process being built.
    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError>;
}

/// Marks `changes` for a logged syscall `nr` of the process: every kind it
/// invalidates.
pub fn invalidate(nr: u32, changes: &mut Changes) {
    for k in KINDS.iter().filter(|k| k.invalidated_by().contains(&nr)) {
        k.invalidate(changes);
    }
}

/// Restores every kind of `phase`, in registry order.
pub fn restore(phase: Phase, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
    KINDS
        .iter()
        .filter(|k| k.phase() == phase)
        .try_for_each(|k| k.restore(sys, p))
}

/// Saves every kind into `p`.
pub fn save(cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
    KINDS.iter().try_for_each(|k| k.save(cx, p))
}

/// What saving the process-wide state of a frozen process needs.
pub struct SaveCx<'a> {
    /// The process.
    pub pid: i32,
    /// Questions only the process can answer (injected syscalls).
    pub ask: &'a dyn crate::sys::ask::Ask,
    /// The previous checkpoint of the process, when its answers may be
    /// reused (the resource log is complete since).
    pub known: Option<&'a Manifest>,
    /// What the log says changed since.
    pub changes: &'a Changes,
    /// The injected queries made and skipped.
    pub queries: &'a mut Queries,
    /// The end of `[heap]` (the program break), if there is a heap.
    pub brk: Option<u64>,
    /// The processes checkpointed together with it (itself included).
    pub together: &'a [i32],
    /// Take a shell job (`dump --shell-job`): a session and controlling
    /// terminal outside the checkpoint become the restorer's at restore.
    pub shell_job: bool,
    /// Its cgroups, read already on another thread while the process was
    /// frozen ([`cgroup::record`]); `None`: read when their kind is saved.
    pub cgroups: Option<Result<cgroup::Recorded, SaveError>>,
}

impl SaveCx<'_> {
    /// `/proc/PID/FILE` of the process and `/proc/self/FILE` of cr-ebpf:
    /// what the process has, and what a restore would give it.
    pub fn theirs_and_ours(&self, file: &str) -> Result<(String, String), SaveError> {
        let read = |p: String| std::fs::read_to_string(&p).map_err(crate::proc_err(self.pid, p));
        Ok((
            read(format!("/proc/{}/{file}", self.pid))?,
            read(format!("/proc/self/{file}"))?,
        ))
    }

    /// "not supported: WHAT in process P".
    pub fn refuse(&self, what: impl Into<String>) -> SaveError {
        SaveError::NotSupported {
            pid: self.pid,
            what: what.into(),
        }
    }
}

/// Saving a kind through a scripted [`Ask`](crate::sys::ask::Ask).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// `kind` saved from `ask` (the process is the test itself, for what
    /// is read from `/proc`), with the previous checkpoint `prev`.
    pub fn save_with(
        kind: &dyn ProcessKind,
        ask: &dyn crate::sys::ask::Ask,
        prev: Option<&Manifest>,
        changes: &Changes,
    ) -> (ProcessInfo, Queries) {
        let me = std::process::id() as i32;
        // The test runs in the harness's session: as if checkpointed with it.
        let st = crate::proc::stat(me).unwrap();
        let together = [me, st.sid, st.pgid];
        let mut queries = Queries::default();
        let mut p = ProcessInfo::default();
        let mut cx = SaveCx {
            pid: me,
            ask,
            known: prev.filter(|_| !changes.unknown),
            changes,
            queries: &mut queries,
            brk: None,
            together: &together,
            shell_job: false,
            cgroups: None,
        };
        kind.save(&mut cx, &mut p).unwrap();
        (p, queries)
    }

    /// `kind` saved from `ask` for the test process checkpointed together
    /// with `together`.
    pub fn try_save_with(
        kind: &dyn ProcessKind,
        ask: &dyn crate::sys::ask::Ask,
        together: &[i32],
    ) -> Result<ProcessInfo, SaveError> {
        let changes = Changes::all();
        let mut queries = Queries::default();
        let mut p = ProcessInfo::default();
        let mut cx = SaveCx {
            pid: std::process::id() as i32,
            ask,
            known: None,
            changes: &changes,
            queries: &mut queries,
            brk: None,
            together,
            shell_job: false,
            cgroups: None,
        };
        kind.save(&mut cx, &mut p).map(|()| p)
    }
}

/// Reads the little-endian u64 number `i` of `bytes`.
pub(crate) fn word(bytes: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

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
    /// `prctl` settings or membarrier registrations may have changed
    /// (`prctl`, `membarrier`).
    pub prctl: bool,
    /// Address ranges whose mappings' own settings may have changed
    /// (`madvise`, `mlock`, `munlock`, `mseal`, `mmap` with
    /// `MAP_LOCKED`): see the advice module.
    pub advice: Vec<(u64, u64)>,
    /// Settings of any mapping may have changed (`mlockall`, `munlockall`).
    pub advice_unknown: bool,
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
            prctl: true,
            advice: Vec::new(),
            advice_unknown: true,
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
            prctl: false,
            advice: Vec::new(),
            advice_unknown: false,
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
