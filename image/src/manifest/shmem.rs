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
    /// Contents: (offset, bytes) runs; holes are zero.
    pub data: Vec<(u64, Vec<u8>)>,
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
        b.u16(if self.elsewhere { SHMEM_ELSEWHERE } else { 0 });
        b.u32(self.seals);
        b.i32(self.key);
        b.u32(self.mode);
        b.str(&self.name);
        b.u64(self.size);
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
        if flags & !SHMEM_ELSEWHERE != 0 {
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
        let n = b.u32()? as usize;
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
        let mut d = Dec::new(buf, 0);
        let o = ShmemObject::decode(&mut d, 8)?;
        assert!(d.done());
        Ok(o)
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
        let e = decoded(&encoded(&big)).unwrap_err();
        assert!(e.what.contains("at most"), "{}", e.what);
        // Format 1.9: only the contents are bounded, not the size.
        let buf = encoded(&big);
        let mut d = Dec::new(&buf, 0);
        assert_eq!(ShmemObject::decode(&mut d, 9).unwrap(), big);
        let mut bad = encoded(&memfd());
        bad[8] = 9;
        let e = decoded(&bad).unwrap_err();
        assert!(
            e.what.contains("unknown shared memory kind 9"),
            "{}",
            e.what
        );
        let mut bad = encoded(&memfd());
        bad[10] = 2;
        let e = decoded(&bad).unwrap_err();
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
        assert!(decoded(&buf).is_err(), "not in 1.8");
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
}
