//! Section MAPPING (one per memory mapping, by increasing address, no overlap).

use super::{unknown, PATH_CAP};
use crate::codec::{Dec, DecErr, Enc};

/// `MappingInfo::flags`: `MAP_SHARED` (otherwise private).
pub const MAP_SHARED: u32 = 1;
/// `MappingInfo::flags`: a stack that grows down.
pub const MAP_GROWSDOWN: u32 = 2;
/// Mapping flag (format 1.1): pages of this mapping not stored in this
/// image live in the parent image's mapping with the same range.
pub const MAP_INHERITS: u32 = 4;

/// Mapping flags of format 1.7: the mapping's own settings, made with
/// `madvise`, `mlock` or `mmap` flags, restored on it (the kernel's
/// `VmFlags` of `/proc/PID/smaps`). `MADV_SEQUENTIAL`.
pub const MAP_SEQUENTIAL: u32 = 1 << 3;
/// `MADV_RANDOM`.
pub const MAP_RANDOM: u32 = 1 << 4;
/// `MADV_DONTFORK`: not inherited by children.
pub const MAP_DONTFORK: u32 = 1 << 5;
/// `MADV_DONTDUMP`: left out of core dumps.
pub const MAP_DONTDUMP: u32 = 1 << 6;
/// `MADV_HUGEPAGE`.
pub const MAP_HUGEPAGE: u32 = 1 << 7;
/// `MADV_NOHUGEPAGE`.
pub const MAP_NOHUGEPAGE: u32 = 1 << 8;
/// `MADV_MERGEABLE` (KSM).
pub const MAP_MERGEABLE: u32 = 1 << 9;
/// `MADV_WIPEONFORK`: a child gets it zeroed.
pub const MAP_WIPEONFORK: u32 = 1 << 10;
/// Locked in memory (`mlock`, `MAP_LOCKED`).
pub const MAP_LOCKED: u32 = 1 << 11;
/// Locked as pages fault in (`MLOCK_ONFAULT`); with [`MAP_LOCKED`].
pub const MAP_LOCKONFAULT: u32 = 1 << 12;
/// `MAP_DROPPABLE`: the kernel may drop its pages (to zero) at any time;
/// no page of it is stored.
pub const MAP_DROPPABLE: u32 = 1 << 13;
/// A shared file mapping whose file was opened for writing although the
/// mapping is not writable now (`mprotect` may make it writable).
pub const MAP_MAYWRITE: u32 = 1 << 14;
/// `MAP_NORESERVE`: no swap space reserved for it.
pub const MAP_NORESERVE: u32 = 1 << 15;
/// Every flag bit a reader of this version knows.
pub const MAP_KNOWN: u32 = (1 << 16) - 1;

/// What a mapping is. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MappingKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// Anonymous memory.
    Anon = 1,
    /// Backed by a file (`path`).
    File = 2,
    /// `[heap]`.
    Heap = 3,
    /// `[stack]`.
    Stack = 4,
    /// `[vdso]`: kernel-provided code, moved to its address at restore.
    Vdso = 5,
    /// `[vvar]`, `[vvar_vclock]`: kernel data pages of the vDSO.
    Vvar = 6,
    /// `[vsyscall]`: fixed by the kernel, nothing to restore.
    Vsyscall = 7,
    /// Format 1.2: a shared memory object with no file to reopen (shared
    /// anonymous memory, a memfd); `inode` names it in [`Manifest::shmem`](super::Manifest::shmem).
    Shmem = 8,
}

impl TryFrom<u16> for MappingKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Anon,
            2 => Self::File,
            3 => Self::Heap,
            4 => Self::Stack,
            5 => Self::Vdso,
            6 => Self::Vvar,
            7 => Self::Vsyscall,
            8 => Self::Shmem,
            other => return Err(other),
        })
    }
}

