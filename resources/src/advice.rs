//! A mapping's own settings: what `madvise` (sequential, random, don't
//! fork, don't dump, huge pages, mergeable, wipe on fork), `mlock` and the
//! `mmap` flags `MAP_LOCKED`, `MAP_DROPPABLE` and `MAP_NORESERVE` set on it, and whether a
//! shared file mapping's file was opened for writing. Only the kernel's
//! `VmFlags` in `/proc/PID/smaps` show them, and reading smaps walks every
//! page table (about 6 ms a GiB), so a checkpoint whose resource log is
//! complete carries them over from the previous checkpoint ([`inherit`])
//! and reads smaps only when the log shows a call that changes them. At
//! restore they are set again on the rebuilt mapping ([`restore`]).

use cr_ebpf_image::{
    MappingInfo, MappingKind, MAP_DONTDUMP, MAP_DONTFORK, MAP_DROPPABLE, MAP_HUGEPAGE, MAP_LOCKED,
    MAP_LOCKONFAULT, MAP_MAYWRITE, MAP_MERGEABLE, MAP_NOHUGEPAGE, MAP_NORESERVE, MAP_RANDOM,
    MAP_SEQUENTIAL, MAP_WIPEONFORK,
};

use crate::{proc::MapEntry, process::Changes, sys::Sys, RestoreError};

/// `VmFlags` mnemonics, the image flag each one is, and the `madvise`
/// advice that sets it again (`None`: set another way).
const FLAGS: &[(&str, u32, Option<u64>)] = &[
    ("sr", MAP_SEQUENTIAL, Some(libc::MADV_SEQUENTIAL as u64)),
    ("rr", MAP_RANDOM, Some(libc::MADV_RANDOM as u64)),
    ("dc", MAP_DONTFORK, Some(libc::MADV_DONTFORK as u64)),
    ("dd", MAP_DONTDUMP, Some(libc::MADV_DONTDUMP as u64)),
    ("hg", MAP_HUGEPAGE, Some(libc::MADV_HUGEPAGE as u64)),
    ("nh", MAP_NOHUGEPAGE, Some(libc::MADV_NOHUGEPAGE as u64)),
    ("mg", MAP_MERGEABLE, Some(libc::MADV_MERGEABLE as u64)),
    ("wf", MAP_WIPEONFORK, Some(libc::MADV_WIPEONFORK as u64)),
    ("lo", MAP_LOCKED, None),
    ("lf", MAP_LOCKONFAULT, None),
    ("dp", MAP_DROPPABLE, None),
    ("nr", MAP_NORESERVE, None),
];

/// Every flag of this module.
pub const ADVICE: u32 = MAP_SEQUENTIAL
    | MAP_RANDOM
    | MAP_DONTFORK
    | MAP_DONTDUMP
    | MAP_HUGEPAGE
    | MAP_NOHUGEPAGE
    | MAP_MERGEABLE
    | MAP_WIPEONFORK
    | MAP_LOCKED
    | MAP_LOCKONFAULT
    | MAP_DROPPABLE
    | MAP_NORESERVE
    | MAP_MAYWRITE;

/// `mmap`'s `MAP_DROPPABLE` mapping type.
pub const MMAP_DROPPABLE: i32 = 0x08;
/// `mlock2`'s `MLOCK_ONFAULT`.
const MLOCK_ONFAULT: u64 = 1;

/// The image flags of one `VmFlags:` line, and whether the mapping is
/// sealed (`mseal`).
pub fn parse_vm_flags(line: &str, shared: bool) -> (u32, bool) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut bits = FLAGS
        .iter()
        .filter(|(w, _, _)| words.contains(w))
        .fold(0, |b, (_, f, _)| b | f);
    // A shared mapping that may be made writable: its file is open for
    // writing (a private mapping may always be).
    if shared && words.contains(&"mw") && !words.contains(&"wr") {
        bits |= MAP_MAYWRITE;
    }
    (bits, words.contains(&"sl"))
}

