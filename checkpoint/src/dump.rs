//! `dump`: a full checkpoint of one live process.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use cr_ebpf_image::{
    pages::{Chunk, PageWriter, MAX_CHUNK_PAGES},
    publish, ImageError,
};
use cr_ebpf_tracee::{Frozen, TraceError};
use rayon::prelude::*;

use crate::{
    maps,
    state::{self, proc_err, Changes, State},
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

/// Why a dump failed. The process is running again (never left stopped or
/// killed by a failure), and no image was published.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Freezing or inspecting with ptrace failed.
    #[error("freezing or inspecting process {pid}")]
    Trace {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// Reading /proc failed.
    #[error("reading {path} of process {pid}")]
    Proc {
        /// The process.
        pid: i32,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("writing the image")]
    Image(#[from] ImageError),
    /// The process cannot be checkpointed by this version.
    #[error("not supported: {what} in process {pid}")]
    NotSupported {
        /// The process.
        pid: i32,
        /// What.
        what: String,
    },
    /// A descriptor of the process cannot be checkpointed by this version.
    #[error("not supported: {what} on fd {fd} of pid {pid}")]
    NotSupportedFd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
        /// What it is.
        what: String,
    },
}

impl From<cr_ebpf_resources::SaveError> for DumpError {
    fn from(e: cr_ebpf_resources::SaveError) -> Self {
        use cr_ebpf_resources::SaveError as S;
        match e {
            S::Trace { pid, source } => Self::Trace { pid, source },
            S::Proc { pid, path, source } => Self::Proc { pid, path, source },
            S::NotSupported { pid, what } => Self::NotSupported { pid, what },
            S::NotSupportedFd { pid, fd, what } => Self::NotSupportedFd { pid, fd, what },
        }
    }
}

/// A pool of `threads` workers (0: one per core).
pub(crate) fn worker_pool(
    pid: i32,
    threads: usize,
    name: &'static str,
) -> Result<rayon::ThreadPool, DumpError> {
    let workers = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| DumpError::NotSupported {
            pid,
            what: format!("starting the worker threads: {e}"),
        })
}

/// Splits page runs into chunks of at most 256 pages for the readers.
pub(crate) fn split_runs(runs: &[(u64, u64)], work: &mut Vec<(u64, u64)>) {
    for &(addr, n) in runs {
        let mut off = 0;
        while off < n {
            let k = (n - off).min(256.min(MAX_CHUNK_PAGES as u64));
            work.push((addr + off * 4096, k));
            off += k;
        }
    }
}

/// Writes `pages.img` into `tmp`: the `live` runs are read from the process
/// (which must be frozen) and `buffered` pages were copied earlier; both are
/// compressed on `pool` while one thread appends chunks in arrival order.
/// `read_done` runs once nothing more needs to be read from the process.
/// Returns (pages, bytes on disk).
pub(crate) fn write_pages(
    tmp: &Path,
    pool: &rayon::ThreadPool,
    pid: i32,
    live: &[(u64, u64)],
    buffered: Vec<(u64, Vec<u8>)>,
    read_done: impl FnOnce() -> Result<(), ImageError>,
) -> Result<(u64, u64), ImageError> {
    let mut writer = PageWriter::create(tmp)?;
    let (tx, rx) = crossbeam_channel::bounded::<Chunk>(pool.current_num_threads() * 4);
    let (read, writer) = std::thread::scope(|s| {
        let w = s.spawn(move || -> Result<PageWriter, ImageError> {
            for c in rx {
                writer.write(&c)?;
            }
            Ok(writer)
        });
        let read: Result<(), ImageError> = pool.install(|| {
            live.par_iter()
                .try_for_each_init(
                    || vec![0u8; 256 * 4096],
                    |buf, &(addr, n)| {
                        let b = &mut buf[..n as usize * 4096];
                        cr_ebpf_tracee::read_memory(pid, addr, b)?;
                        // A closed channel means the writer failed: its error wins.
                        let _ = tx.send(Chunk::compress(addr, b));
                        Ok(())
                    },
                )
                .map_err(|e: TraceError| ImageError::Io {
                    path: format!("memory of process {pid}"),
                    what: "reading",
                    source: std::io::Error::other(e.to_string()),
                })
        });
        let read = read.and_then(|()| read_done()).map(|()| {
            pool.install(|| {
                buffered.par_iter().for_each(|(addr, b)| {
                    let _ = tx.send(Chunk::compress(*addr, b));
                })
            })
        });
        drop(tx);
        (read, w.join().expect("page writer thread panicked"))
    });
    read?;
    writer?.finish()
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
        return crate::tree::dump_tree(pid, dir, opts, start);
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
