//! `dump`: a full checkpoint of one live process, or of a process tree
//! (every process frozen before any is read, one image per live process
//! under `proc-PID/`, and `tree.img` with the parent links, process groups,
//! sessions and zombies).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cr_ebpf_image::{publish, ImageError};
use cr_ebpf_tracee::Frozen;

use crate::{
    error::proc_err,
    fds::{check_tree as check_unix_pairs, TreeScope},
    freeze::{freeze_tree, thaw_all, FrozenTree},
    maps,
    pages::{split_runs, worker_pool, write_pages, write_processes},
    state::{self, Changes, State},
    DumpError,
};

/// How to dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Resume the process afterwards instead of killing it.
    pub leave_running: bool,
    /// Threads reading and compressing pages (0: all cores).
    pub threads: usize,
}

/// What a dump did.
#[derive(Debug, Clone)]
pub struct DumpReport {
    /// The process.
    pub pid: i32,
    /// Its threads.
    pub threads: usize,
    /// Its mappings.
    pub mappings: usize,
    /// Pages stored.
    pub pages: u64,
    /// Size of the page store on disk.
    pub page_bytes: u64,
    /// First thread stopped until the last resumed (or the process was killed).
    pub freeze: Duration,
    /// The whole dump.
    pub total: Duration,
    /// Threads that read and compressed pages.
    pub workers: usize,
}

impl DumpReport {
    /// Page data read per second of freeze, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        (self.pages * 4096) as f64 / self.total.as_secs_f64() / 1e9
    }
}

