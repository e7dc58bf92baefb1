//! A full checkpoint of a process tree: every process frozen before any is
//! read, one image per live process under `proc-PID/`, and `tree.img` with
//! the parent links, process groups, sessions and zombies.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cr_ebpf_image::{
    publish,
    tree::{Tree, TreeProcess},
};
use cr_ebpf_tracee::Frozen;

use crate::{
    dump::{split_runs, worker_pool, write_pages, DumpOptions, DumpReport},
    fds::{check_tree as check_unix_pairs, TreeScope},
    maps, proc,
    state::{self, proc_err, Changes, State},
    DumpError,
};

/// What `/proc/PID/stat` says of a process.
pub(crate) struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// When it started, in clock ticks since boot: a pid reused by another
    /// process has another start time.
    pub start_time: u64,
    /// A zombie's wait status.
    pub exit_code: i32,
}

/// Reads `/proc/PID/stat`.
pub(crate) fn stat(pid: i32) -> Result<Stat, DumpError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path.clone()))?;
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 2..])
        .ok_or_else(|| DumpError::NotSupported {
            pid,
            what: format!("an unreadable {path}"),
        })?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field n (1-based) of the whole line is f[n - 3].
    let num = |n: usize| -> i64 { f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok(Stat {
        state: f.first().and_then(|s| s.chars().next()).unwrap_or('?'),
        ppid: num(4) as i32,
        pgid: num(5) as i32,
        sid: num(6) as i32,
        start_time: num(22) as u64,
        exit_code: num(52) as i32,
    })
}

/// Clock ticks per second (`/proc/PID/stat` times are in these).
pub(crate) fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Time since boot in clock ticks (the unit of [`Stat::start_time`], which
/// the kernel counts on `CLOCK_BOOTTIME`).
pub(crate) fn uptime_ticks() -> u64 {
    crate::clock_ns(libc::CLOCK_BOOTTIME) / (1_000_000_000 / clock_ticks())
}

/// `root` and its descendants, parents before children.
pub(crate) fn processes(root: i32) -> Vec<i32> {
    let mut order = vec![root];
    let mut i = 0;
    while i < order.len() {
        for c in proc::children(order[i]) {
            if !order.contains(&c) {
                order.push(c);
            }
        }
        i += 1;
    }
    order
}

/// A process tree with every live process stopped.
pub(crate) struct FrozenTree {
    /// Parent links, groups, sessions, zombies; live processes' images go
    /// to `proc-PID/`.
    pub tree: Tree,
    /// The live processes, in the tree's order. Dropping one resumes it.
    pub frozen: Vec<Frozen>,
    /// Their start times (see [`Stat::start_time`]).
    pub start_times: Vec<u64>,
}

impl FrozenTree {
    /// When the first process was stopped.
    pub fn since(&self) -> Instant {
        self.frozen
            .first()
            .map(|f| f.since)
            .unwrap_or_else(Instant::now)
    }

    /// Lets every process run again.
    pub fn thaw(self) -> Result<(), DumpError> {
        thaw_all(self.frozen)
    }
}

/// Stops `root` and every descendant (each thread, by ptrace) before
/// anything is read, so that a checkpoint is one instant of the whole tree.
/// A process forked while the tree was being stopped would be missed: then
/// everything is let go and stopping starts again (a few times).
pub(crate) fn freeze_tree(root: i32) -> Result<FrozenTree, DumpError> {
    const TRIES: usize = 5;
    for _ in 0..TRIES {
        let pids = processes(root);
        let mut tree = Tree::default();
        let mut frozen: Vec<Frozen> = Vec::new();
        let mut start_times = Vec::new();
        for &pid in &pids {
            let st = stat(pid)?;
            let zombie = st.state == 'Z';
            if !zombie {
                frozen
                    .push(Frozen::freeze(pid).map_err(|source| DumpError::Trace { pid, source })?);
                start_times.push(st.start_time);
            }
            tree.processes.push(TreeProcess {
                pid,
                ppid: if pid == root { 0 } else { st.ppid },
                pgid: st.pgid,
                sid: st.sid,
                zombie: zombie.then_some(st.exit_code),
                dir: if zombie {
                    String::new()
                } else {
                    format!("proc-{pid}")
                },
            });
        }
        // Nothing can fork any more; a child made meanwhile shows now.
        if processes(root) == pids {
            return Ok(FrozenTree {
                tree,
                frozen,
                start_times,
            });
        }
    }
    Err(DumpError::NotSupported {
        pid: root,
        what: format!(
            "a process tree that kept changing while it was being stopped ({TRIES} tries; \
             try again)"
        ),
    })
}

/// The pages of one process for [`write_processes`]: its pid, the runs to
/// read from it (frozen) and the pages copied already.
pub(crate) type ProcessPages<'a> = (i32, &'a [(u64, u64)], Vec<(u64, Vec<u8>)>);

/// Writes the page store of every process into `tmp`: into `proc-PID/` of
/// a tree image, or `tmp` itself for a single process. `read_done` runs
/// once the memory of the last process is read (the tree may run again).
/// Returns each process's image directory, pages and bytes on disk.
pub(crate) fn write_processes(
    tmp: &Path,
    is_tree: bool,
    pool: &rayon::ThreadPool,
    procs: Vec<ProcessPages<'_>>,
    read_done: impl FnOnce() -> Result<(), cr_ebpf_image::ImageError>,
) -> Result<(Vec<std::path::PathBuf>, u64, u64), cr_ebpf_image::ImageError> {
    let n = procs.len();
    let mut read_done = Some(read_done);
    let (mut pages, mut bytes) = (0, 0);
    let mut dirs = Vec::new();
    for (i, (pid, live, buffered)) in procs.into_iter().enumerate() {
        let sub = if is_tree {
            let sub = tmp.join(format!("proc-{pid}"));
            std::fs::create_dir(&sub).map_err(|source| cr_ebpf_image::ImageError::Io {
                path: sub.display().to_string(),
                what: "creating",
                source,
            })?;
            sub
        } else {
            tmp.to_path_buf()
        };
        let last = (i + 1 == n).then(|| read_done.take()).flatten();
        let (p, b) = write_pages(&sub, pool, pid, live, buffered, || {
            last.map_or(Ok(()), |done| done())
        })?;
        pages += p;
        bytes += b;
        dirs.push(sub);
    }
    Ok((dirs, pages, bytes))
}

/// Resumes every process; the first failure is returned after all were tried.
fn thaw_all(all: Vec<Frozen>) -> Result<(), DumpError> {
    let mut first = None;
    for f in all {
        let pid = f.pid();
        if let Err(source) = f.thaw() {
            first.get_or_insert(DumpError::Trace { pid, source });
        }
    }
    first.map_or(Ok(()), Err)
}

/// Checkpoints `root` and all its descendants into the new image `dir`.
pub(crate) fn dump_tree(
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
