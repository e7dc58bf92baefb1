//! The page writer of every checkpoint: a pool of readers copying and
//! compressing page runs, one thread appending chunks to the page store.

use std::path::Path;

use cr_ebpf_image::{
    pages::{Chunk, PageWriter, MAX_CHUNK_PAGES},
    ImageError,
};
use cr_ebpf_tracee::TraceError;
use rayon::prelude::*;

use crate::{streamed::Streamed, DumpError};

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

/// The pages of one process for [`write_processes`] and [`write_pages`].
pub(crate) struct ProcessPages<'a> {
    /// The process.
    pub(crate) pid: i32,
    /// Runs read from it, frozen.
    pub(crate) live: &'a [(u64, u64)],
    /// Pages copied already, in memory.
    pub(crate) buffered: Vec<(u64, Vec<u8>)>,
    /// Its page store made while it ran, brought up to date once the
    /// process may run again.
    pub(crate) streamed: Option<Streamed>,
}

/// Writes `pages.img` into `tmp`: the `live` runs are read from the process
/// (which must be frozen) and `buffered` pages were copied earlier; both are
/// compressed on `pool` while one thread appends chunks in arrival order,
/// to the store pre-copy made when there is one (revised after the reads).
/// `read_done` runs once nothing more needs to be read from the process.
/// Returns (pages, bytes on disk).
pub(crate) fn write_pages(
    tmp: &Path,
    pool: &rayon::ThreadPool,
    pp: ProcessPages<'_>,
    read_done: impl FnOnce() -> Result<(), ImageError>,
) -> Result<(u64, u64), ImageError> {
    let ProcessPages {
        pid,
        live,
        buffered,
        streamed,
    } = pp;
    // Appending to the store pre-copy made, when there is one.
    let (mut writer, revisions) = match streamed {
        Some(s) => {
            let kept = s.pages();
            let Streamed {
                mut store,
                revisions,
            } = s;
            store.move_into(tmp)?;
            (store, Some((revisions, kept)))
        }
        None => (PageWriter::create(tmp)?, None),
    };
    let mem_err = |e: TraceError| ImageError::Io {
        path: format!("memory of process {pid}"),
        what: "reading",
        source: std::io::Error::other(e.to_string()),
    };
    // Opened once: the process is frozen while it is read.
    let mem = match live.is_empty() {
        true => None,
        false => Some(cr_ebpf_tracee::Mem::open(pid).map_err(mem_err)?),
    };
    let (tx, rx) = crossbeam_channel::bounded::<Chunk>(pool.current_num_threads() * 4);
    let (read, written) = std::thread::scope(|s| {
        let w = s.spawn(|| -> Result<(), ImageError> {
            for c in rx {
                writer.write(&c)?;
            }
            Ok(())
        });
        let read: Result<(), ImageError> = pool.install(|| {
            live.par_iter()
                .try_for_each_init(
                    || vec![0u8; 256 * 4096],
                    |buf, &(addr, n)| {
                        let b = &mut buf[..n as usize * 4096];
                        mem.as_ref().expect("opened for live runs").read(addr, b)?;
                        // A closed channel means the writer failed: its error wins.
                        let _ = tx.send(Chunk::compress(addr, b));
                        cr_ebpf_image::progress::add(n);
                        Ok(())
                    },
                )
                .map_err(mem_err)
        });
        let read = read.and_then(|()| read_done()).map(|()| {
            pool.install(|| {
                buffered.into_par_iter().for_each(|(addr, b)| {
                    let n = b.len() as u64 / 4096;
                    let _ = tx.send(Chunk::of_pages(addr, b));
                    cr_ebpf_image::progress::add(n);
                })
            })
        });
        drop(tx);
        (read, w.join().expect("page writer thread panicked"))
    });
    read?;
    written?;
    if let Some((revisions, kept)) = revisions {
        cr_ebpf_image::progress::add(kept);
        crate::watchdog::phase("revising the pre-copied pages");
        crate::streamed::revise(&mut writer, &revisions, pool)?;
    }
    crate::watchdog::phase("syncing the page store");
    writer.finish()
}

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
    let total: u64 = procs
        .iter()
        .map(|p| {
            p.live.iter().map(|r| r.1).sum::<u64>()
                + p.buffered
                    .iter()
                    .map(|b| b.1.len() as u64 / 4096)
                    .sum::<u64>()
                + p.streamed.as_ref().map_or(0, Streamed::pages)
        })
        .sum();
    cr_ebpf_image::progress::start("writing pages", total);
    let mut read_done = Some(read_done);
    let (mut pages, mut bytes) = (0, 0);
    let mut dirs = Vec::new();
    for (i, pp) in procs.into_iter().enumerate() {
        let pid = pp.pid;
        let sub = if is_tree {
            let sub = tmp.join(format!("proc-{pid}"));
            cr_ebpf_image::trust::create_private_dir(&sub).map_err(|source| {
                cr_ebpf_image::ImageError::Io {
                    path: sub.display().to_string(),
                    what: "creating",
                    source,
                }
            })?;
            sub
        } else {
            tmp.to_path_buf()
        };
        let last = (i + 1 == n).then(|| read_done.take()).flatten();
        let (p, b) = write_pages(&sub, pool, pp, || last.map_or(Ok(()), |done| done()))?;
        pages += p;
        bytes += b;
        dirs.push(sub);
    }
    Ok((dirs, pages, bytes))
}

/// The union of two sets of page runs `(first page address, pages)`, as runs.
pub(crate) fn union_runs(a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut pages: Vec<u64> = a
        .into_iter()
        .chain(b)
        .flat_map(|(s, n)| (0..n).map(move |i| s + i * 4096))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((s, n)) if *s + *n * 4096 == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}
