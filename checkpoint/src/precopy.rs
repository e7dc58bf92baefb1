//! Pre-copy for a full dump: the pages of every process of the tree are
//! copied while it runs, with a write tracker (uffd-wp) attached first, so
//! that the freeze only reads the pages written after they were copied.
//!
//! The tracker is registered on a mapping before its pages are copied: a
//! page written at any time after its copy is reported written by the scan
//! made while frozen, and read again then. A page is taken from the copies
//! only when the frozen process still has the very mapping that was
//! registered (same start and end, still registered) and the scan does not
//! report it written; everything else is read from the frozen process as
//! without pre-copy. Which pages the image stores is decided as before,
//! from the frozen process alone: pre-copy only changes where their bytes
//! come from.
//!
//! Dropping a [`Precopy`] closes the trackers, which unregisters them: the
//! processes are left exactly as without it.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    freeze,
    incremental::memory::{copy_runs, forget, prime_one, recopy_one, Proc},
    maps::MapEntry,
    pages::split_runs,
    watchdog::phase,
};

const PAGE: u64 = 4096;

/// Passes after the first one at most, each copying what was written
/// during the one before, while that keeps shrinking.
const MAX_PASSES: usize = 3;

/// Pages written during a pass below which another pass is not worth it.
const SMALL: u64 = 256;

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

/// Runs still to read, and pages taken from the copies (by address).
type Split = (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>);

/// The copies of a tree's pages taken while it ran, and the trackers that
/// tell which of them were written since.
pub(crate) struct Precopy {
    procs: BTreeMap<i32, Proc>,
    /// Pages copied, all passes.
    pub(crate) pages: u64,
    /// Passes made.
    pub(crate) passes: usize,
    /// Time spent, the process running.
    pub(crate) took: Duration,
}

impl Precopy {
    /// Attaches a tracker to every process of the tree of `root` and copies
    /// their present private pages on `pool`, in passes. A process that
    /// cannot be attached (no uffd-wp, a seccomp filter refusing
    /// `userfaultfd`, exiting) is left alone: the freeze reads all of it.
    /// Copies that would take more than `budget` bytes of memory are not
    /// made at all.
    pub(crate) fn run(root: i32, pool: &rayon::ThreadPool, budget: u64) -> Self {
        let t = Instant::now();
        phase("pre-copying memory while the process runs");
        let mut procs = BTreeMap::new();
        let mut work = Vec::new();
        let mut bytes = 0;
        for pid in freeze::processes(root) {
            let Ok(st) = freeze::stat(pid) else { continue };
            if st.state == 'Z' {
                continue;
            }
            let Ok(wp) = cr_ebpf_dirty_tracker::attach::attach(pid) else {
                continue;
            };
            let mut p = Proc::new(pid, st.start_time, Some(wp));
            let Ok(runs) = prime_one(&mut p) else {
                continue;
            };
            bytes += runs.iter().map(|r| r.1 * PAGE).sum::<u64>();
            procs.insert(pid, p);
            work.push(runs);
        }
        let mut s = Self {
            procs: BTreeMap::new(),
            pages: 0,
            passes: 0,
            took: Duration::ZERO,
        };
        if bytes > budget {
            s.took = t.elapsed();
            return s;
        }
        cr_ebpf_image::progress::start("pre-copying pages", bytes / PAGE);
        for (p, runs) in procs.values_mut().zip(&work) {
            s.pages += copy_runs(pool, p, runs);
        }
        s.passes = 1;
        // Pages written meanwhile are copied again while that shrinks.
        let mut last = u64::MAX;
        while s.passes <= MAX_PASSES {
            let n: u64 = procs.values_mut().map(|p| recopy_one(pool, p)).sum();
            s.pages += n;
            s.passes += 1;
            if n < SMALL || n * 2 > last {
                break;
            }
            last = n;
        }
        s.procs = procs;
        s.took = t.elapsed();
        s
    }

    /// For the frozen process `pid` (started at `start_time`) with
    /// `mappings`: splits the runs it stores, `runs`, into those still to be
    /// read from it and the pages taken from the copies (merged into runs).
    /// Every page is in exactly one of the two.
    pub(crate) fn take(
        &mut self,
        pid: i32,
        start_time: u64,
        mappings: &[MapEntry],
        runs: &[(u64, u64)],
    ) -> Split {
        let valid = self.valid(pid, start_time, mappings);
        let Some(p) = self.procs.get_mut(&pid).filter(|_| !valid.is_empty()) else {
            return (runs.to_vec(), Vec::new());
        };
        let mut live = Vec::new();
        let mut copied: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(start, n) in runs {
            for a in (0..n).map(|i| start + i * PAGE) {
                match valid.contains(&a).then(|| p.precopied.remove(&a)).flatten() {
                    Some(pg) => match copied.last_mut() {
                        Some((s, b))
                            if *s + b.len() as u64 == a && b.len() < 256 * PAGE as usize =>
                        {
                            b.extend_from_slice(&pg)
                        }
                        _ => copied.push((a, pg)),
                    },
                    None => match live.last_mut() {
                        Some((s, k)) if *s + *k * PAGE == a => *k += 1,
                        _ => live.push((a, 1)),
                    },
                }
            }
        }
        let mut split = Vec::new();
        split_runs(&live, &mut split);
        (split, copied)
    }

    /// The copied pages of `pid` not written since, in mappings it still
    /// has as they were registered.
    fn valid(&mut self, pid: i32, start_time: u64, mappings: &[MapEntry]) -> HashSet<u64> {
        let mut valid = HashSet::new();
        let Some(p) = self.procs.get_mut(&pid) else {
            return valid;
        };
        // Another process with the same pid, or an execve since: its memory
        // is not what was copied.
        let reopened = p.wp.as_mut().map(|wp| wp.reopen_pagemap().is_ok());
        if p.start_time != start_time || reopened != Some(true) {
            self.procs.remove(&pid);
            return valid;
        }
        let wp = p.wp.as_ref().expect("checked above");
        let current: BTreeMap<u64, u64> = mappings.iter().map(|m| (m.start, m.end)).collect();
        let registered: Vec<(u64, u64)> = p.registered.iter().map(|(&s, r)| (s, r.end)).collect();
        for (start, end) in registered {
            let mut dirty = Vec::new();
            if current.get(&start) != Some(&end) || wp.scan(start..end, &mut dirty).is_err() {
                forget(&mut p.registered, &mut p.precopied, start, end);
                continue;
            }
            let written: HashSet<u64> = dirty
                .iter()
                .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
                .collect();
            valid.extend(
                p.precopied
                    .range(start..end)
                    .map(|(&a, _)| a)
                    .filter(|a| !written.contains(a)),
            );
        }
        valid
    }
}
