//! Backend: the kernel's soft-dirty bits (`/proc/PID/clear_refs` 4 and
//! pagemap bit 55). Only on kernels built with `CONFIG_MEM_SOFT_DIRTY`
//! ([`probe`] tells); elsewhere `clear_refs` 4 is accepted but no bit is
//! ever set, so a [`SoftDirtyTracker`] would silently report nothing — use
//! it only after `probe` succeeded ([`crate::for_process`] checks).
//!
//! Writing 4 to `clear_refs` clears the bits of the **whole process**, not of
//! one range. [`SoftDirtyTracker`] keeps the per-range API honest anyway:
//! before every clear it reads the bits of *all* registered ranges and keeps
//! the dirty pages outside the range being scanned as pending, reported by
//! later scans of their ranges. A scan of one range therefore costs a
//! pagemap read of every registered range; [`SoftDirtyTracker::scan_all`]
//! does the same work and returns everything at once.
//!
//! Between reading pagemap and clearing the bits there is a window in which
//! a write by the running target would be lost: scans and registrations are
//! exact only while the target is stopped (as it is during a checkpoint).

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    ops::Range,
    os::unix::fs::FileExt as _,
};

use crate::{ranges, sys};

/// Pagemap bit: the page was written since soft-dirty bits were last cleared.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Pagemap entries read per `pread`.
const ENTRIES_PER_READ: usize = 512;

