//! `/proc/PID/maps` and `/proc/PID/pagemap`.

use std::{
    fs::File,
    os::unix::fs::{FileExt, MetadataExt as _},
};

use cr_ebpf_image::{MappingKind, MAP_GROWSDOWN, MAP_SHARED};

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// `PROT_*`.
    pub prot: u32,
    /// Shared (`s`) rather than private (`p`).
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// `major << 32 | minor`.
    pub dev: u64,
    /// Inode.
    pub inode: u64,
    /// Path or `[name]`; empty for anonymous memory.
    pub path: String,
    /// A shared mapping of a file on tmpfs (`shm_open`, `/dev/shm`): shared
    /// memory whose contents are stored (see [`mark_tmpfs`]).
    pub tmpfs: bool,
    /// A mapping of a deleted file with no link left (see [`mark_ghosts`]):
    /// its contents are stored as a shared memory object.
    pub ghost: bool,
    /// The mapping's own settings, as image flags (see the advice module);
    /// 0 until read or carried over.
    pub advice: u32,
    /// Its guard regions, as (first address, pages): empty until the guards
    /// module reads them.
    pub guards: Runs,
}

impl MapEntry {
    /// What kind of mapping this is.
    pub fn kind(&self) -> MappingKind {
        match self.path.as_str() {
            "" => MappingKind::Anon,
            "[heap]" => MappingKind::Heap,
            "[stack]" => MappingKind::Stack,
            "[vdso]" => MappingKind::Vdso,
            "[vsyscall]" => MappingKind::Vsyscall,
            p if p.starts_with("[vvar") => MappingKind::Vvar,
            p if p.starts_with('[') => MappingKind::Anon,
            // Shared anonymous memory, also mapped private through its
            // file (`/proc/PID/map_files`).
            "/dev/zero (deleted)" => MappingKind::Shmem,
            p if p.starts_with("/memfd:") => MappingKind::Shmem,
            p if p.starts_with("/SYSV") && self.shared => MappingKind::Shmem,
            _ if self.tmpfs || self.ghost => MappingKind::Shmem,
            _ if self.inode == 0 => MappingKind::Anon,
            _ => MappingKind::File,
        }
    }

    /// `MAP_SHARED`/`MAP_GROWSDOWN` bits for the image.
    pub fn image_flags(&self) -> u32 {
        let mut f = 0;
        if self.shared {
            f |= MAP_SHARED;
        }
        if self.kind() == MappingKind::Stack {
            f |= MAP_GROWSDOWN;
        }
        f | self.advice
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Marks the shared mappings of files (not deleted) that live on tmpfs, by
/// `statfs` through `/proc/PID/map_files`.
pub fn mark_tmpfs(pid: i32, entries: &mut [MapEntry]) {
    for m in entries.iter_mut() {
        if !m.shared
            || m.inode == 0
            || !m.path.starts_with('/')
            || m.path.ends_with(" (deleted)")
            || m.kind() != MappingKind::File
        {
            continue;
        }
        let Ok(path) =
            std::ffi::CString::new(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
        else {
            continue;
        };
        // SAFETY: a NUL-terminated path and a zeroed out-struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type == TMPFS_MAGIC {
            m.tmpfs = true;
        }
    }
}

/// Marks the mappings of deleted files that have no link left (stat
/// through `/proc/PID/map_files`): deleted files whose contents are stored.
/// Mappings of deleted files that still have a link stay file mappings
/// (and are refused).
pub fn mark_ghosts(pid: i32, entries: &mut [MapEntry]) {
    for m in entries.iter_mut() {
        if m.inode == 0
            || m.kind() != MappingKind::File
            || crate::ghost::deleted_path(&m.path).is_none()
            || m.path.starts_with("/[")
        {
            continue;
        }
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        if let Ok(meta) = std::fs::metadata(path) {
            m.ghost = crate::ghost::refusal(&m.path, &meta).is_none()
                && meta.mode() & libc::S_IFMT == libc::S_IFREG;
        }
    }
}

/// Parses the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<MapEntry>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let bad = || format!("unexpected maps line {line:?}");
        let range = it.next().ok_or_else(bad)?;
        let perms = it.next().ok_or_else(bad)?.as_bytes();
        let offset = it.next().ok_or_else(bad)?;
        let dev = it.next().ok_or_else(bad)?;
        let inode = it.next().ok_or_else(bad)?;
        let path = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        let (maj, min) = dev.split_once(':').ok_or_else(bad)?;
        let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|_| bad());
        if perms.len() < 4 {
            return Err(bad());
        }
        let mut prot = 0;
        if perms[0] == b'r' {
            prot |= libc::PROT_READ as u32;
        }
        if perms[1] == b'w' {
            prot |= libc::PROT_WRITE as u32;
        }
        if perms[2] == b'x' {
            prot |= libc::PROT_EXEC as u32;
        }
        out.push(MapEntry {
            start: hex(s)?,
            end: hex(e)?,
            prot,
            shared: perms[3] == b's',
            offset: hex(offset)?,
            dev: hex(maj)? << 32 | hex(min)?,
            inode: inode.parse().map_err(|_| bad())?,
            path,
            tmpfs: false,
            ghost: false,
            advice: 0,
            guards: Vec::new(),
        });
    }
    Ok(out)
}

