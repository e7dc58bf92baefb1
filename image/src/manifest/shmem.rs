//! Section SHMEM (format 1.2; one per shared memory object, ids unique).

use super::{unknown, NAME_CAP, PATH_CAP};
use crate::codec::{Dec, DecErr, Enc};

/// Largest shared memory object before format 1.9, and the largest run of
/// contents stored in one piece (the contents are in the manifest).
pub const SHMEM_CAP: u64 = 64 << 20;
/// First minor whose objects may be larger than [`SHMEM_CAP`] (only their
/// stored contents are bounded: holes are not stored).
const UNCAPPED_SINCE: u16 = 9;
/// Most bytes of contents stored for one deleted file (its size may be
/// larger: holes are not stored).
pub const GHOST_CAP: u64 = 1 << 30;
/// SHMEM flag (format 1.3): the contents are in another process image of
/// the tree.
const SHMEM_ELSEWHERE: u16 = 1;
/// SHMEM flag (format 1.11): the object's pages not stored in this image's
/// page store are those of the parent image's object with the same `base`.
const SHMEM_INHERITS: u16 = 2;
/// First minor whose objects may keep their contents in the page store.
const PAGED_SINCE: u16 = 11;
/// Where the page store's pseudo addresses for shared memory contents
/// begin (format 1.11): above every user address (57 bits with 5-level
/// paging) and below the kernel's half, where the vsyscall page is, so
/// that they never meet a mapping. Byte `o` of an object with `base` is
/// stored at `base + o`.
pub const SHMEM_PAGES: u64 = 1 << 62;
/// Where they end.
pub const SHMEM_PAGES_END: u64 = 1 << 63;
/// Address space each object has in the page store: objects are at most
/// this large when their contents are there.
pub const SHMEM_SLOT: u64 = 1 << 40;

/// What kind of shared memory object.
#[repr(u16)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShmemKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, `/dev/zero (deleted)`).
    Anonymous = 1,
    /// A memfd (`memfd_create`), with its name and seals.
    Memfd = 2,
    /// A System V segment (`shmget`): `id` is its shmid.
    SysV = 3,
    /// A file on tmpfs mapped shared (`shm_open`, `/dev/shm`; format 1.3):
    /// `name` is its path, `mode` its permission bits. Its contents are the
    /// process's memory as much as its other shared memory: stored, and
    /// written back into the file at restore.
    TmpfsFile = 4,
    /// A file or directory removed from its directory while the process
    /// held it open or mapped (format 1.8): `name` is the path it had,
    /// `mode` its whole `st_mode` (a regular file or a directory; format
    /// 1.9 also a symbolic link, whose contents are its target), and
    /// owner and times follow. Made again at that path at restore, opened,
    /// and removed.
    DeletedFile = 5,
}

impl TryFrom<u16> for ShmemKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Anonymous,
            2 => Self::Memfd,
            3 => Self::SysV,
            4 => Self::TmpfsFile,
            5 => Self::DeletedFile,
            other => return Err(other),
        })
    }
}

/// A shared memory object without a file to reopen, with its contents
/// (format 1.2, section SHMEM). Mappings of kind
/// [`MappingKind::Shmem`](super::MappingKind::Shmem) and memfd descriptors
/// refer to it by `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShmemObject {
    /// Its inode at checkpoint time: the id mappings and descriptors use.
    pub id: u64,
    /// What it is.
    pub kind: ShmemKind,
    /// A memfd's name (without `memfd:`), a tmpfs file's path.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `F_SEAL_*` of a memfd.
    pub seals: u32,
    /// A System V segment's key.
    pub key: i32,
    /// A System V segment's or a tmpfs file's permission bits.
    pub mode: u32,
    /// Contents: (offset, bytes) runs; holes are zero. Empty in an image
    /// when they are in the page store (`base`), and filled from there by
    /// [`crate::Chain::load_shmem`].
    pub data: Vec<(u64, Vec<u8>)>,
    /// Format 1.11: where the contents are in the page store (page `o` of
    /// the object at pseudo address `base + o`, see [`SHMEM_PAGES`]); 0
    /// when they are in `data`.
    pub base: u64,
    /// Format 1.11: pages of the object this image does not store come
    /// from the parent image's object with the same `base` (an incremental
    /// checkpoint stores only the pages whose contents changed).
    pub inherits: bool,
    /// The contents are in the image of another process of the same tree
    /// checkpoint (format 1.3): each object is stored once per tree.
    pub elsewhere: bool,
    /// A deleted file's owner (format 1.8).
    pub uid: u32,
    /// A deleted file's group.
    pub gid: u32,
    /// A deleted file's access time, nanoseconds since the epoch.
    pub atime_ns: u64,
    /// A deleted file's modification time, nanoseconds since the epoch.
    pub mtime_ns: u64,
    /// Another link the deleted file still has (its path), through which
    /// it is found again at restore (no contents stored); empty: none.
    pub link: String,
}

