//! Pre-copy for a full dump: the pages of every process of the tree are
//! copied while it runs, with a write tracker (uffd-wp) registered on each
//! mapping first, so that the freeze only reads the pages written since.
//!
//! One pass, never more: a scan re-arms the pages it reports at the
//! addresses they have then, so a page written, moved away by `mremap`,
//! scanned there and moved back would come back clean over a stale copy.
//! With no scan between the registration and the freeze, a page written at
//! any time since its copy is reported by the one scan, wherever it is.
//!
//! Copies are kept in the runs they were read in (up to 256 pages), with
//! the page frame each page had when it was copied. While frozen, a copied
//! page is read again when the tracker reports it written, or when the
//! frame at its address is not the one copied (the page was dropped and
//! faulted in again, moved by `mremap`, swapped out, merged): the copies
//! then hold what the frozen process holds, page for page. Only the
//! registered mappings the frozen process still has with the same bounds
//! keep their copies. Which pages the image stores is decided as without
//! pre-copy, from the frozen process alone: pre-copy only changes where
//! their bytes come from, and a run copied whole is handed to the writer as
//! it is (no copy while frozen).
//!
//! Dropping a [`Precopy`] closes the trackers, which unregisters them: the
//! processes are left exactly as without it.

use std::{
    collections::BTreeMap,
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

use cr_ebpf_dirty_tracker::uffd_wp::WpTracker;
use rayon::prelude::*;

use crate::{
    freeze, incremental::memory::trackable, maps, maps::MapEntry, pages::split_runs,
    watchdog::phase,
};

const PAGE: u64 = 4096;

/// The present bit and the frame number of a pagemap entry.
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// Memory pre-copy may hold: half of what the machine has available.
pub(crate) fn budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024 / 2)
}

/// Runs still to read, and runs taken from the copies (by address).
type Split = (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>);

/// A run of pages copied: its bytes and each page's frame then.
struct Copy {
    data: Vec<u8>,
    frames: Vec<u64>,
}

/// One process's tracker, registered mappings and copies.
struct Proc {
    start_time: u64,
    wp: WpTracker,
    /// Registered mappings: start to end.
    registered: BTreeMap<u64, u64>,
    copies: BTreeMap<u64, Copy>,
}

impl Proc {
    /// Drops the registration of `[start, end)` and its copies (every copy
    /// is inside a registered mapping).
    fn forget(&mut self, start: u64, end: u64) {
        self.registered.remove(&start);
        let gone: Vec<u64> = self.copies.range(start..end).map(|(&a, _)| a).collect();
        for a in gone {
            self.copies.remove(&a);
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
        p.copies.clear();
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
                    let page = &mut c.data[k * PAGE as usize..(k + 1) * PAGE as usize];
                    if mem.read(a, page).is_err() {
                        return (start, None);
                    }
                    // Read after the frame: a frame changed since is seen
                    // by the next look.
                    c.frames[k] = now[k];
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
                p.copies.remove(&start);
            }
        }
    }
    pages
}

/// The copies of a tree's pages taken while it ran, and the trackers that
/// tell which of them were written since.
pub(crate) struct Precopy {
    procs: BTreeMap<i32, Proc>,
    /// Pages read while the processes ran, all passes.
    pub(crate) pages: u64,
    /// Passes made.
    pub(crate) passes: usize,
    /// Time spent, the processes running.
    pub(crate) took: Duration,
}

