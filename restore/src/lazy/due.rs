//! What a lazy restore loads lazily and still has to copy: the mappings
//! and fills it takes over; per process, the runs of pages due; and where
//! each page of the image lies.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use cr_ebpf_image::{chain::Fill, Chain, Manifest, MappingKind};

const PAGE: u64 = 4096;

/// The mappings a lazy restore registers: private anonymous memory.
pub(crate) fn lazy_ranges(m: &Manifest) -> Vec<(u64, u64)> {
    m.mappings
        .iter()
        .filter(|x| {
            matches!(
                x.kind,
                MappingKind::Anon | MappingKind::Heap | MappingKind::Stack
            ) && x.flags & cr_ebpf_image::MAP_SHARED == 0
                && x.pages_stored > 0
        })
        .map(|x| (x.start, x.end))
        .collect()
}

/// The fills of `chain` loaded lazily (in `ranges`), as indices into
/// `chain.fills()`, in order.
pub(crate) fn lazy_fills(chain: &Chain, ranges: &[(u64, u64)]) -> Vec<usize> {
    (0..chain.fills().len())
        .filter(|&i| {
            let f = &chain.fills()[i];
            !f.is_shmem() && is_lazy(ranges, f)
        })
        .collect()
}

/// Whether `f` lies in one of `ranges` (sorted), so it is loaded lazily.
pub(crate) fn is_lazy(ranges: &[(u64, u64)], f: &Fill) -> bool {
    let (s, e) = (f.chunk.vaddr, f.chunk.vaddr + f.chunk.npages as u64 * PAGE);
    let i = ranges.partition_point(|r| r.1 <= s);
    ranges.get(i).is_some_and(|r| r.0 <= s && e <= r.1)
}

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