/// Why a soft-dirty operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SoftDirtyError {
    /// Opening `/proc/PID/pagemap` or `/proc/PID/clear_refs` failed.
    #[error("opening /proc/{pid}/{file}")]
    Open {
        /// The process.
        pid: i32,
        /// `pagemap` or `clear_refs`.
        file: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing 4 to `clear_refs` failed.
    #[error("clearing the soft-dirty bits of process {pid}")]
    Clear {
        /// The process.
        pid: i32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading pagemap entries failed.
    #[error("reading the pagemap of process {pid} at {addr:#x}")]
    Pagemap {
        /// The process.
        pid: i32,
        /// First address of the entries.
        addr: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A range does not start and end on page boundaries.
    #[error("range {start:#x}..{end:#x} is not page-aligned")]
    Unaligned {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// Part of a range to scan was never registered.
    #[error("{addr:#x} is not registered (scanning {start:#x}..{end:#x})")]
    NotRegistered {
        /// First unregistered address.
        addr: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
}

/// Soft-dirty tracking of registered ranges of one process.
pub struct SoftDirtyTracker {
    pid: i32,
    page: u64,
    pagemap: File,
    clear_refs: File,
    /// Registered ranges: sorted, disjoint, merged.
    registered: Vec<Range<u64>>,
    /// Pages found dirty by a clear but not reported yet.
    pending: BTreeSet<u64>,
}

impl SoftDirtyTracker {
    /// Tracks process `pid`, with nothing registered yet. Does not check
    /// that the kernel has soft-dirty bits (see [`probe`]).
    pub fn for_process(pid: i32) -> Result<Self, SoftDirtyError> {
        let open = |file: &'static str, write: bool| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(format!("/proc/{pid}/{file}"))
                .map_err(|source| SoftDirtyError::Open { pid, file, source })
        };
        Ok(Self {
            pid,
            page: sys::page_size(),
            pagemap: open("pagemap", false)?,
            clear_refs: open("clear_refs", true)?,
            registered: Vec::new(),
            pending: BTreeSet::new(),
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The registered ranges, sorted and merged.
    pub fn registered(&self) -> &[Range<u64>] {
        &self.registered
    }

    /// Registers `range` (page-aligned) so that the next scan reports only
    /// pages written from now on. Clears the bits of the whole process,
    /// after saving those of the other registered ranges as pending.
    pub fn register(&mut self, range: Range<u64>) -> Result<(), SoftDirtyError> {
        self.check_aligned(&range)?;
        self.collect()?;
        self.drop_pending(&range);
        ranges::insert(&mut self.registered, range);
        self.clear()
    }

    /// Stops tracking `range` (page-aligned), forgetting its pending pages;
    /// parts that were not registered are ignored. Clears nothing.
    pub fn unregister(&mut self, range: Range<u64>) -> Result<(), SoftDirtyError> {
        self.check_aligned(&range)?;
        self.drop_pending(&range);
        ranges::remove(&mut self.registered, range);
        Ok(())
    }

    /// Appends to `out` the page ranges in `range` (page-aligned, registered
    /// in full) written since its last scan or registration, adjacent pages
    /// merged. Reads the bits of *every* registered range, keeps the other
    /// ranges' dirty pages pending, and clears the bits of the whole process.
    pub fn scan(
        &mut self,
        range: Range<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> Result<(), SoftDirtyError> {
        self.check_aligned(&range)?;
        if let Some(addr) = ranges::first_uncovered(&self.registered, &range) {
            return Err(SoftDirtyError::NotRegistered {
                addr,
                start: range.start,
                end: range.end,
            });
        }
        self.collect()?;
        self.clear()?;
        let taken: Vec<u64> = self.pending.range(range.clone()).copied().collect();
        for addr in taken {
            self.pending.remove(&addr);
            ranges::push_merged(out, addr..addr + self.page);
        }
        Ok(())
    }

    /// Appends to `out` the pages of all registered ranges written since
    /// their last scan, adjacent pages merged, with one pagemap pass and one
    /// clear.
    pub fn scan_all(&mut self, out: &mut Vec<Range<u64>>) -> Result<(), SoftDirtyError> {
        self.collect()?;
        self.clear()?;
        for addr in std::mem::take(&mut self.pending) {
            ranges::push_merged(out, addr..addr + self.page);
        }
        Ok(())
    }

    fn check_aligned(&self, range: &Range<u64>) -> Result<(), SoftDirtyError> {
        if ranges::page_aligned(range, self.page) {
            Ok(())
        } else {
            Err(SoftDirtyError::Unaligned {
                start: range.start,
                end: range.end,
            })
        }
    }

    fn drop_pending(&mut self, range: &Range<u64>) {
        let gone: Vec<u64> = self.pending.range(range.clone()).copied().collect();
        for addr in gone {
            self.pending.remove(&addr);
        }
    }

    /// Adds the soft-dirty pages of every registered range to `pending`.
    fn collect(&mut self) -> Result<(), SoftDirtyError> {
        let mut buf = vec![0u8; ENTRIES_PER_READ * 8];
        for r in &self.registered {
            let mut addr = r.start;
            while addr < r.end {
                let entries = (((r.end - addr) / self.page) as usize).min(ENTRIES_PER_READ);
                let bytes = &mut buf[..entries * 8];
                self.pagemap
                    .read_exact_at(bytes, addr / self.page * 8)
                    .map_err(|source| SoftDirtyError::Pagemap {
                        pid: self.pid,
                        addr,
                        source,
                    })?;
                for e in bytes.chunks_exact(8) {
                    let entry = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                    if entry & PM_SOFT_DIRTY != 0 {
                        self.pending.insert(addr);
                    }
                    addr += self.page;
                }
            }
        }
        Ok(())
    }

    /// Clears the soft-dirty bits of the whole process.
    fn clear(&mut self) -> Result<(), SoftDirtyError> {
        self.clear_refs
            .write_all(b"4")
            .map_err(|source| SoftDirtyError::Clear {
                pid: self.pid,
                source,
            })
    }
}

/// Tells whether soft-dirty tracking works: clears the bits, checks a written
/// page is clean, writes it, and checks it became dirty. Note that this
/// clears the soft-dirty bits of the calling process.
pub fn probe() -> Result<String, String> {
    let page = sys::page_size() as usize;
    let map = sys::AnonMapping::new(page).map_err(|e| format!("mmap: {e}"))?;
    map.write_byte(0, 1);
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| format!("clearing soft-dirty bits: {e}"))?;
    let clean = sys::pagemap_entry(&pagemap, map.addr()).map_err(|e| e.to_string())?;
    map.write_byte(0, 2);
    let dirty = sys::pagemap_entry(&pagemap, map.addr()).map_err(|e| e.to_string())?;
    match (clean & PM_SOFT_DIRTY != 0, dirty & PM_SOFT_DIRTY != 0) {
        (false, true) => Ok("clear_refs 4 clears and a write sets pagemap bit 55".into()),
        (_, false) => Err(
            "a written page never shows pagemap bit 55 (kernel without CONFIG_MEM_SOFT_DIRTY)"
                .into(),
        ),
        (true, true) => Err("clear_refs 4 does not clear pagemap bit 55".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tracker on this process: exact pages where the kernel has
    /// soft-dirty bits; elsewhere only the bookkeeping can be checked.
    #[test]
    fn tracks_this_process() {
        let p = sys::page_size();
        let map = sys::AnonMapping::new(8 * p as usize).unwrap();
        let a = map.addr();
        let page = |i: u64| a + i * p..a + (i + 1) * p;
        let mut t = SoftDirtyTracker::for_process(std::process::id() as i32).unwrap();
        assert!(matches!(
            t.register(a + 1..a + p),
            Err(SoftDirtyError::Unaligned { .. })
        ));
        t.register(a..a + 4 * p).unwrap();
        t.register(a + 4 * p..a + 8 * p).unwrap();
        assert_eq!(t.registered(), vec![a..a + 8 * p]);
        t.unregister(page(6)).unwrap();
        assert_eq!(t.registered(), vec![a..a + 6 * p, a + 7 * p..a + 8 * p]);
        assert!(matches!(
            t.scan(a..a + 8 * p, &mut Vec::new()),
            Err(SoftDirtyError::NotRegistered { addr, .. }) if addr == a + 6 * p
        ));
        let has_bits = probe().is_ok();
        map.write_byte(p as usize, 1);
        map.write_byte(2 * p as usize, 1);
        map.write_byte(7 * p as usize, 1);
        let mut found = Vec::new();
        t.scan(a..a + 2 * p, &mut found).unwrap();
        if !has_bits {
            assert!(found.is_empty());
            eprintln!("no soft-dirty bits on this kernel: only bookkeeping checked");
            return;
        }
        assert_eq!(found, vec![page(1)]);
        // Page 2 and 7 were seen by that scan's clear and are still reported.
        found.clear();
        t.scan_all(&mut found).unwrap();
        assert_eq!(found, vec![page(2), page(7)]);
        found.clear();
        t.scan_all(&mut found).unwrap();
        assert_eq!(found, vec![]);
    }
}
