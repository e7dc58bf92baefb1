//! Backend: content hashing. Works on every kernel, for any process we may
//! read (`/proc/PID/mem`, so ptrace access to it), and is the slowest.
//!
//! [`HashTracker::register`] reads every page of a range and keeps a 64-bit
//! hash of it ([`page_hash`]); [`HashTracker::scan`] reads the pages again
//! and reports those whose hash differs, storing the new hashes. It finds
//! *content changes*, not writes: a page written with the bytes it already
//! held, or written and then restored, is not reported. For a checkpoint
//! that is exactly what matters (the stored image of such a page is still
//! right); it also means this backend can disagree with uffd-wp and
//! soft-dirty, which report every write.
//!
//! Other honest limits:
//!
//! * Pages are read in batches of [`BATCH_PAGES`] while the target may run.
//!   A write that lands during a scan is reported by this scan or, if it
//!   came after its page was read, by the next one; nothing is lost, but a
//!   scan is a consistent snapshot only if the target is stopped.
//! * A page that cannot be read (`PROT_NONE` or write-only, unmapped since
//!   registration, or a mapping the kernel refuses to read such as
//!   `VM_IO`) hashes to the fixed [`UNREADABLE`] value. A change in
//!   readability is therefore reported, but a change *inside* a page that
//!   stayed unreadable from one scan to the next is not seen.
//! * Reading populates the target's page tables with the zero page for
//!   untouched anonymous memory and pulls file-backed pages into the page
//!   cache; it never allocates private pages in the target.
//! * Two different contents have the same hash with probability about
//!   2^-64; a change confined to one aligned 8-byte word always changes it
//!   (every step of [`page_hash`] is a bijection of its state).
//! * Memory cost: 8 bytes per registered page.

use std::{collections::BTreeMap, io, ops::Range};

use crate::{ranges, sys};

/// Pages read per call.
pub const BATCH_PAGES: usize = 256;

/// The hash recorded for a page that cannot be read.
pub const UNREADABLE: u64 = 0x756e_7265_6164_6162; // "unreadab"

