//! Warming up the first checkpoint of a session: what the later ones
//! reuse from the checkpoint before (each mapping's settings from smaps,
//! guard regions, the answers only injected syscalls give: signal
//! handlers, timers, prctl values), collected while the processes run,
//! each injected question in a stop of its own. The first checkpoint then
//! takes them as the later ones take their parent's, re-asking whatever the
//! resource log shows changed since the log started (it is running before
//! the warm-up, so nothing done meanwhile is missed), and its freeze is
//! bounded by what changed, like theirs.

use cr_ebpf_image::{Manifest, ProcessInfo};
use cr_ebpf_resources::{
    advice,
    process::{self, SaveCx},
    sys::ask::Ask,
    SaveError,
};
use cr_ebpf_tracee::{Frozen, Injector};

use crate::{
    error::proc_err,
    maps,
    state::{Changes, Queries, State},
    DumpError,
};

/// [`Ask`] of a running process: each question stops it on its own (all
/// its threads, about a quarter of a millisecond here) and lets it go.
struct Brief {
    pid: i32,
    injector: Injector,
    /// Stops, and the longest.
    stops: std::cell::Cell<(u32, std::time::Duration)>,
    /// When it was stopped (monotonic ns): its syscalls then are ours.
    windows: std::cell::RefCell<Vec<(i32, u64, u64)>>,
}

impl Ask for Brief {
    fn call_out(
        &self,
        nr: i64,
        out_len: usize,
        args: &dyn Fn(u64) -> [u64; 6],
    ) -> Result<(i64, Vec<u8>), SaveError> {
        let trace = |source| SaveError::Trace {
            pid: self.pid,
            source,
        };
        let t = std::time::Instant::now();
        let from = crate::monotonic_ns();
        let frozen = Frozen::freeze(self.pid).map_err(trace)?;
        // Between two stops the process may have replaced its program: the
        // instruction found before may not be one now. The warm-up is then
        // given up (the checkpoint collects the process while frozen).
        let r = if self.injector.intact() {
            self.injector
                .call_out(&frozen.threads()[0], nr, out_len, args)
                .map_err(trace)
        } else {
            Err(trace(cr_ebpf_tracee::TraceError::Unexpected {
                tid: self.pid,
                what: "it replaced its program (execve) while it was asked questions".into(),
            }))
        };
        // Its own calls complete after this (it runs again only after the
        // thaw), and those that completed since `from` did so before the
        // question, whose answer shows them.
        let to = crate::monotonic_ns();
        frozen.thaw().map_err(trace)?;
        self.windows.borrow_mut().push((self.pid, from, to));
        let (n, worst) = self.stops.get();
        self.stops.set((n + 1, worst.max(t.elapsed())));
        r
    }

    /// Read at the freeze, always (transient).
    fn pending_signals(&self) -> Result<Vec<Vec<u8>>, SaveError> {
        Ok(Vec::new())
    }

    /// Read at the freeze, always.
    fn job_stop(&self) -> i32 {
        0
    }
}

/// What a warm-up did.
#[derive(Debug, Clone, Default)]
pub struct WarmUp {
    /// Injected questions asked, each in a stop of its own.
    pub stops: u32,
    /// The longest of those stops.
    pub worst_stop: std::time::Duration,
    /// Each stop: (pid, from, to), `CLOCK_MONOTONIC` ns. The syscalls the
    /// resource log shows that process making then are the questions, not
    /// changes of its own: the log must leave them out.
    pub windows: Vec<(i32, u64, u64)>,
}

/// Collects, while `pid` runs, what its first checkpoint would otherwise
/// collect frozen; returns it as the previous checkpoint's manifest would
/// hold it (mappings with their settings and guards, process-wide answers;
/// no threads: theirs are collected at the freeze).
pub(super) fn warm_up(pid: i32, together: &[i32]) -> Result<(Manifest, WarmUp), DumpError> {
    let maps_path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&maps_path).map_err(proc_err(pid, maps_path.clone()))?;
    let mut entries = maps::parse_maps(&text).map_err(|e| DumpError::Proc {
        pid,
        path: maps_path,
        source: std::io::Error::other(e),
    })?;
    maps::mark_tmpfs(pid, &mut entries);
    let smaps = format!("/proc/{pid}/smaps");
    // A sealed mapping is refused by the checkpoint itself.
    advice::read(pid, &mut entries).map_err(proc_err(pid, smaps))?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap =
        std::fs::File::open(&pagemap_path).map_err(proc_err(pid, pagemap_path.clone()))?;
    cr_ebpf_resources::proc::guards::mark(&pagemap, &mut entries, None, &|_, _| true)
        .map_err(proc_err(pid, format!("{pagemap_path} (PAGEMAP_SCAN)")))?;
    let injector = {
        // The search for the syscall instruction reads the process's code:
        // stopped for it, as at a checkpoint.
        let frozen = Frozen::freeze(pid).map_err(|source| DumpError::Trace { pid, source })?;
        let i = Injector::new(pid);
        frozen
            .thaw()
            .map_err(|source| DumpError::Trace { pid, source })?;
        i.map_err(|source| DumpError::Trace { pid, source })?
    };
    let ask = Brief {
        pid,
        injector,
        stops: Default::default(),
        windows: Default::default(),
    };
    let mut info = ProcessInfo {
        pid,
        ..ProcessInfo::default()
    };
    let mut queries = Queries::default();
    let mut cx = SaveCx {
        pid,
        together,
        shell_job: false,
        ask: &ask,
        known: None,
        changes: &Changes::all(),
        queries: &mut queries,
        brk: entries
            .iter()
            .find(|m| m.kind() == cr_ebpf_image::MappingKind::Heap)
            .map(|m| m.end),
        cgroups: None,
    };
    process::save(&mut cx, &mut info)?;
    let (stops, worst_stop) = ask.stops.get();
    let windows = ask.windows.take();
    let manifest = Manifest {
        process: info,
        mappings: entries.iter().map(|m| State::mapping(m, 0, 0)).collect(),
        ..Manifest::default()
    };
    Ok((
        manifest,
        WarmUp {
            stops,
            worst_stop,
            windows,
        },
    ))
}