/// pagemap: page present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: page swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// pagemap: file page or shared anonymous page (not a private copy).
const PM_FILE: u64 = 1 << 61;
/// pagemap: a guard region page (`MADV_GUARD_INSTALL`, Linux 6.14+).
const PM_GUARD_REGION: u64 = 1 << 58;
/// Swap type bits of a pagemap entry that is not present (shown to a
/// reader with `CAP_SYS_ADMIN`; zero otherwise).
const PM_SWAP_TYPE: u64 = 0x1f;
/// The swap type of a PTE marker: the kernel's last one, after every swap
/// device's. A marker (a write-protect mark userfaultfd left on a page
/// never touched, while the process is tracked) is no page: the kernel
/// shows it as swapped all the same.
const SWP_PTE_MARKER: u64 = 0x1f;

/// Whether pagemap entry `e` is a page of memory (present, or swapped out
/// to a swap device), not a PTE marker on a page never touched.
fn holds_page(e: u64) -> bool {
    e & PM_PRESENT != 0 || (e & PM_SWAPPED != 0 && e & PM_SWAP_TYPE != SWP_PTE_MARKER)
}

/// Whether the private mapping `m` of a child lies inside one mapping of
/// its parent (`parent`) of the same kind, file and offset, flags and
/// droppability: then a fork gave it the parent's pages, and a restore can
/// make it so again.
pub fn inheritable(parent: &[MapEntry], m: &MapEntry) -> bool {
    let kinds = matches!(
        m.kind(),
        MappingKind::Anon | MappingKind::Heap | MappingKind::Stack | MappingKind::File
    );
    let own = cr_ebpf_image::MAP_DROPPABLE | cr_ebpf_image::MAP_NORESERVE;
    kinds
        && !m.shared
        && m.advice & cr_ebpf_image::MAP_DROPPABLE == 0
        && parent.iter().any(|p| {
            p.start <= m.start
                && m.end <= p.end
                && !p.shared
                && p.kind() == m.kind()
                && p.path == m.path
                && (p.advice ^ m.advice) & own == 0
                && (m.kind() != MappingKind::File
                    || (p.dev, p.inode, p.offset + (m.start - p.start))
                        == (m.dev, m.inode, m.offset))
        })
}

/// pagemap: the page frame number (shown to CAP_SYS_ADMIN only).
const PM_PFN: u64 = (1 << 55) - 1;

/// The pages of `m` whose contents must be stored: every present or swapped
/// page of anonymous memory, and the private copies (copy-on-write) inside
/// private file mappings. Returned as runs `(first page address, pages)`.
/// Guard pages not among the mapping's recorded guard regions are an
/// `Unsupported` error naming them.
pub fn dumpable_runs(pagemap: &File, m: &MapEntry) -> std::io::Result<Vec<(u64, u64)>> {
    Ok(runs_sharing(pagemap, None, m)?.0)
}

/// Page runs: (first page address, pages).
pub type Runs = Vec<(u64, u64)>;