/// One memory mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingInfo {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_SHARED`, `MAP_GROWSDOWN` of this module.
    pub flags: u32,
    /// File offset.
    pub offset: u64,
    /// Kind.
    pub kind: MappingKind,
    /// File path, or the kernel's name (`[vvar]`) for special mappings.
    pub path: String,
    /// Device of the file (`major << 32 | minor`).
    pub dev: u64,
    /// Inode of the file.
    pub inode: u64,
    /// Pages of this mapping stored in the page store.
    pub pages_stored: u64,
    /// Format 1.9: guard regions (`MADV_GUARD_INSTALL`) in it, as
    /// (first address, pages), by address, installed again at restore.
    pub guards: Vec<(u64, u64)>,
}

/// First minor whose MAPPING ends with the guard regions.
const GUARDS_SINCE: u16 = 9;

/// Guard regions of the mapping `start..end`: inside it, page-aligned, by
/// address, not overlapping, none empty.
fn decode_guards(b: &mut Dec<'_>, start: u64, end: u64) -> Result<Vec<(u64, u64)>, DecErr> {
    let n = b.u32()? as u64;
    if n > (end - start) / 4096 {
        return Err(b.err(format!(
            "{n} guard regions in a mapping of {:#x} bytes",
            end - start
        )));
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(b.room_for(n as usize, 16));
    for _ in 0..n {
        let (addr, pages) = (b.u64()?, b.u64()?);
        let after = out.last().map_or(start, |&(a, p)| a + p * 4096);
        let fits = addr % 4096 == 0
            && pages > 0
            && addr >= after
            && pages
                .checked_mul(4096)
                .and_then(|l| l.checked_add(addr))
                .is_some_and(|e| e <= end);
        if !fits {
            return Err(b.err(format!(
                "guard region {addr:#x} of {pages} pages out of place in {start:#x}-{end:#x}"
            )));
        }
        out.push((addr, pages));
    }
    Ok(out)
}

impl MappingInfo {
    /// The MAPPING section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u64(self.start);
        b.u64(self.end);
        b.u32(self.prot);
        b.u32(self.flags);
        b.u64(self.offset);
        b.u16(self.kind as u16);
        b.str(&self.path);
        b.u64(self.dev);
        b.u64(self.inode);
        b.u64(self.pages_stored);
        b.u32(self.guards.len() as u32);
        for &(addr, pages) in &self.guards {
            b.u64(addr);
            b.u64(pages);
        }
    }

    /// Reads a MAPPING section's body, which starts at `at`, of an image of
    /// format 1.`minor`; the range must be page-aligned and not empty.
    pub(super) fn decode(b: &mut Dec<'_>, at: u64, minor: u16) -> Result<Self, DecErr> {
        let start = b.u64()?;
        let end = b.u64()?;
        // Checked first: the guard regions are read against it.
        if start >= end || !start.is_multiple_of(4096) || !end.is_multiple_of(4096) {
            return Err(DecErr {
                offset: at,
                what: format!("bad mapping range {start:#x}-{end:#x}"),
            });
        }
        let prot = b.u32()?;
        let flags = b.u32()?;
        let offset = b.u64()?;
        let kind_at = b.offset();
        let kind = MappingKind::try_from(b.u16()?).map_err(|k| DecErr {
            offset: kind_at,
            what: unknown("mapping kind", k, minor),
        })?;
        let m = Self {
            start,
            end,
            prot,
            flags,
            offset,
            kind,
            path: b.str(PATH_CAP, "mapping path")?,
            dev: b.u64()?,
            inode: b.u64()?,
            pages_stored: b.u64()?,
            guards: Vec::new(),
        };
        let mut m = m;
        if minor >= GUARDS_SINCE {
            m.guards = decode_guards(b, m.start, m.end)?;
        }
        let known = if minor >= 7 {
            MAP_KNOWN
        } else {
            MAP_SHARED | MAP_GROWSDOWN | MAP_INHERITS
        };
        if m.flags & !known != 0 {
            return Err(DecErr {
                offset: at,
                what: format!(
                    "unknown mapping flags {:#x} at {:#x} (format 1.{minor})",
                    m.flags & !known,
                    m.start
                ),
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As format 1.8 wrote it (no guard regions; these tests decode it as
    /// older minors).
    fn encoded(m: &MappingInfo) -> Vec<u8> {
        assert!(m.guards.is_empty());
        let mut e = Enc::default();
        m.encode(&mut e);
        e.buf.truncate(e.buf.len() - 4);
        e.buf
    }

    #[test]
    fn guard_regions_round_trip_from_format_1_9_and_must_fit() {
        let m = MappingInfo {
            start: 0x7000,
            end: 0xf000,
            kind: MappingKind::Anon,
            guards: vec![(0x8000, 1), (0xa000, 2)],
            ..MappingInfo::default()
        };
        let mut e = Enc::default();
        m.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(MappingInfo::decode(&mut d, 0, 9).unwrap(), m);
        assert!(d.done());
        for bad in [
            vec![(0x8000, 1), (0x8000, 1)],
            vec![(0x6000, 1)],
            vec![(0xe000, 2)],
            vec![(0x8001, 1)],
            vec![(0x8000, 0)],
            vec![(0x8000, u64::MAX)],
        ] {
            let mut e = Enc::default();
            MappingInfo {
                guards: bad.clone(),
                ..m.clone()
            }
            .encode(&mut e);
            assert!(
                MappingInfo::decode(&mut Dec::new(&e.buf, 0), 0, 9).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn settings_flags_are_known_from_format_1_7_only() {
        let m = MappingInfo {
            start: 0x7000,
            end: 0x9000,
            flags: MAP_DONTFORK | MAP_LOCKED | MAP_MAYWRITE,
            kind: MappingKind::Anon,
            ..MappingInfo::default()
        };
        let buf = encoded(&m);
        assert_eq!(
            MappingInfo::decode(&mut Dec::new(&buf, 0), 0, 7).unwrap(),
            m
        );
        let e = MappingInfo::decode(&mut Dec::new(&buf, 0), 0, 6).unwrap_err();
        assert!(e.what.contains("unknown mapping flags"), "{}", e.what);
        let bad = MappingInfo {
            flags: 1 << 20,
            ..m
        };
        let buf = encoded(&bad);
        assert!(MappingInfo::decode(&mut Dec::new(&buf, 0), 0, 7).is_err());
    }

    #[test]
    fn every_mapping_kind_round_trips() {
        for k in 1..=8 {
            let m = MappingInfo {
                start: 0x7000,
                end: 0x9000,
                prot: 5,
                flags: MAP_SHARED | MAP_INHERITS,
                offset: 0x2000,
                kind: MappingKind::try_from(k).unwrap(),
                path: "/usr/lib/x.so".into(),
                dev: 8 << 32 | 1,
                inode: 99,
                pages_stored: 2,
                guards: Vec::new(),
            };
            let buf = encoded(&m);
            let mut d = Dec::new(&buf, 0);
            assert_eq!(MappingInfo::decode(&mut d, 0, 4).unwrap(), m);
            assert!(d.done());
        }
    }

    #[test]
    fn a_bad_range_or_kind_is_refused() {
        let m = MappingInfo {
            start: 0x2000,
            end: 0x2000,
            kind: MappingKind::Anon,
            ..MappingInfo::default()
        };
        let e = MappingInfo::decode(&mut Dec::new(&encoded(&m), 0), 0, 4).unwrap_err();
        assert!(e.what.contains("bad mapping range"), "{}", e.what);
        let m = MappingInfo { end: 0x2800, ..m };
        let e = MappingInfo::decode(&mut Dec::new(&encoded(&m), 0), 0, 4).unwrap_err();
        assert!(e.what.contains("bad mapping range"), "{}", e.what);
        let m = MappingInfo {
            end: 0x3000,
            kind: MappingKind::Invalid,
            ..m
        };
        let e = MappingInfo::decode(&mut Dec::new(&encoded(&m), 0), 0, 4).unwrap_err();
        assert!(e.what.contains("unknown mapping kind 0"), "{}", e.what);
    }
}