/// Checkpoints process `pid` into a new image directory `dir`.
pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpReport, DumpError> {
    let start = Instant::now();
    if pid == std::process::id() as i32 {
        return Err(DumpError::NotSupported {
            pid,
            what: "cr-ebpf cannot checkpoint itself".into(),
        });
    }
    if dir.exists() {
        return Err(ImageError::Exists {
            path: dir.display().to_string(),
        }
        .into());
    }
    // A process with children: the whole tree, as one checkpoint.
    if !crate::proc::children(pid).is_empty() {
        return dump_tree(pid, dir, opts, start);
    }
    let pool = worker_pool(pid, opts.threads, "dump-reader")?;
    let workers = pool.current_num_threads();

    // From here on an error drops `frozen`, which resumes every thread.
    let frozen = Frozen::freeze(pid).map_err(|source| DumpError::Trace { pid, source })?;
    let trace = |source| DumpError::Trace { pid, source };
    let state = state::collect(&frozen, None, &Changes::all())?;

    // Which pages to store, split into chunks for the readers.
    let mut mappings = Vec::new();
    let mut work: Vec<(u64, u64)> = Vec::new();
    for m in &state.entries {
        let runs = maps::dumpable_runs(&state.pagemap, m)
            .map_err(proc_err(pid, format!("/proc/{pid}/pagemap")))?;
        let stored: u64 = runs.iter().map(|r| r.1).sum();
        split_runs(&runs, &mut work);
        mappings.push(State::mapping(m, stored, 0));
    }
    let threads = state.threads.len();

    let mut frozen = Some(frozen);
    let mut freeze = Duration::ZERO;
    let (pages, page_bytes) = publish(dir, |tmp| {
        let stored = write_pages(tmp, &pool, pid, &work, Vec::new(), || {
            // Everything is read: a process that stays alive can run again
            // while the files are finished.
            if opts.leave_running {
                if let Some(f) = frozen.take() {
                    let since = f.since;
                    f.thaw().map_err(|e| ImageError::Io {
                        path: format!("process {pid}"),
                        what: "resuming",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    freeze = since.elapsed();
                }
            }
            Ok(())
        })?;
        let freeze_ns = match &frozen {
            // Killed right after publication: count up to now.
            Some(f) => f.since.elapsed().as_nanos() as u64,
            None => freeze.as_nanos() as u64,
        };
        state
            .manifest(mappings.clone(), freeze_ns, None)
            .write(tmp)?;
        Ok(stored)
    })?;

    // Published: only now may the process go, as `criu dump` does.
    if let Some(f) = frozen.take() {
        let since = f.since;
        // Its TCP connections close silently (repair mode) when it dies: the
        // peers wait for the restored process instead of seeing a reset.
        for (_, sock) in &state.tcp {
            let _ = cr_ebpf_resources::fd::socket::tcp::repair_mode(sock, true);
        }
        f.kill().map_err(trace)?;
        freeze = since.elapsed();
    }
    Ok(DumpReport {
        pid,
        threads,
        mappings: mappings.len(),
        pages,
        page_bytes,
        freeze,
        total: start.elapsed(),
        workers,
    })
}

/// Checkpoints `root` and all its descendants into the new image `dir`.
fn dump_tree(
    root: i32,
    dir: &Path,
    opts: &DumpOptions,
    start: Instant,
) -> Result<DumpReport, DumpError> {
    let pool = worker_pool(root, opts.threads, "dump-reader")?;
    let workers = pool.current_num_threads();
    let stopped = freeze_tree(root)?;
    let since = stopped.since();
    let FrozenTree { tree, frozen, .. } = stopped;
    let live: Vec<i32> = frozen.iter().map(Frozen::pid).collect();
    let mut scope = TreeScope::new(&live);
    let mut states: Vec<State> = Vec::new();
    for f in &frozen {
        states.push(state::collect_in(
            f,
            None,
            &Changes::all(),
            Some(&mut scope),
        )?);
    }
    let all: Vec<(i32, &[cr_ebpf_image::FdInfo])> = live
        .iter()
        .zip(&states)
        .map(|(p, s)| (*p, &s.fds[..]))
        .collect();
    check_unix_pairs(&all)?;

    // Pages of every process, planned while frozen.
    let mut plans = Vec::new();
    for (pid, s) in live.iter().zip(&states) {
        let mut mappings = Vec::new();
        let mut work = Vec::new();
        for m in &s.entries {
            let runs = maps::dumpable_runs(&s.pagemap, m)
                .map_err(proc_err(*pid, format!("/proc/{pid}/pagemap")))?;
            let stored: u64 = runs.iter().map(|r| r.1).sum();
            split_runs(&runs, &mut work);
            mappings.push(State::mapping(m, stored, 0));
        }
        plans.push((mappings, work));
    }
    let threads: usize = states.iter().map(|s| s.threads.len()).sum();
    let mappings: usize = plans.iter().map(|p| p.0.len()).sum();
    let mut frozen = Some(frozen);
    let mut freeze = Duration::ZERO;
    let (pages, page_bytes) = publish(dir, |tmp| {
        tree.write(tmp)?;
        let procs = live
            .iter()
            .zip(&plans)
            .map(|(pid, (_, work))| (*pid, &work[..], Vec::new()))
            .collect();
        let (subs, pages, bytes) = write_processes(tmp, true, &pool, procs, || {
            // Everything read: a tree that stays alive runs again while the
            // files are finished.
            if opts.leave_running {
                if let Some(all) = frozen.take() {
                    freeze = since.elapsed();
                    thaw_all(all).map_err(|e| cr_ebpf_image::ImageError::Io {
                        path: format!("process tree of {root}"),
                        what: "resuming",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                }
            }
            Ok(())
        })?;
        let freeze_ns = match &frozen {
            Some(_) => since.elapsed(),
            None => freeze,
        }
        .as_nanos() as u64;
        for ((s, (maps, _)), sub) in states.iter().zip(&plans).zip(&subs) {
            s.manifest(maps.clone(), freeze_ns, None).write(sub)?;
        }
        Ok((pages, bytes))
    })?;
    // Published: only now may a tree that is not left running go.
    if let Some(all) = frozen.take() {
        if opts.leave_running {
            thaw_all(all)?;
        } else {
            // TCP connections close silently (repair mode) when they die.
            for s in &states {
                for (_, sock) in &s.tcp {
                    let _ = cr_ebpf_resources::fd::socket::tcp::repair_mode(sock, true);
                }
            }
            for f in all.into_iter().rev() {
                let pid = f.pid();
                f.kill()
                    .map_err(|source| DumpError::Trace { pid, source })?;
            }
        }
        freeze = since.elapsed();
    }
    Ok(DumpReport {
        pid: root,
        threads,
        mappings,
        pages,
        page_bytes,
        freeze,
        total: start.elapsed(),
        workers,
    })
}