/// Reads `VmFlags` of every mapping of `pid` from `/proc/PID/smaps` into
/// `entries` (matched by start address). Returns the start of a sealed
/// mapping other than the kernel's own (`[vdso]` and friends), if any.
pub fn read(pid: i32, entries: &mut [MapEntry]) -> std::io::Result<Option<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut at = None;
    let mut sealed = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let Some(m) = at.and_then(|i: usize| entries.get_mut(i)) else {
                continue;
            };
            let (bits, sl) = parse_vm_flags(flags, m.shared);
            m.advice = bits;
            let kernel = matches!(
                m.kind(),
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
            );
            if sl && !kernel && sealed.is_none() {
                sealed = Some(m.start);
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            // A mapping's header line: "start-end perms ...".
            if let Some((s, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(s, 16) {
                    at = entries.iter().position(|m| m.start == start);
                }
            }
        }
    }
    Ok(sealed)
}

/// Takes each mapping's flags from `prev` (the previous checkpoint's
/// mappings) when the log says nothing could have changed them; returns
/// `false` when some mapping needs smaps read ([`read`]).
pub fn inherit(entries: &mut [MapEntry], prev: &[MappingInfo], changes: &Changes) -> bool {
    if changes.unknown || changes.advice_unknown {
        return false;
    }
    // Under mlockall(MCL_FUTURE) a new mapping is locked without a flag
    // the log shows: with anything locked, new mappings are read.
    let locking = prev.iter().any(|p| p.flags & MAP_LOCKED != 0);
    for m in entries.iter_mut() {
        if changes
            .advice
            .iter()
            .any(|&(s, e)| s < m.end && m.start < e)
        {
            return false;
        }
        // Made by mmap since (mremap, which keeps the settings, is logged
        // as a change): nothing set, or MAP_LOCKED/MAP_DROPPABLE, logged.
        if changes.layout_touched(m.start, m.end) {
            if locking {
                return false;
            }
            m.advice = 0;
            continue;
        }
        // Untouched: one of the previous mappings, or a piece of one (split
        // by mprotect), or several merged; all must agree.
        let mut over = prev.iter().filter(|p| p.start < m.end && m.start < p.end);
        let Some(first) = over.next() else {
            return false;
        };
        let bits = first.flags & ADVICE;
        if over.any(|p| p.flags & ADVICE != bits) {
            return false;
        }
        m.advice = bits;
    }
    true
}

/// Sets the flags of `m` again on the rebuilt mapping (after its pages
/// are in: locking faults them in, and a mapping's own settings must not
/// change how it was filled).
pub fn restore(sys: &dyn Sys, m: &MappingInfo) -> Result<(), RestoreError> {
    let len = m.end - m.start;
    for &(_, flag, advice) in FLAGS {
        if let Some(advice) = advice.filter(|_| m.flags & flag != 0) {
            sys.call(
                "madvise",
                libc::SYS_madvise,
                [m.start, len, advice, 0, 0, 0],
            )?;
        }
    }
    if m.flags & MAP_LOCKED != 0 {
        let onfault = if m.flags & MAP_LOCKONFAULT != 0 {
            MLOCK_ONFAULT
        } else {
            0
        };
        sys.call("mlock2", libc::SYS_mlock2, [m.start, len, onfault, 0, 0, 0])?;
    }
    Ok(())
}

