//! Pre-copy for a full dump: the pages of every process of the tree are
//! copied while it runs, with a write tracker (uffd-wp) registered on each
//! mapping first, so that the freeze only reads the pages written since.
//! The copies go straight into the image's page store as they are made
//! (one store per process, in the dump's temporary directory): the disk
//! works while the process still runs, and no copy is held in memory.
//!
//! One pass, never more: a scan re-arms the pages it reports at the
//! addresses they have then, so a page written, moved away by `mremap`,
//! scanned there and moved back would come back clean over a stale copy.
//! With no scan between the registration and the freeze, a page written at
//! any time since its copy is reported by the one scan, wherever it is.
//!
//! Each copy is a chunk of the store (up to 256 pages), with the page
//! frame each page had when it was copied. While frozen, a copied page is
//! read again when the tracker reports it written, or when the frame at
//! its address is not the one copied (the page was dropped and faulted in
//! again, moved by `mremap`, swapped out, merged): those pages are patched
//! into the chunk once the freeze is over, and pages the frozen process no
//! longer stores are taken out of it (see `PageWriter::revise`), so the
//! store then holds what the frozen process held, page for page. Only the
//! registered mappings the frozen process still has with the same bounds
//! keep their chunks. Which pages the image stores is decided as without
//! pre-copy, from the frozen process alone: pre-copy only changes where
//! their bytes come from.
//!
//! Dropping a [`Precopy`] closes the trackers, which unregisters them: the
//! processes are left exactly as without it.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cr_ebpf_dirty_tracker::uffd_wp::WpTracker;
use cr_ebpf_image::pages::{Chunk, PageWriter};
use rayon::prelude::*;

use crate::streamed::{Revision, Streamed};
use crate::{
    freeze, incremental::memory::trackable, maps, maps::MapEntry, pages::split_runs,
    watchdog::phase,
};

const PAGE: u64 = 4096;

/// The present bit and the frame number of a pagemap entry.
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// A chunk of the store holding pages copied while the process ran: the
/// frame each page had then, and the pages read again while frozen.
struct Copy {
    slot: usize,
    frames: Vec<u64>,
    patches: Vec<(u32, Vec<u8>)>,
}

/// One process's tracker, registered mappings and copies.
struct Proc {
    start_time: u64,
    wp: WpTracker,
    /// Registered mappings: start to end.
    registered: BTreeMap<u64, u64>,
    copies: BTreeMap<u64, Copy>,
    /// Where the copies are.
    store: Option<PageWriter>,
    /// Chunks of the store no longer used: taken out at the revision.
    dropped: Vec<usize>,
}

impl Proc {
    /// Drops the registration of `[start, end)` and its copies (every copy
    /// is inside a registered mapping).
    fn forget(&mut self, start: u64, end: u64) {
        self.registered.remove(&start);
        let gone: Vec<u64> = self.copies.range(start..end).map(|(&a, _)| a).collect();
        for a in gone {
            if let Some(c) = self.copies.remove(&a) {
                self.dropped.push(c.slot);
            }
        }
    }

    /// Pages written since the last scan, as page runs, in the registered
    /// mappings (re-armed); a mapping that can no longer be scanned is
    /// forgotten.
    fn written(&mut self) -> Vec<(u64, u64)> {
        let mut dirty = Vec::new();
        let mut broken = Vec::new();
        for (&start, &end) in &self.registered {
            let before = dirty.len();
            if self.wp.scan(start..end, &mut dirty).is_err() {
                dirty.truncate(before);
                broken.push((start, end));
            }
        }
        for (s, e) in broken {
            self.forget(s, e);
        }
        dirty
            .iter()
            .map(|r| (r.start, (r.end - r.start) / PAGE))
            .collect()
    }

    /// Its store removed: nothing of it is used.
    fn discard(&mut self) {
        if let Some(s) = self.store.take() {
            s.discard();
        }
    }
}

/// The registered mapping of `p` holding `addr`.
fn registration(p: &Proc, addr: u64) -> Option<(u64, u64)> {
    p.registered
        .range(..=addr)
        .next_back()
        .map(|(&s, &e)| (s, e))
        .filter(|&(_, e)| e > addr)
}

/// The frames of `n` pages at `addr` from a pagemap (0 where not present).
fn frames(pagemap: &std::fs::File, addr: u64, n: u64) -> Vec<u64> {
    let mut b = vec![0u8; n as usize * 8];
    if pagemap.read_exact_at(&mut b, addr / PAGE * 8).is_err() {
        return vec![0; n as usize];
    }
    b.chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .map(|e| if e & PM_PRESENT != 0 { e & PM_PFN } else { 0 })
        .collect()
}