/// Why a hashing operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// A range does not start and end on page boundaries.
    #[error("range {start:#x}..{end:#x} is not page-aligned")]
    Unaligned {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// Part of a range to register is not mapped in the process.
    #[error("process {pid} has nothing mapped at {addr:#x} (registering {start:#x}..{end:#x})")]
    Unmapped {
        /// The process.
        pid: i32,
        /// First unmapped address.
        addr: u64,
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
    /// Reading `/proc/PID/maps` failed (often: the process is gone).
    #[error("reading /proc/{pid}/maps")]
    Maps {
        /// The process.
        pid: i32,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A read of the memory failed for another reason than an unreadable page
    /// (the process is gone, or we may not read its memory).
    #[error("reading {len} bytes at {addr:#x} in process {pid}")]
    Read {
        /// The process.
        pid: i32,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// A fast, non-cryptographic 64-bit hash of a page's contents (any length
/// works; the length is part of the hash). The checkpoint code compares it
/// with pages of stored images, so its value must stay stable.
///
/// Four independent lanes each absorb every fourth little-endian 64-bit
/// word with `h = (h ^ w) * K; h ^= h >> 29`, then the lanes are folded with
/// the splitmix64 finalizer. Every step is a bijection of the state for a
/// fixed input, so changing one word always changes the result.
pub fn page_hash(page: &[u8]) -> u64 {
    const SEEDS: [u64; 4] = [
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let mut lanes = SEEDS;
    let mut chunks = page.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *lane = absorb(*lane, w);
        }
    }
    // A tail shorter than 32 bytes goes into lane 0, zero-padded; the length
    // folded in below tells padding from real zeros.
    for c in chunks.remainder().chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        lanes[0] = absorb(lanes[0], u64::from_le_bytes(w));
    }
    let mut h = page.len() as u64;
    for lane in lanes {
        h = fmix(h ^ lane);
    }
    h
}

#[inline(always)]
fn absorb(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

/// splitmix64's finalizer (a bijection).
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Tracks content changes of registered ranges of one process by hashing
/// their pages.
pub struct HashTracker {
    pid: i32,
    page: u64,
    /// Registered ranges, disjoint: start address -> hash of each page.
    regions: BTreeMap<u64, Vec<u64>>,
    /// Read buffer of [`BATCH_PAGES`] pages.
    buf: Vec<u8>,
}

impl HashTracker {
    /// Tracks process `pid` (which may be this process), with nothing
    /// registered yet. Fails if its maps cannot be read.
    pub fn for_process(pid: i32) -> Result<Self, HashError> {
        read_maps(pid)?;
        let page = sys::page_size();
        Ok(Self {
            pid,
            page,
            regions: BTreeMap::new(),
            buf: vec![0; BATCH_PAGES * page as usize],
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Number of registered pages.
    pub fn registered_pages(&self) -> usize {
        self.regions.values().map(Vec::len).sum()
    }

    /// Registers `range` (page-aligned) and records the hash of each of its
    /// pages now, so that the next scan reports only changes from now on.
    /// Registering pages again starts them afresh. Fails if any part of the
    /// range is not mapped; unreadable pages are recorded as [`UNREADABLE`].
    pub fn register(&mut self, range: Range<u64>) -> Result<(), HashError> {
        self.check_aligned(&range)?;
        if range.is_empty() {
            return Ok(());
        }
        let maps = read_maps(self.pid)?;
        if let Some(addr) = first_unmapped(&maps, &range) {
            return Err(HashError::Unmapped {
                pid: self.pid,
                addr,
                start: range.start,
                end: range.end,
            });
        }
        let mut hashes = Vec::with_capacity(((range.end - range.start) / self.page) as usize);
        hash_pages(
            self.pid,
            self.page,
            &maps,
            range.clone(),
            &mut self.buf,
            |_, h| hashes.push(h),
        )?;
        self.cut(&range);
        self.regions.insert(range.start, hashes);
        Ok(())
    }

    /// Stops tracking `range` (page-aligned); parts of it that were not
    /// registered are ignored.
    pub fn unregister(&mut self, range: Range<u64>) -> Result<(), HashError> {
        self.check_aligned(&range)?;
        self.cut(&range);
        Ok(())
    }

    /// Appends to `out` the page ranges in `range` whose contents changed
    /// since the last scan (or registration), adjacent pages merged, in
    /// address order, and records their new hashes. `range` must be
    /// page-aligned and registered in full. On error nothing is recorded
    /// and `out` is unchanged.
    pub fn scan(&mut self, range: Range<u64>, out: &mut Vec<Range<u64>>) -> Result<(), HashError> {
        self.check_aligned(&range)?;
        if range.is_empty() {
            return Ok(());
        }
        let segments = self.segments(&range)?;
        let maps = read_maps(self.pid)?;
        let mut now = Vec::with_capacity(((range.end - range.start) / self.page) as usize);
        for (_, sub) in &segments {
            hash_pages(
                self.pid,
                self.page,
                &maps,
                sub.clone(),
                &mut self.buf,
                |_, h| now.push(h),
            )?;
        }
        let mut now = now.into_iter();
        for (region, sub) in segments {
            let stored = self.regions.get_mut(&region).expect("segment of a region");
            let first = ((sub.start - region) / self.page) as usize;
            let count = ((sub.end - sub.start) / self.page) as usize;
            for (i, old) in stored[first..first + count].iter_mut().enumerate() {
                let h = now.next().expect("one hash per page");
                if *old != h {
                    *old = h;
                    let addr = sub.start + i as u64 * self.page;
                    ranges::push_merged(out, addr..addr + self.page);
                }
            }
        }
        Ok(())
    }

    fn check_aligned(&self, range: &Range<u64>) -> Result<(), HashError> {
        if ranges::page_aligned(range, self.page) {
            Ok(())
        } else {
            Err(HashError::Unaligned {
                start: range.start,
                end: range.end,
            })
        }
    }

    /// End address of the region starting at `start` with `hashes`.
    fn end_of(&self, start: u64, hashes: &[u64]) -> u64 {
        start + hashes.len() as u64 * self.page
    }

    /// Removes `range` from the registered regions, splitting those it cuts.
    fn cut(&mut self, range: &Range<u64>) {
        let hit: Vec<u64> = self
            .regions
            .range(..range.end)
            .rev()
            .take_while(|(&s, h)| self.end_of(s, h) > range.start)
            .map(|(&s, _)| s)
            .collect();
        for start in hit {
            let mut hashes = self.regions.remove(&start).expect("listed above");
            let end = self.end_of(start, &hashes);
            if end > range.end {
                let tail = hashes.split_off(((range.end - start) / self.page) as usize);
                self.regions.insert(range.end, tail);
            }
            if start < range.start {
                hashes.truncate(((range.start - start) / self.page) as usize);
                self.regions.insert(start, hashes);
            }
        }
    }

    /// The registered regions covering `range`, as (region start, part of
    /// `range` in it), in address order; an error if a page is uncovered.
    fn segments(&self, range: &Range<u64>) -> Result<Vec<(u64, Range<u64>)>, HashError> {
        let lower = self
            .regions
            .range(..=range.start)
            .next_back()
            .map_or(range.start, |(&s, _)| s);
        let mut out = Vec::new();
        let mut addr = range.start;
        for (&start, hashes) in self.regions.range(lower..range.end) {
            let end = self.end_of(start, hashes);
            if end <= addr {
                continue;
            }
            if start > addr {
                break;
            }
            let sub = addr..end.min(range.end);
            addr = sub.end;
            out.push((start, sub));
        }
        if addr < range.end {
            return Err(HashError::NotRegistered {
                addr,
                start: range.start,
                end: range.end,
            });
        }
        Ok(out)
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    readable: bool,
}

fn read_maps(pid: i32) -> Result<Vec<Vma>, HashError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| HashError::Maps { pid, source })?;
    Ok(parse_maps(&text))
}

fn parse_maps(text: &str) -> Vec<Vma> {
    cr_ebpf_resources::proc::parse_maps(text)
        .unwrap_or_default()
        .into_iter()
        .map(|m| Vma {
            start: m.start,
            end: m.end,
            readable: m.prot & libc::PROT_READ as u32 != 0,
        })
        .collect()
}

/// The first address of `range` that no mapping covers, if any.
fn first_unmapped(maps: &[Vma], range: &Range<u64>) -> Option<u64> {
    let mut addr = range.start;
    while addr < range.end {
        let i = maps.partition_point(|v| v.end <= addr);
        match maps.get(i) {
            Some(v) if v.start <= addr => addr = v.end,
            _ => return Some(addr),
        }
    }
    None
}

/// Calls `f(address, hash)` for every page of `range` in address order,
/// reading readable mappings in batches of `buf.len()` bytes.
fn hash_pages(
    pid: i32,
    page: u64,
    maps: &[Vma],
    range: Range<u64>,
    buf: &mut [u8],
    mut f: impl FnMut(u64, u64),
) -> Result<(), HashError> {
    let page_len = page as usize;
    let mut addr = range.start;
    while addr < range.end {
        let i = maps.partition_point(|v| v.end <= addr);
        let (readable, stop) = match maps.get(i) {
            Some(v) if v.start <= addr => (v.readable, v.end.min(range.end)),
            Some(v) => (false, v.start.min(range.end)),
            None => (false, range.end),
        };
        if !readable {
            while addr < stop {
                f(addr, UNREADABLE);
                addr += page;
            }
            continue;
        }
        while addr < stop {
            let len = ((stop - addr) as usize).min(buf.len());
            let n = read_some(pid, addr, &mut buf[..len])?;
            let good = n / page_len;
            for p in buf[..good * page_len].chunks_exact(page_len) {
                f(addr, page_hash(p));
                addr += page;
            }
            if good * page_len < len {
                // The kernel stopped at this page: it cannot be read.
                f(addr, UNREADABLE);
                addr += page;
            }
        }
    }
    Ok(())
}

/// One read of `/proc/PID/mem` (which, unlike `process_vm_readv`, takes
/// no pin and so leaves pages shared copy-on-write with another process
/// shared): the number of bytes read from `addr` on, which stops short at
/// the first page that cannot be read (0 if it is the first).
fn read_some(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, HashError> {
    use std::os::unix::fs::FileExt as _;
    let source = match std::fs::File::open(format!("/proc/{pid}/mem")) {
        Ok(mem) => match mem.read_at(buf, addr) {
            Ok(n) => return Ok(n),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Err(e) => e,
        },
        Err(e) => e,
    };
    Err(HashError::Read {
        pid,
        addr,
        len: buf.len(),
        source,
    })
}

/// Proves the backend: hashes a private mapping of this process (with one
/// `PROT_NONE` page), writes known pages with new values and one with the
/// value it already holds, and requires a scan to return exactly the
/// changed pages and a second scan nothing. Returns a one-line summary.
pub fn probe() -> Result<String, String> {
    let page = sys::page_size();
    let pages = 16usize;
    let map = sys::AnonMapping::new(pages * page as usize).map_err(|e| format!("mmap: {e}"))?;
    let range = map.addr()..map.addr() + map.len() as u64;
    let none = 13usize;
    for p in (0..pages).filter(|&p| p != none) {
        map.write_byte(p * page as usize, 1);
    }
    // SAFETY: the probe never touches page `none` through the accessors.
    unsafe { map.protect(none * page as usize, page as usize, libc::PROT_NONE) }
        .map_err(|e| format!("mprotect: {e}"))?;
    let mut tracker =
        HashTracker::for_process(std::process::id() as i32).map_err(|e| crate::error_chain(&e))?;
    tracker
        .register(range.clone())
        .map_err(|e| crate::error_chain(&e))?;
    let written = [2usize, 7, 11];
    for &p in &written {
        map.write_byte(p * page as usize + 5, 0xab);
    }
    // Same value as before: not a change of contents.
    map.write_byte(4 * page as usize, 1);
    let mut found = Vec::new();
    tracker
        .scan(range.clone(), &mut found)
        .map_err(|e| crate::error_chain(&e))?;
    let expected: Vec<Range<u64>> = written
        .iter()
        .map(|&p| {
            let a = range.start + p as u64 * page;
            a..a + page
        })
        .collect();
    if found != expected {
        return Err(format!(
            "scan after writing pages {written:?} returned {found:x?}, expected {expected:x?}"
        ));
    }
    let mut again = Vec::new();
    tracker
        .scan(range.clone(), &mut again)
        .map_err(|e| crate::error_chain(&e))?;
    if !again.is_empty() {
        return Err(format!("a rescan with no writes returned {again:x?}"));
    }
    Ok(format!(
        "{} of {} changed pages found, rescan clean (/proc/PID/mem, {} pages per read)",
        found.len(),
        written.len(),
        BATCH_PAGES
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_hash_sees_every_single_byte_change() {
        let mut page = vec![0u8; 4096];
        let base = page_hash(&page);
        assert_ne!(base, UNREADABLE);
        assert_eq!(base, page_hash(&page), "deterministic");
        for i in (0..4096).step_by(7).chain([0, 8, 31, 32, 4095]) {
            for v in [1u8, 0x80, 0xff] {
                page[i] = v;
                assert_ne!(page_hash(&page), base, "byte {i} set to {v:#x}");
                page[i] = 0;
            }
        }
        // Two changes in the same lane that would cancel in a plain
        // multiply-xor hash (top bit of words 0 and 4).
        page[7] = 0x80;
        page[39] = 0x80;
        assert_ne!(page_hash(&page), base);
    }

    #[test]
    fn page_hash_odd_lengths() {
        assert_ne!(page_hash(b""), page_hash(b"\0"));
        assert_ne!(page_hash(b"ab"), page_hash(b"ab\0"));
        assert_ne!(page_hash(&[0; 33]), page_hash(&[0; 32]));
        assert_ne!(
            page_hash(&[0; 40]),
            page_hash(&[
                0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])
        );
    }

    #[test]
    fn parses_maps() {
        let text = "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/x\n\
                    00452000-00453000 ---p 00000000 00:00 0 \n\
                    00453000-00454000 -w-p 00000000 00:00 0\n\
                    00460000-00461000 rw-p 00000000 00:00 0 [heap]\n";
        let maps = parse_maps(text);
        let vma = |start, end, readable| Vma {
            start,
            end,
            readable,
        };
        assert_eq!(
            maps,
            vec![
                vma(0x400000, 0x452000, true),
                vma(0x452000, 0x453000, false),
                vma(0x453000, 0x454000, false),
                vma(0x460000, 0x461000, true),
            ]
        );
        assert_eq!(first_unmapped(&maps, &(0x400000..0x454000)), None);
        assert_eq!(first_unmapped(&maps, &(0x451000..0x461000)), Some(0x454000));
        assert_eq!(first_unmapped(&maps, &(0x460000..0x462000)), Some(0x461000));
        assert_eq!(first_unmapped(&maps, &(0x3ff000..0x401000)), Some(0x3ff000));
    }

    #[test]
    fn probe_passes() {
        let summary = probe().unwrap();
        assert!(summary.starts_with("3 of 3"), "{summary}");
    }

    fn page_of(map: &sys::AnonMapping, i: usize) -> Range<u64> {
        let p = sys::page_size();
        map.addr() + i as u64 * p..map.addr() + (i as u64 + 1) * p
    }

    /// More pages than one batch, unreadable pages in the middle, partial
    /// unregistering, and a page that changes readability.
    #[test]
    fn tracks_changes_across_batches_and_unreadable_pages() {
        let p = sys::page_size() as usize;
        let n = BATCH_PAGES + 44;
        let map = sys::AnonMapping::new(n * p).unwrap();
        let all = map.addr()..map.addr() + (n * p) as u64;
        for i in 0..n {
            map.write_byte(i * p, i as u8);
        }
        // SAFETY: pages 100..103 are not touched while inaccessible.
        unsafe { map.protect(100 * p, 3 * p, libc::PROT_NONE) }.unwrap();
        let mut t = HashTracker::for_process(std::process::id() as i32).unwrap();
        t.register(all.clone()).unwrap();
        assert_eq!(t.registered_pages(), n);
        let scan = |t: &mut HashTracker, r: Range<u64>| {
            let mut v = Vec::new();
            t.scan(r, &mut v).unwrap();
            v
        };
        assert_eq!(scan(&mut t, all.clone()), vec![]);
        for i in [0, 99, 103, 255, 256, 257, n - 1] {
            map.write_byte(i * p + 9, 0x5a);
        }
        assert_eq!(
            scan(&mut t, all.clone()),
            vec![
                page_of(&map, 0),
                page_of(&map, 99),
                page_of(&map, 103),
                page_of(&map, 255).start..page_of(&map, 257).end,
                page_of(&map, n - 1),
            ]
        );
        // The same value again is no change.
        map.write_byte(99 * p + 9, 0x5a);
        assert_eq!(scan(&mut t, all.clone()), vec![]);
        // A page turning unreadable, and one turning readable, are changes.
        // SAFETY: page 50 is not touched while inaccessible; page 101
        // becomes accessible again.
        unsafe {
            map.protect(50 * p, p, libc::PROT_NONE).unwrap();
            map.protect(101 * p, p, libc::PROT_READ | libc::PROT_WRITE)
                .unwrap();
        }
        assert_eq!(
            scan(&mut t, all.clone()),
            vec![page_of(&map, 50), page_of(&map, 101)]
        );
        // Scanning a sub-range leaves the rest pending.
        map.write_byte(10 * p, 0x77);
        map.write_byte(200 * p, 0x77);
        assert_eq!(
            scan(&mut t, page_of(&map, 0).start..page_of(&map, 20).end),
            vec![page_of(&map, 10)]
        );
        assert_eq!(scan(&mut t, all.clone()), vec![page_of(&map, 200)]);
        // Unregistering the middle: scans of it fail, the rest still works.
        let hole = page_of(&map, 20).start..page_of(&map, 30).end;
        t.unregister(hole.clone()).unwrap();
        assert_eq!(t.registered_pages(), n - 11);
        assert!(matches!(
            t.scan(all.clone(), &mut Vec::new()),
            Err(HashError::NotRegistered { addr, .. }) if addr == hole.start
        ));
        map.write_byte(19 * p, 0x11);
        map.write_byte(25 * p, 0x11);
        map.write_byte(31 * p, 0x11);
        assert_eq!(scan(&mut t, all.start..hole.start), vec![page_of(&map, 19)]);
        assert_eq!(scan(&mut t, hole.end..all.end), vec![page_of(&map, 31)]);
        // Registering the hole again starts it afresh: the earlier write
        // to page 25 is part of its baseline.
        t.register(hole.clone()).unwrap();
        assert_eq!(scan(&mut t, all.clone()), vec![]);
        map.write_byte(25 * p, 0x12);
        assert_eq!(scan(&mut t, all.clone()), vec![page_of(&map, 25)]);
    }

    #[test]
    fn refuses_bad_ranges() {
        let p = sys::page_size();
        let map = sys::AnonMapping::new(4 * p as usize).unwrap();
        let mut t = HashTracker::for_process(std::process::id() as i32).unwrap();
        assert!(matches!(
            t.register(map.addr() + 1..map.addr() + p),
            Err(HashError::Unaligned { .. })
        ));
        // Below mmap_min_addr: never mapped.
        let gone = p..2 * p;
        assert!(matches!(
            t.register(gone.clone()),
            Err(HashError::Unmapped { addr, .. }) if addr == gone.start
        ));
        assert!(matches!(
            t.scan(map.addr()..map.addr() + p, &mut Vec::new()),
            Err(HashError::NotRegistered { .. })
        ));
        assert!(t.register(map.addr()..map.addr()).is_ok());
        assert_eq!(t.registered_pages(), 0);
        assert!(HashTracker::for_process(i32::MAX).is_err());
    }
}
