//! Guard regions (`MADV_GUARD_INSTALL`, Linux 6.13+): pages that fault on
//! any access without being mapped. Found with one `PAGEMAP_SCAN` per
//! mapping (category `PAGE_IS_GUARD`, Linux 6.14+), which skips everything
//! else; recorded with their mapping and installed again at restore, after
//! its pages are filled.

use std::{fs::File, os::fd::AsRawFd as _};

use super::maps::{MapEntry, Runs};

/// `PAGE_IS_GUARD`.
const PAGE_IS_GUARD: u64 = 1 << 8;
/// `MADV_GUARD_INSTALL`.
pub const MADV_GUARD_INSTALL: u64 = 102;
/// Regions asked for per call.
const REGIONS: usize = 256;

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::Ioctl =
    ((3 << 30) | (std::mem::size_of::<PmScanArg>() << 16) | ((b'f' as usize) << 8) | 16) as _;

/// The guard regions in `start..end` of the process whose pagemap is
/// `pagemap`, as (first address, pages); `None` when this kernel cannot
/// tell (no `PAGEMAP_SCAN` or no `PAGE_IS_GUARD`: it has no guard regions
/// to report either, or the pagemap bit shows them).
pub fn scan(pagemap: &File, start: u64, end: u64) -> std::io::Result<Option<Runs>> {
    let mut out: Runs = Vec::new();
    let mut vec = [PageRegion::default(); REGIONS];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: REGIONS as u64,
            category_mask: PAGE_IS_GUARD,
            return_mask: PAGE_IS_GUARD,
            ..PmScanArg::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions into `vec`, which outlives the call, and `walk_end`.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL | libc::ENOTTY) => Ok(None),
                _ => Err(e),
            };
        }
        for r in &vec[..n as usize] {
            match out.last_mut() {
                Some((a, p)) if *a + *p * 4096 == r.start => *p += (r.end - r.start) / 4096,
                _ => out.push((r.start, (r.end - r.start) / 4096)),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(Some(out))
}

/// Fills the guard regions of every mapping of `entries` but the kernel's
/// own (`[vdso]`, `[vvar]`, `[vsyscall]`). With `prev`, the previous
/// checkpoint's mappings when the resource log shows no `madvise` since,
/// a mapping the log shows no layout change in (`touched`) takes its guard
/// regions from them instead of being scanned (a moved one keeps its
/// guards: it is scanned).
pub fn mark(
    pagemap: &File,
    entries: &mut [MapEntry],
    prev: Option<&[cr_ebpf_image::MappingInfo]>,
    touched: &dyn Fn(u64, u64) -> bool,
) -> std::io::Result<()> {
    use cr_ebpf_image::MappingKind;
    for m in entries.iter_mut().filter(|m| {
        !matches!(
            m.kind(),
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        )
    }) {
        if let Some(prev) = prev.filter(|_| !touched(m.start, m.end)) {
            m.guards = prev
                .iter()
                .flat_map(|p| p.guards.iter())
                .filter_map(|&(a, n)| {
                    let (s, e) = (a.max(m.start), (a + n * 4096).min(m.end));
                    (s < e).then(|| (s, (e - s) / 4096))
                })
                .collect();
            continue;
        }
        match scan(pagemap, m.start, m.end)? {
            Some(g) => m.guards = g,
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_pages_of_a_mapping_are_found() {
        // SAFETY: a private anonymous mapping of our own, unmapped below.
        let a = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_ne!(a, libc::MAP_FAILED as u64);
        // SAFETY: MADV_GUARD_INSTALL on pages 1, 4 and 5 of our mapping.
        let guarded = unsafe {
            libc::madvise((a + 4096) as *mut _, 4096, 102) == 0
                && libc::madvise((a + 4 * 4096) as *mut _, 2 * 4096, 102) == 0
        };
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let found = scan(&pagemap, a, a + 8 * 4096);
        // SAFETY: our mapping.
        unsafe { libc::munmap(a as *mut _, 8 * 4096) };
        let found = found.unwrap();
        if !guarded || found.is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: MADV_GUARD_INSTALL or PAGE_IS_GUARD (Linux 6.14+) missing"
            );
            eprintln!("skipped: no guard regions on this kernel (6.14+)");
            return;
        }
        assert_eq!(found.unwrap(), [(a + 4096, 1), (a + 4 * 4096, 2)]);
    }

    #[test]
    fn guard_regions_are_carried_over_where_the_log_shows_no_change() {
        let entry = |start: u64, end: u64| MapEntry {
            start,
            end,
            prot: 3,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            path: String::new(),
            tmpfs: false,
            ghost: false,
            advice: 0,
            guards: Vec::new(),
        };
        // A mapping split in two since (mprotect): each piece takes the
        // regions inside it.
        let prev = [cr_ebpf_image::MappingInfo {
            start: 0x10000,
            end: 0x20000,
            guards: vec![(0x11000, 2), (0x17000, 3)],
            ..Default::default()
        }];
        let mut entries = [entry(0x10000, 0x18000), entry(0x18000, 0x20000)];
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        mark(&pagemap, &mut entries, Some(&prev), &|_, _| false).unwrap();
        assert_eq!(entries[0].guards, [(0x11000, 2), (0x17000, 1)]);
        assert_eq!(entries[1].guards, [(0x18000, 2)]);
        // One the log shows a change in is scanned (nothing mapped there
        // in this process: no guards).
        let mut entries = [entry(0x10000, 0x18000)];
        mark(&pagemap, &mut entries, Some(&prev), &|_, _| true).unwrap();
        assert!(entries[0].guards.is_empty());
    }
}