/// Reads again, on `pool`, the pages of the copies of `pid` that are in
/// `dirty` (sorted runs) or whose frame is no longer the one copied; a
/// copy that cannot be read is dropped. Returns the pages read.
fn refresh(pool: &rayon::ThreadPool, pid: i32, p: &mut Proc, dirty: &[(u64, u64)]) -> u64 {
    let (Ok(pagemap), Ok(mem)) = (
        std::fs::File::open(format!("/proc/{pid}/pagemap")),
        cr_ebpf_tracee::Mem::open(pid),
    ) else {
        let all: Vec<(u64, u64)> = p.registered.iter().map(|(&s, &e)| (s, e)).collect();
        for (s, e) in all {
            p.forget(s, e);
        }
        return 0;
    };
    let results: Vec<(u64, Option<u64>)> = pool.install(|| {
        p.copies
            .par_iter_mut()
            .map(|(&start, c)| {
                let n = c.frames.len() as u64;
                let now = frames(&pagemap, start, n);
                let mut i = dirty.partition_point(|r| r.0 + r.1 * PAGE <= start);
                let mut read = 0;
                for k in 0..n {
                    let a = start + k * PAGE;
                    while dirty.get(i).is_some_and(|r| r.0 + r.1 * PAGE <= a) {
                        i += 1;
                    }
                    let written = dirty.get(i).is_some_and(|r| r.0 <= a);
                    let k = k as usize;
                    if !written && now[k] != 0 && now[k] == c.frames[k] {
                        continue;
                    }
                    let mut page = vec![0u8; PAGE as usize];
                    if mem.read(a, &mut page).is_err() {
                        return (start, None);
                    }
                    // Read after the frame: a frame changed since is seen
                    // by the next look.
                    c.frames[k] = now[k];
                    c.patches.push((k as u32, page));
                    read += 1;
                }
                (start, Some(read))
            })
            .collect()
    });
    let mut pages = 0;
    for (start, r) in results {
        match r {
            Some(n) => pages += n,
            None => {
                if let Some(c) = p.copies.remove(&start) {
                    p.dropped.push(c.slot);
                }
            }
        }
    }
    pages
}

/// The copies of a tree's pages taken while it ran, and the trackers that
/// tell which of them were written since.
pub(crate) struct Precopy {
    procs: BTreeMap<i32, Proc>,
    /// Where the stores are made.
    staging: Option<PathBuf>,
    /// Pages read while the processes ran, all passes.
    pub(crate) pages: u64,
    /// Passes made.
    pub(crate) passes: usize,
    /// Time spent, the processes running.
    pub(crate) took: Duration,
}

