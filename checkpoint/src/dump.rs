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
    fds::{check_tree, TreeScope},
    freeze::freeze_tree,
    maps,
    netlock::Held,
    pages::{split_runs, worker_pool, write_processes, ProcessPages},
    precopy::Precopy,
    state::{self, Changes, State},
    streamed::Streamed,
    watchdog::{phase, Watchdog},
    DumpError,
};

/// How to dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Resume the process afterwards instead of killing it.
    pub leave_running: bool,
    /// Threads reading and compressing pages (0: all cores).
    pub threads: usize,
    /// Take a shell job: a process whose session and controlling terminal
    /// are its shell's (outside the checkpoint) is recorded as such, and a
    /// restore with `--shell-job` puts it in the restorer's session with
    /// the restorer's terminal. Refused without it.
    pub shell_job: bool,
    /// Most bytes of a deleted file held open or mapped stored in the
    /// image (0: the default, `cr_ebpf_resources::ghost::DEFAULT_LIMIT`).
    pub ghost_limit: u64,
    /// Most allocated bytes of one shared memory object stored (0: the
    /// default, `cr_ebpf_resources::shmem::DEFAULT_SHM_LIMIT`); its contents
    /// are held in memory while the process is frozen.
    pub shm_limit: u64,
    /// What locks the process's TCP connections from before they are read
    /// until the restore, when the process is not left running (`None`: no
    /// lock; a peer that sends while the process is down gets a reset).
    pub network_lock: Option<std::sync::Arc<dyn crate::ConnectionLock>>,
    /// Take unix stream connections to named sockets outside the
    /// checkpoint: connected to the same name again at restore, a new
    /// connection to their peer. Refused without it.
    pub ext_unix_sk: bool,
    /// Most time the process may be held frozen before the image is
    /// published; past it a watchdog removes the network lock, says what
    /// the dump was stuck on and **ends this program** (the only way to let
    /// go of threads held by a tracer thread that does not return), which
    /// leaves the process running and publishes nothing. `None`: no bound.
    pub freeze_limit: Option<Duration>,
    /// Do not pre-copy: read every page while the process is frozen. By
    /// default a write tracker is attached first and the pages are copied
    /// into the image's page store while the process runs; the freeze then
    /// reads only those written after their copy, patched into the store
    /// once the process may run again (see `precopy.rs`).
    pub no_precopy: bool,
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
    /// Frozen: from the first thread stopped until every page and every
    /// piece of state was read, when the process could run again (a dump
    /// that leaves it running resumes it then; compression, writing and
    /// fsync come after).
    pub freeze: Duration,
    /// Stopped: from the first thread stopped until it was resumed or
    /// killed. A dump that kills holds the process stopped until its image
    /// is on disk, then kills it: this includes the write and fsync.
    pub stopped: Duration,
    /// Pages copied while the process ran (all passes; some may have been
    /// read again while frozen, having been written after their copy).
    pub precopied: u64,
    /// Pre-copy passes and their time, before the freeze.
    pub precopy_passes: usize,
    /// Time spent pre-copying, the process running.
    pub precopy: Duration,
    /// The whole dump.
    pub total: Duration,
    /// Threads that read and compressed pages.
    pub workers: usize,
    /// The network lock holding its TCP connections until the restore.
    pub network_lock: Option<String>,
}

impl DumpReport {
    /// Page data read per second of freeze, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        (self.pages * 4096) as f64 / self.total.as_secs_f64() / 1e9
    }
}