impl ShmemObject {
    /// The SHMEM section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u64(self.id);
        b.u16(self.kind as u16);
        let mut flags = if self.elsewhere { SHMEM_ELSEWHERE } else { 0 };
        if self.inherits {
            flags |= SHMEM_INHERITS;
        }
        b.u16(flags);
        b.u32(self.seals);
        b.i32(self.key);
        b.u32(self.mode);
        b.str(&self.name);
        b.u64(self.size);
        if self.kind != ShmemKind::DeletedFile {
            b.u64(self.base);
        }
        b.u32(self.data.len() as u32);
        for (off, bytes) in &self.data {
            b.u64(*off);
            b.bytes(bytes);
        }
        if self.kind == ShmemKind::DeletedFile {
            b.u32(self.uid);
            b.u32(self.gid);
            b.u64(self.atime_ns);
            b.u64(self.mtime_ns);
            b.str(&self.link);
        }
    }

    /// Reads a SHMEM section's body in an image of format 1.`minor`:
    /// contents within the size, none for an object stored elsewhere.
    pub(super) fn decode(b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        let id = b.u64()?;
        let kind_at = b.offset();
        let raw = b.u16()?;
        let kind = ShmemKind::try_from(raw)
            .ok()
            .filter(|k| *k != ShmemKind::DeletedFile || minor >= 8)
            .ok_or_else(|| DecErr {
                offset: kind_at,
                what: unknown("shared memory kind", raw, minor),
            })?;
        let flags_at = b.offset();
        let flags = b.u16()?;
        let known = if minor >= PAGED_SINCE {
            SHMEM_ELSEWHERE | SHMEM_INHERITS
        } else {
            SHMEM_ELSEWHERE
        };
        if flags & !known != 0 {
            return Err(DecErr {
                offset: flags_at,
                what: unknown("shared memory flags", format!("{flags:#x}"), minor),
            });
        }
        let elsewhere = flags & SHMEM_ELSEWHERE != 0;
        let seals = b.u32()?;
        let key = b.i32()?;
        let mode = b.u32()?;
        let ghost = kind == ShmemKind::DeletedFile;
        let name = match kind {
            ShmemKind::TmpfsFile | ShmemKind::DeletedFile => b.str(PATH_CAP, "file path")?,
            _ => b.str(NAME_CAP, "memfd name")?,
        };
        let size = b.u64()?;
        if size > SHMEM_CAP && !ghost && minor < UNCAPPED_SINCE {
            return Err(b.err(format!(
                "shared memory object of {size} bytes (at most {SHMEM_CAP})"
            )));
        }
        let base = if minor >= PAGED_SINCE && !ghost {
            b.u64()?
        } else {
            0
        };
        let inherits = flags & SHMEM_INHERITS != 0;
        if base != 0
            && (base < SHMEM_PAGES || base % SHMEM_SLOT != 0 || size > SHMEM_SLOT || elsewhere)
        {
            return Err(b.err(format!(
                "shared memory object {id} in the page store at {base:#x} (size {size}; bases \
                 are multiples of {SHMEM_SLOT:#x} from {SHMEM_PAGES:#x}, objects at most that \
                 large, stored once)"
            )));
        }
        if inherits && base == 0 {
            return Err(b.err(format!(
                "shared memory object {id} inherits pages but has none in the page store"
            )));
        }
        let n = b.u32()? as usize;
        if base != 0 && n != 0 {
            return Err(b.err(format!(
                "shared memory object {id} has contents both here and in the page store"
            )));
        }
        let mut data = Vec::new();
        let mut total = 0u64;
        for _ in 0..n {
            let off = b.u64()?;
            let bytes = b.bytes(SHMEM_CAP as usize, "shared memory contents")?;
            if off.checked_add(bytes.len() as u64).is_none_or(|e| e > size) {
                return Err(b.err(format!("shared memory contents past its size {size}")));
            }
            total += bytes.len() as u64;
            if total > GHOST_CAP {
                return Err(b.err(format!(
                    "more than {GHOST_CAP} bytes of contents of one object"
                )));
            }
            data.push((off, bytes.to_vec()));
        }
        if elsewhere && !data.is_empty() {
            return Err(b.err(format!(
                "shared memory object {id} stored elsewhere has contents here"
            )));
        }
        let (mut uid, mut gid, mut atime_ns, mut mtime_ns) = (0, 0, 0, 0);
        let mut link = String::new();
        if ghost {
            uid = b.u32()?;
            gid = b.u32()?;
            atime_ns = b.u64()?;
            mtime_ns = b.u64()?;
            link = b.str(PATH_CAP, "another link of a deleted file")?;
            if !link.is_empty() && !data.is_empty() {
                return Err(b.err(format!(
                    "deleted file {name:?} found through another link has contents here"
                )));
            }
            let ty = mode & libc::S_IFMT;
            let link_ok = ty == libc::S_IFLNK && minor >= UNCAPPED_SINCE;
            if ![libc::S_IFREG, libc::S_IFDIR].contains(&ty) && !link_ok {
                return Err(b.err(format!(
                    "deleted file {name:?} of mode {mode:#o} (a regular file or a directory; \
                     format 1.9 also a symbolic link)"
                )));
            }
            let whole = data.len() == 1 && data[0].0 == 0 && data[0].1.len() as u64 == size;
            if link_ok && !elsewhere && !whole {
                return Err(b.err(format!(
                    "deleted symbolic link {name:?} without its target as its contents"
                )));
            }
        }
        Ok(Self {
            id,
            kind,
            name,
            size,
            seals,
            key,
            mode,
            data,
            base,
            inherits,
            elsewhere,
            uid,
            gid,
            atime_ns,
            mtime_ns,
            link,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(o: &ShmemObject) -> Vec<u8> {
        let mut e = Enc::default();
        o.encode(&mut e);
        e.buf
    }

    fn decoded(buf: &[u8]) -> Result<ShmemObject, DecErr> {
        decoded_at(buf, crate::FORMAT_MINOR)
    }

    fn decoded_at(buf: &[u8], minor: u16) -> Result<ShmemObject, DecErr> {
        let mut d = Dec::new(buf, 0);
        let o = ShmemObject::decode(&mut d, minor)?;
        assert!(d.done());
        Ok(o)
    }

    /// `o` as a writer of format 1.10 or older wrote it (no base).
    fn encoded_old(o: &ShmemObject) -> Vec<u8> {
        let mut b = encoded(o);
        if o.kind != ShmemKind::DeletedFile {
            // id, kind, flags, seals, key, mode, name (length first), size.
            let at = 8 + 2 + 2 + 4 + 4 + 4 + 4 + o.name.len() + 8;
            b.drain(at..at + 8);
        }
        b
    }

    fn memfd() -> ShmemObject {
        ShmemObject {
            id: 1032,
            kind: ShmemKind::Memfd,
            name: "buf".into(),
            size: 8192,
            seals: 0x6,
            key: 0,
            mode: 0,
            data: vec![(0, b"hello".to_vec()), (4096, b"world".to_vec())],
            elsewhere: false,
            ..ShmemObject::default()
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let objects = [
            memfd(),
            ShmemObject {
                kind: ShmemKind::Anonymous,
                name: String::new(),
                ..memfd()
            },
            ShmemObject {
                kind: ShmemKind::SysV,
                key: 0x1234,
                mode: 0o600,
                ..memfd()
            },
            ShmemObject {
                kind: ShmemKind::TmpfsFile,
                name: format!("/dev/shm/{}", "x".repeat(300)),
                mode: 0o640,
                ..memfd()
            },
            ShmemObject {
                data: Vec::new(),
                elsewhere: true,
                ..memfd()
            },
            ShmemObject {
                kind: ShmemKind::DeletedFile,
                name: "/srv/data/log".into(),
                size: 3 << 30,
                mode: 0o100640,
                uid: 1000,
                gid: 100,
                atime_ns: 1,
                mtime_ns: 2,
                ..memfd()
            },
            ShmemObject {
                kind: ShmemKind::DeletedFile,
                name: "/srv/data/old".into(),
                mode: 0o100644,
                link: "/srv/data/old.link".into(),
                data: Vec::new(),
                ..memfd()
            },
        ];
        for o in &objects {
            assert_eq!(&decoded(&encoded(o)).unwrap(), o);
        }
    }

    #[test]
    fn damaged_objects_are_refused() {
        let past = ShmemObject {
            data: vec![(8190, b"abc".to_vec())],
            ..memfd()
        };
        let e = decoded(&encoded(&past)).unwrap_err();
        assert!(e.what.contains("past its size 8192"), "{}", e.what);
        let big = ShmemObject {
            size: SHMEM_CAP + 8192,
            data: vec![(SHMEM_CAP - 4096, vec![7; 8192])],
            ..memfd()
        };
        let e = decoded_at(&encoded_old(&big), 8).unwrap_err();
        assert!(e.what.contains("at most"), "{}", e.what);
        // Format 1.9: only the contents are bounded, not the size.
        assert_eq!(decoded_at(&encoded_old(&big), 9).unwrap(), big);
        assert_eq!(decoded_at(&encoded_old(&memfd()), 10).unwrap(), memfd());
        let mut bad = encoded(&memfd());
        bad[8] = 9;
        let e = decoded(&bad).unwrap_err();
        assert!(
            e.what.contains("unknown shared memory kind 9"),
            "{}",
            e.what
        );
        let mut bad = encoded(&memfd());
        bad[10] = 4;
        let e = decoded(&bad).unwrap_err();
        assert!(
            e.what.contains("unknown shared memory flags 0x4"),
            "{}",
            e.what
        );
        // Inheriting pages is format 1.11.
        let mut bad = encoded_old(&memfd());
        bad[10] = 2;
        let e = decoded_at(&bad, 10).unwrap_err();
        assert!(
            e.what.contains("unknown shared memory flags 0x2"),
            "{}",
            e.what
        );
        // A deleted file is a regular file or a directory, and only in 1.8.
        let fifo = ShmemObject {
            kind: ShmemKind::DeletedFile,
            mode: 0o010644,
            ..memfd()
        };
        let e = decoded(&encoded(&fifo)).unwrap_err();
        assert!(e.what.contains("regular file or a directory"), "{}", e.what);
        // Format 1.9: a symbolic link, its target as its contents.
        let link = ShmemObject {
            mode: 0o120777,
            size: 6,
            data: vec![(0, b"target".to_vec())],
            ..fifo.clone()
        };
        let buf = encoded(&link);
        assert!(decoded_at(&buf, 8).is_err(), "not in 1.8");
        assert_eq!(
            ShmemObject::decode(&mut Dec::new(&buf, 0), 9).unwrap(),
            link
        );
        let empty = ShmemObject {
            data: Vec::new(),
            ..link
        };
        assert!(ShmemObject::decode(&mut Dec::new(&encoded(&empty), 0), 9).is_err());
        let file = ShmemObject {
            mode: 0o100644,
            ..fifo
        };
        let buf = encoded(&file);
        let mut d = Dec::new(&buf, 0);
        let e = ShmemObject::decode(&mut d, 7).unwrap_err();
        assert!(
            e.what.contains("unknown shared memory kind 5"),
            "{}",
            e.what
        );
        // A memfd name is at most 255 bytes.
        let long = ShmemObject {
            name: "x".repeat(256),
            ..memfd()
        };
        assert!(decoded(&encoded(&long)).is_err());
    }

    #[test]
    fn contents_in_the_page_store_are_checked() {
        let paged = ShmemObject {
            data: Vec::new(),
            base: SHMEM_PAGES + 3 * SHMEM_SLOT,
            inherits: true,
            ..memfd()
        };
        assert_eq!(decoded(&encoded(&paged)).unwrap(), paged);
        for (bad, why) in [
            (
                ShmemObject {
                    base: 0x7fff_0000_0000,
                    ..paged.clone()
                },
                "bases are multiples",
            ),
            (
                ShmemObject {
                    base: SHMEM_PAGES + 4096,
                    ..paged.clone()
                },
                "bases are multiples",
            ),
            (
                ShmemObject {
                    size: SHMEM_SLOT + 1,
                    ..paged.clone()
                },
                "at most that",
            ),
            (
                ShmemObject {
                    base: 0,
                    ..paged.clone()
                },
                "inherits pages but",
            ),
            (
                ShmemObject {
                    data: vec![(0, b"x".to_vec())],
                    ..paged.clone()
                },
                "both here and in the page store",
            ),
        ] {
            let e = decoded(&encoded(&bad)).unwrap_err();
            assert!(e.what.contains(why), "{why}: {}", e.what);
        }
    }
}