/// As [`dumpable_runs`], with the parent process's pagemap: the pages that
/// are the parent's very pages at the same address (the same frame:
/// copy-on-write sharing since a fork) come apart, as the second list.
pub fn runs_sharing(
    pagemap: &File,
    parent: Option<&File>,
    m: &MapEntry,
) -> std::io::Result<(Runs, Runs)> {
    let kind = m.kind();
    if matches!(
        kind,
        MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
    ) || m.shared
        || m.advice & cr_ebpf_image::MAP_DROPPABLE != 0
    {
        // Droppable memory may read as zeroes at any time: none is stored.
        return Ok((Vec::new(), Vec::new()));
    }
    let pages = ((m.end - m.start) / 4096) as usize;
    let mut entries = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut entries, m.start / 4096 * 8)?;
    let mut theirs = Vec::new();
    if let Some(p) = parent {
        theirs = vec![0u8; pages * 8];
        p.read_exact_at(&mut theirs, m.start / 4096 * 8)?;
    }
    let entry = |b: &[u8], i: usize| {
        b.get(i * 8..i * 8 + 8)
            .map_or(0, |e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
    };
    let (mut runs, mut shared): (Runs, Runs) = (Vec::new(), Vec::new());
    for i in 0..pages {
        let e = entry(&entries, i);
        let addr = m.start + i as u64 * 4096;
        let recorded = || {
            m.guards
                .iter()
                .any(|&(a, p)| a <= addr && addr < a + p * 4096)
        };
        if e & PM_GUARD_REGION != 0 && recorded() {
            continue;
        }
        if e & PM_GUARD_REGION != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "guard pages (MADV_GUARD_INSTALL) at {addr:#x} this kernel does not \
                     report with PAGEMAP_SCAN: they would not be installed again"
                ),
            ));
        }
        let keep = match kind {
            MappingKind::File | MappingKind::Shmem => e & PM_PRESENT != 0 && e & PM_FILE == 0,
            _ => holds_page(e),
        };
        if !keep {
            continue;
        }
        let t = entry(&theirs, i);
        let same_frame = e & PM_PRESENT != 0
            && t & PM_PRESENT != 0
            && t & PM_FILE == 0
            && e & PM_PFN != 0
            && e & PM_PFN == t & PM_PFN;
        let to = if same_frame { &mut shared } else { &mut runs };
        match to.last_mut() {
            Some((a, n)) if *a + *n * 4096 == addr => *n += 1,
            _ => to.push((addr, 1)),
        }
    }
    Ok((runs, shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pte_marker_is_no_page() {
        assert!(holds_page(PM_PRESENT | 1234));
        assert!(holds_page(PM_SWAPPED | (77 << 5)), "swap device 0");
        assert!(holds_page(PM_SWAPPED | (77 << 5) | 3), "swap device 3");
        assert!(holds_page(PM_SWAPPED), "type hidden to the reader: kept");
        assert!(
            !holds_page(PM_SWAPPED | SWP_PTE_MARKER | (1 << 57)),
            "uffd-wp marker"
        );
        assert!(!holds_page(0));
    }

    #[test]
    fn parses_the_kinds_of_lines() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1234    /usr/bin/x
55d0c2000000-55d0c2021000 rw-p 00000000 00:00 0       [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:01 77      /dev/zero (deleted)
7ffd0000d000-7ffd0002e000 rw-p 00000000 00:00 0       [stack]
7ffd000f0000-7ffd000f4000 r--p 00000000 00:00 0       [vvar]
7ffd000f6000-7ffd000f8000 r-xp 00000000 00:00 0       [vdso]
7f1000000000-7f1000001000 ---p 00000000 00:00 0 
";
        let m = parse_maps(text).unwrap();
        assert_eq!(m.len(), 7);
        assert_eq!(m[0].kind(), MappingKind::File);
        assert_eq!((m[0].dev, m[0].inode), (0xfe << 32 | 1, 1234));
        assert_eq!(m[1].kind(), MappingKind::Heap);
        assert!(m[2].shared);
        assert_eq!(m[3].kind(), MappingKind::Stack);
        assert_eq!(m[3].image_flags(), MAP_GROWSDOWN);
        assert_eq!(m[4].kind(), MappingKind::Vvar);
        assert_eq!(m[5].kind(), MappingKind::Vdso);
        assert_eq!((m[6].kind(), m[6].prot), (MappingKind::Anon, 0));
        assert_eq!(m[1].prot, 3);
        assert!(parse_maps("garbage").is_err());
    }

    #[test]
    fn guard_pages_are_skipped_when_recorded_and_named_otherwise() {
        // SAFETY: a private anonymous mapping of our own, unmapped below.
        let a = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(a, libc::MAP_FAILED);
        // SAFETY: touching our own mapping, then MADV_GUARD_INSTALL (102) on its second page.
        let guarded = unsafe {
            a.cast::<u8>().write(1);
            libc::madvise(a.cast::<u8>().add(4096).cast(), 4096, 102)
        } == 0;
        let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap()).unwrap();
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut m = maps.iter().find(|m| m.start == a as u64).unwrap().clone();
        let runs = dumpable_runs(&pagemap, &m);
        m.guards = vec![(a as u64 + 4096, 1)];
        let marked = dumpable_runs(&pagemap, &m);
        // SAFETY: our mapping.
        unsafe { libc::munmap(a, 4 * 4096) };
        if !guarded {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: MADV_GUARD_INSTALL (Linux 6.13+) missing"
            );
            eprintln!("skipped: no MADV_GUARD_INSTALL on this kernel (6.13+)");
            return;
        }
        // Unrecorded: refused; recorded: skipped, the page before stored.
        let err = runs.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
        assert!(err.to_string().contains("guard pages"), "{err}");
        assert_eq!(marked.unwrap(), [(a as u64, 1)]);
    }
}