impl Precopy {
    /// Attaches a tracker to every process of the tree of `root` and copies
    /// their present private pages on `pool`, in one pass. A process that
    /// cannot be attached (no uffd-wp, a seccomp filter refusing
    /// `userfaultfd`, exiting) is left alone: the freeze reads all of it.
    /// Copies that would take more than `budget` bytes of memory are not
    /// made at all.
    pub(crate) fn run(root: i32, pool: &rayon::ThreadPool, budget: u64) -> Self {
        let t = Instant::now();
        phase("pre-copying memory while the process runs");
        let mut s = Self {
            procs: BTreeMap::new(),
            pages: 0,
            passes: 0,
            took: Duration::ZERO,
        };
        let mut work = Vec::new();
        let mut bytes = 0;
        for pid in freeze::processes(root) {
            if let Some((p, runs)) = register(pid) {
                bytes += runs.iter().map(|r| r.1 * PAGE).sum::<u64>();
                work.extend(runs.into_iter().map(|(a, n)| (pid, a, n)));
                s.procs.insert(pid, p);
            }
        }
        if bytes > budget {
            s.procs.clear();
            s.took = t.elapsed();
            return s;
        }
        cr_ebpf_image::progress::start("pre-copying pages", bytes / PAGE);
        // Each process's pagemap and memory opened once for all its runs.
        let files: BTreeMap<i32, _> = s
            .procs
            .keys()
            .map(|&pid| {
                let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok();
                (pid, (pagemap, cr_ebpf_tracee::Mem::open(pid).ok()))
            })
            .collect();
        let copied: Vec<(i32, u64, Option<Copy>)> = pool.install(|| {
            work.par_iter()
                .map(|&(pid, addr, n)| {
                    let (pagemap, mem) = &files[&pid];
                    let fr = pagemap.as_ref().map(|pm| frames(pm, addr, n));
                    let mut data = vec![0u8; (n * PAGE) as usize];
                    let ok = mem
                        .as_ref()
                        .is_some_and(|m| m.read(addr, &mut data).is_ok());
                    cr_ebpf_image::progress::add(n);
                    let c = fr.filter(|_| ok).map(|frames| Copy { data, frames });
                    (pid, addr, c)
                })
                .collect()
        });
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
            if let Some(c) = c.filter(|_| registration(p, addr).is_some()) {
                s.pages += c.frames.len() as u64;
                p.copies.insert(addr, c);
            }
        }
        s.passes = 1;
        s.took = t.elapsed();
        s
    }

    /// For the frozen process `pid` (started at `start_time`) with
    /// `mappings`: brings its copies up to date (reading, on `pool`, the
    /// pages written or replaced since), then splits the runs it stores,
    /// `runs`, into those still to be read from it and those taken from
    /// the copies. Every page is in exactly one of the two.
    pub(crate) fn take(
        &mut self,
        pool: &rayon::ThreadPool,
        pid: i32,
        start_time: u64,
        mappings: &[MapEntry],
        runs: &[(u64, u64)],
    ) -> Split {
        if !self.settle(pool, pid, start_time, mappings) {
            return (runs.to_vec(), Vec::new());
        }
        let p = self.procs.get_mut(&pid).expect("settled");
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut copied = Vec::new();
        for &(start, n) in runs {
            let end = start + n * PAGE;
            let mut x = start;
            while x < end {
                let hit = p
                    .copies
                    .range(..=x)
                    .next_back()
                    .map(|(&a, c)| (a, a + c.data.len() as u64))
                    .filter(|&(_, e)| e > x);
                match hit {
                    Some((a, e)) => {
                        let upto = e.min(end);
                        if a == x && upto == e {
                            let c = p.copies.remove(&a).expect("found");
                            copied.push((a, c.data));
                        } else {
                            let c = &p.copies[&a];
                            copied
                                .push((x, c.data[(x - a) as usize..(upto - a) as usize].to_vec()));
                        }
                        x = upto;
                    }
                    None => {
                        let next = p.copies.range(x..).next().map_or(end, |(&a, _)| a);
                        let upto = next.min(end);
                        match live.last_mut() {
                            Some((s, k)) if *s + *k * PAGE == x => *k += (upto - x) / PAGE,
                            _ => live.push((x, (upto - x) / PAGE)),
                        }
                        x = upto;
                    }
                }
            }
        }
        let mut split = Vec::new();
        split_runs(&live, &mut split);
        (split, copied)
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
        let Some(p) = self.procs.get_mut(&pid) else {
            return false;
        };
        // Another process with the same pid, or an execve since: its memory
        // is not what was copied.
        if p.start_time != start_time || p.wp.reopen_pagemap().is_err() {
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