impl Drop for Precopy {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            p.discard();
        }
        // With whatever a failed dump left there (a store taken and not
        // moved into the image).
        if let Some(d) = &self.staging {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A run copied while the process ran: its process, address, and its
/// frames and chunk (`None`: it could not be read).
type Copied<T> = (i32, u64, Option<(Vec<u64>, T)>);

/// Copies the `work` runs (process, address, pages) on `pool` and appends
/// each as a chunk to its process's store, the disk writing while the next
/// runs are read. Returns each run's frames and chunk number (`None`: not
/// read), and the stores (`None`: writing to it failed, it is removed).
#[allow(clippy::type_complexity)]
fn copy_into(
    pool: &rayon::ThreadPool,
    work: &[(i32, u64, u64)],
    stores: BTreeMap<i32, PageWriter>,
) -> (Vec<Copied<usize>>, BTreeMap<i32, Option<PageWriter>>) {
    // Each process's pagemap and memory opened once for all its runs.
    let files: BTreeMap<i32, _> = stores
        .keys()
        .map(|&pid| {
            let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
            (pid, (pagemap, cr_ebpf_tracee::Mem::open(pid).ok()))
        })
        .collect();
    let (tx, rx) = crossbeam_channel::bounded::<Copied<Chunk>>(pool.current_num_threads() * 4);
    // Buffers of chunks written, read into again: no allocation, zeroing
    // and page faults per chunk.
    let (free_tx, free_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    std::thread::scope(|sc| {
        let w = sc.spawn(move || {
            let mut stores: BTreeMap<i32, Option<PageWriter>> =
                stores.into_iter().map(|(p, s)| (p, Some(s))).collect();
            let mut out = Vec::new();
            for (pid, addr, c) in rx {
                let store = stores.get_mut(&pid).expect("a store per process");
                let slot = match (c, store.as_mut()) {
                    (Some((frames, chunk)), Some(w)) => match w.write(&chunk) {
                        Ok(slot) => {
                            if chunk.stored_raw {
                                let _ = free_tx.send(chunk.data);
                            }
                            Some((frames, slot))
                        }
                        Err(_) => {
                            if let Some(w) = store.take() {
                                w.discard();
                            }
                            None
                        }
                    },
                    _ => None,
                };
                out.push((pid, addr, slot));
            }
            (out, stores)
        });
        pool.install(|| {
            work.par_iter().for_each(|&(pid, addr, n)| {
                let (pagemap, mem) = &files[&pid];
                let fr = pagemap.as_ref().map(|pm| frames(pm, addr, n));
                let mut data = free_rx.try_recv().unwrap_or_default();
                data.resize((n * PAGE) as usize, 0);
                let ok = mem
                    .as_ref()
                    .is_some_and(|m| m.read(addr, &mut data).is_ok());
                cr_ebpf_image::progress::add(n);
                let c = fr.filter(|_| ok).map(|f| (f, Chunk::of_pages(addr, data)));
                // A closed channel: the writer is gone, its panic is joined.
                let _ = tx.send((pid, addr, c));
            })
        });
        drop(tx);
        w.join().expect("pre-copy writer panicked")
    })
}

impl Precopy {
    /// Attaches a tracker to every process of the tree of `root` and copies
    /// their present private pages on `pool`, in one pass, into a page
    /// store per process in `staging` (created here, private, and must not
    /// exist; removed with what is left in it when this is dropped). A process that cannot be
    /// attached (no uffd-wp, a seccomp filter refusing `userfaultfd`,
    /// exiting) is left alone: the freeze reads all of it. Nothing is
    /// copied when `staging` cannot be made.
    pub(crate) fn run(root: i32, pool: &rayon::ThreadPool, staging: &Path) -> Self {
        let t = Instant::now();
        phase("pre-copying memory while the process runs");
        let mut s = Self {
            procs: BTreeMap::new(),
            staging: None,
            pages: 0,
            passes: 0,
            took: Duration::ZERO,
        };
        // Made here and now, never one that exists (another user's, planted
        // with links where the stores go); none, no pre-copy.
        let made = {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().mode(0o700).create(staging)
        };
        if made.is_err() {
            s.took = t.elapsed();
            return s;
        }
        s.staging = Some(staging.to_path_buf());
        let mut work = Vec::new();
        let mut stores = BTreeMap::new();
        for pid in freeze::processes(root) {
            let Ok(store) = PageWriter::create_at(&staging.join(format!("pages-{pid}.img"))) else {
                continue;
            };
            if let Some((p, runs)) = register(pid) {
                work.extend(runs.into_iter().map(|(a, n)| (pid, a, n)));
                s.procs.insert(pid, p);
                stores.insert(pid, store);
            } else {
                store.discard();
            }
        }
        for (pid, store) in &mut stores {
            let runs = work.iter().filter(|w| w.0 == *pid);
            let (pages, chunks) = runs.fold((0, 0), |(p, c), w| (p + w.2, c + 1));
            store.reserve(pages, chunks);
            // Past the page cache when the page cache is slow (the
            // revision reads back only the pages written since).
            store.write_adaptive(cr_ebpf_image::pages::SLOW_BUFFERED);
        }
        let bytes: u64 = work.iter().map(|w| w.2 * PAGE).sum();
        cr_ebpf_image::progress::start("pre-copying pages", bytes / PAGE);
        let (copied, stores) = copy_into(pool, &work, stores);
        for (pid, store) in stores {
            // A store that failed (a full disk, say) keeps nothing: the
            // freeze reads that process whole.
            if let (Some(p), Some(store)) = (s.procs.get_mut(&pid), store) {
                p.store = Some(store);
            }
        }
        // A run that could not be read (unmapped meanwhile, say) makes its
        // whole mapping read while frozen: its other runs are not kept.
        for (pid, addr, c) in &copied {
            let p = s.procs.get_mut(pid).expect("registered above");
            if c.is_none() {
                if let Some((st, e)) = registration(p, *addr) {
                    p.forget(st, e);
                }
            }
        }
        for (pid, addr, c) in copied {
            let p = s.procs.get_mut(&pid).expect("registered above");
            let Some((frames, slot)) = c else { continue };
            if p.store.is_none() {
                continue;
            }
            if registration(p, addr).is_some() {
                s.pages += frames.len() as u64;
                let patches = Vec::new();
                p.copies.insert(
                    addr,
                    Copy {
                        slot,
                        frames,
                        patches,
                    },
                );
            } else {
                p.dropped.push(slot);
            }
        }
        s.passes = 1;
        s.took = t.elapsed();
        s
    }

    /// For the frozen process `pid` (started at `start_time`) with
    /// `mappings`: brings its copies up to date (reading, on `pool`, the
    /// pages written or replaced since), then splits the runs it stores,
    /// `runs`, into those still to be read from it (split for the readers)
    /// and those its store holds already, to be revised after the freeze
    /// (see `streamed::revise`). Every page is in exactly one of the two.
    pub(crate) fn take(
        &mut self,
        pool: &rayon::ThreadPool,
        pid: i32,
        start_time: u64,
        mappings: &[MapEntry],
        runs: &[(u64, u64)],
    ) -> (Vec<(u64, u64)>, Option<Streamed>) {
        let mut split = Vec::new();
        if !self.settle(pool, pid, start_time, mappings) {
            split_runs(runs, &mut split);
            return (split, None);
        }
        let p = self.procs.get_mut(&pid).expect("settled");
        let mut keep: BTreeMap<u64, Vec<bool>> = p
            .copies
            .iter()
            .map(|(&a, c)| (a, vec![false; c.frames.len()]))
            .collect();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for &(start, n) in runs {
            let end = start + n * PAGE;
            let mut x = start;
            while x < end {
                let hit = p
                    .copies
                    .range(..=x)
                    .next_back()
                    .map(|(&a, c)| (a, a + c.frames.len() as u64 * PAGE))
                    .filter(|&(_, e)| e > x);
                let upto = match hit {
                    Some((a, e)) => {
                        let upto = e.min(end);
                        let k = keep.get_mut(&a).expect("a copy");
                        for i in (x - a) / PAGE..(upto - a) / PAGE {
                            k[i as usize] = true;
                        }
                        upto
                    }
                    None => {
                        let next = p.copies.range(x..).next().map_or(end, |(&a, _)| a);
                        let upto = next.min(end);
                        match live.last_mut() {
                            Some((s, k)) if *s + *k * PAGE == x => *k += (upto - x) / PAGE,
                            _ => live.push((x, (upto - x) / PAGE)),
                        }
                        upto
                    }
                };
                x = upto;
            }
        }
        split_runs(&live, &mut split);
        let mut revisions: Vec<Revision> = std::mem::take(&mut p.copies)
            .into_iter()
            .map(|(a, c)| Revision {
                slot: c.slot,
                keep: keep.remove(&a).expect("a copy"),
                patches: c.patches,
            })
            .collect();
        revisions.extend(p.dropped.drain(..).map(|slot| Revision {
            slot,
            keep: Vec::new(),
            patches: Vec::new(),
        }));
        let store = p.store.take().expect("settled with a store");
        (split, Some(Streamed { store, revisions }))
    }

    /// Keeps the copies of `pid` that hold what the frozen process holds:
    /// false when none can be used.
    fn settle(
        &mut self,
        pool: &rayon::ThreadPool,
        pid: i32,
        start_time: u64,
        mappings: &[MapEntry],
    ) -> bool {
        let Some(p) = self.procs.get_mut(&pid).filter(|p| p.store.is_some()) else {
            return false;
        };
        // Another process with the same pid, or an execve since: its memory
        // is not what was copied.
        if p.start_time != start_time || p.wp.reopen_pagemap().is_err() {
            p.discard();
            self.procs.remove(&pid);
            return false;
        }
        let current: BTreeMap<u64, u64> = mappings.iter().map(|m| (m.start, m.end)).collect();
        let stale: Vec<(u64, u64)> = p
            .registered
            .iter()
            .filter(|(s, e)| current.get(s) != Some(e))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in stale {
            p.forget(s, e);
        }
        let dirty = p.written();
        refresh(pool, pid, p, &dirty);
        true
    }
}

/// Attaches a tracker to `pid` and registers its readable private
/// mappings; returns it with the runs of present pages to copy (split for
/// the readers).
fn register(pid: i32) -> Option<(Proc, Vec<(u64, u64)>)> {
    let st = freeze::stat(pid).ok().filter(|st| st.state != 'Z')?;
    let wp = cr_ebpf_dirty_tracker::attach::attach(pid).ok()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let entries = maps::parse_maps(&text).ok()?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let mut p = Proc {
        start_time: st.start_time,
        wp,
        registered: BTreeMap::new(),
        copies: BTreeMap::new(),
        store: None,
        dropped: Vec::new(),
    };
    let mut work = Vec::new();
    for m in entries.iter().filter(|m| trackable(m)) {
        // Registered first: a write after this point is seen by a scan.
        if p.wp.register(m.start..m.end).is_err() {
            continue;
        }
        let Ok(runs) = maps::dumpable_runs(&pagemap, m) else {
            continue;
        };
        p.registered.insert(m.start, m.end);
        split_runs(&runs, &mut work);
    }
    Some((p, work))
}