/// Installs the guard regions of `m` again (`MADV_GUARD_INSTALL`), once
/// its pages are in: a guard region has none.
pub fn install_guards(sys: &dyn Sys, m: &MappingInfo) -> Result<(), RestoreError> {
    for &(addr, pages) in &m.guards {
        sys.call(
            "madvise(MADV_GUARD_INSTALL)",
            libc::SYS_madvise,
            [
                addr,
                pages * 4096,
                crate::proc::guards::MADV_GUARD_INSTALL,
                0,
                0,
                0,
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;
    use cr_ebpf_image::MAP_INHERITS;

    fn entry(start: u64, end: u64) -> MapEntry {
        MapEntry {
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
        }
    }

    #[test]
    fn vm_flags_become_image_flags() {
        let (b, sl) = parse_vm_flags(" rd wr mr mw me ac dc dd hg wf lo sd", false);
        assert_eq!(
            b,
            MAP_DONTFORK | MAP_DONTDUMP | MAP_HUGEPAGE | MAP_WIPEONFORK | MAP_LOCKED
        );
        assert!(!sl);
        let (b, sl) = parse_vm_flags(" rd sh mr mw me ms sd sl", true);
        assert_eq!(b, MAP_MAYWRITE, "shared, opened for writing, read-only now");
        assert!(sl);
        let (b, _) = parse_vm_flags(" rd wr sh mr mw me ms sd", true);
        assert_eq!(b, 0, "writable already: nothing to remember");
    }

    #[test]
    fn this_process_reads_its_own_advice() {
        let len = 4 * 4096;
        // SAFETY: a fresh anonymous mapping, advised and unmapped here.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        // SAFETY: the mapping above.
        assert_eq!(unsafe { libc::madvise(at, len, libc::MADV_DONTFORK) }, 0);
        let me = std::process::id() as i32;
        let text = std::fs::read_to_string(format!("/proc/{me}/maps")).unwrap();
        let mut entries = crate::proc::parse_maps(&text).unwrap();
        read(me, &mut entries).unwrap();
        let m = entries.iter().find(|m| m.start == at as u64).unwrap();
        assert_eq!(m.advice & MAP_DONTFORK, MAP_DONTFORK);
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(at, len) };
    }

    #[test]
    fn flags_are_carried_over_unless_the_log_shows_a_change() {
        let prev = [MappingInfo {
            start: 0x1000,
            end: 0x9000,
            flags: MAP_DONTFORK | MAP_INHERITS,
            ..MappingInfo::default()
        }];
        // Split in two by an mprotect, and a new mapping.
        let mut entries = vec![
            entry(0x1000, 0x3000),
            entry(0x3000, 0x9000),
            entry(0xa000, 0xb000),
        ];
        let mut mapped = Changes::none();
        mapped.layout.push((0xa000, 0xb000));
        assert!(inherit(&mut entries, &prev, &mapped));
        let got: Vec<u32> = entries.iter().map(|m| m.advice).collect();
        assert_eq!(got, [MAP_DONTFORK, MAP_DONTFORK, 0]);
        // A mapping the log does not explain: read.
        assert!(!inherit(&mut entries, &prev, &Changes::none()));
        // Mapped over part of an advised one: that part is new.
        let mut over = vec![entry(0x1000, 0x3000), entry(0x3000, 0x9000)];
        let mut c = Changes::none();
        c.layout.push((0x1000, 0x3000));
        assert!(inherit(&mut over, &prev, &c));
        assert_eq!(over[0].advice, 0);
        assert_eq!(over[1].advice, MAP_DONTFORK);
        // With memory locked, a new mapping may be locked too (mlockall).
        let locked = [MappingInfo {
            flags: MAP_LOCKED,
            ..prev[0].clone()
        }];
        let mut fresh = vec![entry(0xa000, 0xb000)];
        assert!(!inherit(&mut fresh, &locked, &mapped));
        let mut c = Changes::none();
        c.advice.push((0xa000, 0xa001));
        assert!(!inherit(&mut entries, &prev, &c), "advised since");
        let mut c = Changes::none();
        c.advice_unknown = true;
        assert!(!inherit(&mut entries, &prev, &c), "mlockall since");
        assert!(!inherit(&mut entries, &prev, &Changes::all()));
        // Merged from two with different flags: read again.
        let two = [
            prev[0].clone(),
            MappingInfo {
                start: 0x9000,
                end: 0xa000,
                ..MappingInfo::default()
            },
        ];
        let mut merged = vec![entry(0x1000, 0xa000)];
        assert!(!inherit(&mut merged, &two, &Changes::none()));
    }

    #[test]
    fn each_flag_is_set_again_and_locking_goes_last() {
        let m = MappingInfo {
            start: 0x7000,
            end: 0x9000,
            flags: MAP_DONTFORK | MAP_WIPEONFORK | MAP_LOCKED | MAP_LOCKONFAULT,
            ..MappingInfo::default()
        };
        let rec = Recording::new();
        restore(&rec, &m).unwrap();
        assert_eq!(rec.names(), ["madvise", "madvise", "mlock2"]);
        let calls = rec.calls("madvise");
        assert_eq!(calls[0][..3], [0x7000, 0x2000, libc::MADV_DONTFORK as u64]);
        assert_eq!(calls[1][2], libc::MADV_WIPEONFORK as u64);
        assert_eq!(rec.calls("mlock2")[0][2], MLOCK_ONFAULT);
    }

    #[test]
    fn guard_regions_are_installed_again() {
        let m = MappingInfo {
            start: 0x10000,
            end: 0x20000,
            guards: vec![(0x11000, 1), (0x14000, 3)],
            ..MappingInfo::default()
        };
        let rec = Recording::new();
        install_guards(&rec, &m).unwrap();
        let calls = rec.calls("madvise(MADV_GUARD_INSTALL)");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1][..3], [0x14000, 3 * 4096, 102]);
    }
}
