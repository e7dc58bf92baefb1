//! What a lazy restore still has to copy: per process, the runs of pages
//! due; and where each page of the image lies.

use std::{collections::BTreeMap, os::fd::OwnedFd};

const PAGE: u64 = 4096;

/// A process whose pages are due: its userfaultfd, its pid (to kill it if
/// a chunk is damaged) and its pages still to copy: start to (image
/// address, pages), in runs.
pub(super) struct Target {
    pub(super) uffd: OwnedFd,
    pub(super) pid: Option<i32>,
    pub(super) due: BTreeMap<u64, (u64, u64)>,
}

impl Target {
    /// Cuts the runs due so that none straddles `at`.
    pub(super) fn split_at(&mut self, at: u64) {
        let hit = self
            .due
            .range(..at)
            .next_back()
            .map(|(&s, &(src, n))| (s, src, n));
        if let Some((s, src, n)) = hit {
            let end = s + n * PAGE;
            if end > at {
                self.due.insert(s, (src, (at - s) / PAGE));
                self.due.insert(at, (src + (at - s), (end - at) / PAGE));
            }
        }
    }

    /// Takes the runs due in `[start, end)` out.
    pub(super) fn take(&mut self, start: u64, end: u64) -> Vec<(u64, (u64, u64))> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.due.range(start..end).map(|(&k, _)| k).collect();
        keys.into_iter()
            .filter_map(|k| self.due.remove(&k).map(|v| (k, v)))
            .collect()
    }
}

/// The image pages of the lazy fills, by image address: the first address
/// of each piece to (fill, first page of the piece in its chunk, pages).
pub(super) struct Index {
    pub(super) pieces: BTreeMap<u64, (usize, u32, u32)>,
}

impl Index {
    /// The piece holding image address `a`: (its start, fill, first page,
    /// pages).
    pub(super) fn find(&self, a: u64) -> Option<(u64, usize, u32, u32)> {
        self.pieces
            .range(..=a)
            .next_back()
            .filter(|(&s, &(_, _, n))| s + n as u64 * PAGE > a)
            .map(|(&s, &(f, first, n))| (s, f, first, n))
    }
}