/// Checkpoints process `pid` into a new image directory `dir`: a single
/// image, or a tree image when it has children (each process frozen before
/// any is read).
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
    cr_ebpf_image::trust::check_destination(dir)?;
    crate::freeze::checkable(pid)?;
    let pool = worker_pool(pid, opts.threads, "dump-reader")?;
    let workers = pool.current_num_threads();
    // What a dump killed before it finished left here goes first.
    cr_ebpf_image::sweep_leftovers(dir);
    let staging = staging_dir(dir);
    let mut pre = (!opts.no_precopy).then(|| Precopy::run(pid, &pool, &staging));
    let mut watchdog = opts.freeze_limit.map(|l| Watchdog::start(pid, l));
    phase("stopping the processes");
    // From here on an error drops `stopped`, which resumes every thread.
    let mut stopped = freeze_tree(pid)?;
    let since = stopped.since();
    let start_times = stopped.start_times.clone();
    let tree = std::mem::take(&mut stopped.tree);
    let is_tree = tree.processes.len() > 1;
    let live: Vec<i32> = stopped.frozen.iter().map(Frozen::pid).collect();
    // Before any connection is read, so that nothing a peer sends from now
    // on is acknowledged by a socket about to go. Dropped (removed) on any
    // error below, before the tree is resumed.
    phase("locking the network connections");
    let held = match (&opts.network_lock, opts.leave_running) {
        (Some(lock), false) => Held::take(lock, pid, &live)?,
        _ => None,
    };
    if let (Some(w), Some(h), Some(lock)) = (&watchdog, &held, &opts.network_lock) {
        w.holds(lock.clone(), h.name().to_string());
    }
    let mut states = collect_states(&stopped.frozen, &live, opts)?;
    // Each live process's parent among them, by index.
    let parents: Vec<Option<usize>> = live
        .iter()
        .map(|p| {
            let ppid = tree.processes.iter().find(|t| t.pid == *p)?.ppid;
            live.iter().position(|q| *q == ppid)
        })
        .collect();
    phase("finding the pages to store");
    let mut plans = plan_pages(&live, &states, &parents)?;
    phase("bringing the pre-copied pages up to date");
    let mut buffered = buffered_pages(
        &live,
        &start_times,
        &mut states,
        &mut plans,
        pre.as_mut(),
        &pool,
    )?;
    let threads: usize = states.iter().map(|s| s.threads.len()).sum();
    let mappings: usize = plans.iter().map(|p| p.0.len()).sum();

    let mut frozen = Some(stopped);
    let mut freeze = Duration::ZERO;
    let mut stopped_for = Duration::ZERO;
    phase("reading memory into pages.img");
    let (pages, page_bytes) = publish(dir, |tmp| {
        if is_tree {
            tree.write(tmp)?;
        }
        let procs = live
            .iter()
            .zip(&plans)
            .zip(&mut buffered)
            .map(|((pid, (_, work, _)), (streamed, shm))| ProcessPages {
                pid: *pid,
                live: &work[..],
                buffered: std::mem::take(shm),
                streamed: streamed.take(),
            })
            .collect();
        let (subs, pages, bytes) = write_processes(tmp, is_tree, &pool, procs, || {
            // Everything read: what stays alive runs again while the files
            // are finished.
            freeze = since.elapsed();
            if opts.leave_running {
                if let Some(w) = &mut watchdog {
                    w.disarm();
                }
                if let Some(t) = frozen.take() {
                    t.thaw().map_err(|e| ImageError::Io {
                        path: format!("process {pid} (and its descendants)"),
                        what: "resuming",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    stopped_for = since.elapsed();
                }
            }
            Ok(())
        })?;
        let freeze_ns = freeze.as_nanos() as u64;
        phase("writing the manifests and syncing the image to disk");
        for (i, ((s, (maps, _, cow)), sub)) in states.iter().zip(&plans).zip(&subs).enumerate() {
            let mut m = s.manifest(maps.clone(), freeze_ns, None);
            m.cow = cow.clone();
            if i == 0 {
                m.network_lock = held.as_ref().map(|h| h.name().to_string());
            }
            m.write(sub)?;
        }
        Ok((pages, bytes))
    })?;
    if let Some(w) = &mut watchdog {
        w.disarm();
    }
    // Published: only now may what is not left running go, as `criu dump`
    // does. Its TCP connections close silently (repair mode) when it dies:
    // the peers wait for the restored process instead of seeing a reset.
    let mut network_lock = None;
    if let Some(t) = frozen.take() {
        phase("killing the processes");
        for (_, sock) in states.iter().flat_map(|s| &s.tcp) {
            let _ = cr_ebpf_resources::fd::socket::tcp::repair_mode(sock, true);
        }
        t.kill()?;
        stopped_for = since.elapsed();
        // The restore removes it once the connections exist again.
        if let Some(h) = held {
            network_lock = Some(h.name().to_string());
            h.keep();
        }
    }
    Ok(DumpReport {
        pid,
        threads,
        mappings,
        pages,
        page_bytes,
        freeze,
        stopped: stopped_for,
        precopied: pre.as_ref().map_or(0, |p| p.pages),
        precopy_passes: pre.as_ref().map_or(0, |p| p.passes),
        precopy: pre.as_ref().map_or(Duration::ZERO, |p| p.took),
        total: start.elapsed(),
        workers,
        network_lock,
    })
}

/// Pages in memory, by address.
type Pages = Vec<(u64, Vec<u8>)>;

/// Where the pre-copy of a dump into `dir` makes its page stores: next to
/// the image's own temporary directory, private, removed by the dump.
fn staging_dir(dir: &Path) -> std::path::PathBuf {
    let name = dir
        .file_name()
        .map_or("image".into(), |n| n.to_string_lossy().into_owned());
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    parent.join(format!(".{name}.tmp-{}-precopy", std::process::id()))
}

/// The pages of each frozen process that are not read from it by the page
/// writers: those pre-copied into its store and not written since (taken
/// out of its `plans` runs), and the contents of its shared memory objects
/// (read now).
fn buffered_pages(
    live: &[i32],
    start_times: &[u64],
    states: &mut [State],
    plans: &mut Plans,
    mut pre: Option<&mut Precopy>,
    pool: &rayon::ThreadPool,
) -> Result<Vec<(Option<Streamed>, Pages)>, DumpError> {
    let mut buffered = Vec::new();
    for (((pid, st), s), plan) in live.iter().zip(start_times).zip(states.iter()).zip(plans) {
        let streamed = match pre.as_deref_mut() {
            Some(pre) => {
                let (runs, streamed) = pre.take(pool, *pid, *st, &s.entries, &plan.1);
                plan.1 = runs;
                streamed
            }
            None => None,
        };
        buffered.push((streamed, Vec::new()));
    }
    for ((pid, s), b) in live.iter().zip(states.iter_mut()).zip(&mut buffered) {
        phase(format!("reading the shared memory of process {pid}"));
        let placed = crate::shm_pages::place(
            *pid,
            &mut s.shmem,
            &s.shm_files,
            None,
            |_| None,
            false,
            pool,
        )?;
        b.1.extend(placed.pages);
    }
    Ok(buffered)
}

/// The state of every frozen process, with what they share found and
/// the tree's checks made.
fn collect_states(
    frozen: &[Frozen],
    live: &[i32],
    opts: &DumpOptions,
) -> Result<Vec<State>, DumpError> {
    let mut scope = TreeScope::new(live);
    scope.shell_job = opts.shell_job;
    scope.ext_unix_sk = opts.ext_unix_sk;
    let mut states: Vec<State> = Vec::new();
    for f in frozen {
        phase(format!("reading the state of process {}", f.pid()));
        states.push(state::collect(
            f,
            None,
            &Changes::all(),
            Some(&mut scope),
            state::Allow {
                ext_unix_sk: opts.ext_unix_sk,
                limits: cr_ebpf_resources::shmem::Limits::new(opts.ghost_limit, opts.shm_limit),
            },
        )?);
    }
    let in_flight = State::in_flight(live.iter().copied().zip(&states));
    let mut shared: Vec<(i32, &mut [cr_ebpf_image::FdInfo])> = live
        .iter()
        .zip(&mut states)
        .map(|(p, s)| (*p, &mut s.fds[..]))
        .collect();
    cr_ebpf_resources::fd::description::share(&mut shared, &in_flight);
    let all: Vec<(i32, &[cr_ebpf_image::FdInfo])> = live
        .iter()
        .zip(&states)
        .map(|(p, s)| (*p, &s.fds[..]))
        .collect();
    check_tree(&all, &scope)?;
    Ok(states)
}

/// The mappings of each frozen process with the pages they store, the
/// page runs to read (in chunks for the readers), and the runs it shares
/// with its parent (copy-on-write since a fork: not stored, shared again
/// by the restore).
type Plans = Vec<(
    Vec<cr_ebpf_image::MappingInfo>,
    Vec<(u64, u64)>,
    Vec<cr_ebpf_image::CowRun>,
)>;

fn plan_pages(
    live: &[i32],
    states: &[State],
    parents: &[Option<usize>],
) -> Result<Plans, DumpError> {
    let mut plans = Vec::new();
    for ((pid, s), parent) in live.iter().zip(states).zip(parents) {
        let mut mappings = Vec::new();
        let mut work = Vec::new();
        let mut cow = Vec::new();
        for m in &s.entries {
            let from = parent
                .map(|i| &states[i])
                .filter(|p| maps::inheritable(&p.entries, m))
                .map(|p| &p.pagemap);
            let (runs, shared) =
                maps::runs_sharing(&s.pagemap, from, m).map_err(crate::error::runs_err(*pid))?;
            let stored: u64 = runs.iter().map(|r| r.1).sum();
            split_runs(&runs, &mut work);
            cow.extend(
                shared
                    .iter()
                    .map(|&(start, pages)| cr_ebpf_image::CowRun { start, pages }),
            );
            mappings.push(State::mapping(m, stored, 0));
        }
        plans.push((mappings, work, cow));
    }
    Ok(plans)
}
