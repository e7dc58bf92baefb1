//! Shared memory objects: shared anonymous memory, memfds, System V
//! segments and files on tmpfs mapped shared (`shm_open`). Their contents
//! are read through `/proc/PID/map_files` (or the memfd's descriptor),
//! skipping holes, and stored whole in the manifest at every checkpoint: a
//! tmpfs file is memory that a reboot loses and that the process goes on
//! changing after the checkpoint, not a file on disk to reuse.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
};

use cr_ebpf_image::{FdInfo, FdState, MappingKind, ShmemKind, ShmemObject, SHMEM_CAP};

use crate::{maps::MapEntry, state::proc_err, DumpError};

/// The data runs of `f` within `0..size`: `SEEK_DATA`/`SEEK_HOLE`.
fn read_runs(f: &File, size: u64) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
    use std::os::unix::fs::FileExt as _;
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        let mut buf = vec![0u8; (end - data as u64) as usize];
        f.read_exact_at(&mut buf, data as u64)?;
        out.push((data as u64, buf));
        at = end;
    }
    Ok(out)
}

/// key and permission bits of System V segment `shmid` (`/proc/sysvipc/shm`).
fn sysv(pid: i32, shmid: u64) -> Result<(i32, u32), DumpError> {
    let path = "/proc/sysvipc/shm";
    let text = std::fs::read_to_string(path).map_err(proc_err(pid, path.into()))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1).and_then(|v| v.parse::<u64>().ok()) == Some(shmid) {
            let key = f[0].parse::<i64>().unwrap_or(0) as i32;
            let mode = u32::from_str_radix(f.get(2).unwrap_or(&"0"), 8).unwrap_or(0);
            // SHM_DEST: removed, alive only while attached.
            if mode & 0o1000 != 0 {
                return Err(DumpError::NotSupported {
                    pid,
                    what: format!("System V shared memory segment {shmid} marked for removal"),
                });
            }
            return Ok((key, mode & 0o777));
        }
    }
    Err(DumpError::NotSupported {
        pid,
        what: format!("System V shared memory segment {shmid} not in {path}"),
    })
}

/// Object `path` of process `pid`; its contents only if `with_data` (else
/// they are in another process's image of the same tree checkpoint).
fn object(
    pid: i32,
    path: &str,
    kind: ShmemKind,
    name: &str,
    with_data: bool,
) -> Result<ShmemObject, DumpError> {
    let f = File::open(path).map_err(proc_err(pid, path.to_string()))?;
    let meta = f.metadata().map_err(proc_err(pid, path.to_string()))?;
    if meta.size() > SHMEM_CAP {
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "a shared memory object of {} MiB ({path}; at most {} MiB)",
                meta.size() >> 20,
                SHMEM_CAP >> 20
            ),
        });
    }
    // Only a memfd's seals mean anything (other shared memory reports
    // F_SEAL_SEAL).
    let seals = match kind {
        ShmemKind::Memfd => {
            // SAFETY: fcntl query on our descriptor.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
            r.max(0) as u32
        }
        _ => 0,
    };
    let (key, mode) = match kind {
        ShmemKind::SysV => sysv(pid, meta.ino())?,
        ShmemKind::TmpfsFile => (0, meta.mode() & 0o7777),
        _ => (0, 0),
    };
    Ok(ShmemObject {
        id: meta.ino(),
        kind,
        name: name.to_string(),
        size: meta.size(),
        seals,
        key,
        mode,
        data: if with_data {
            read_runs(&f, meta.size()).map_err(proc_err(pid, path.to_string()))?
        } else {
            Vec::new()
        },
        elsewhere: !with_data,
    })
}

/// `memfd:NAME (deleted)` -> `NAME`.
pub(crate) fn memfd_name(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:")
        .map(|n| n.strip_suffix(" (deleted)").unwrap_or(n))
}

/// Every shared memory object the process's mappings and descriptors refer
/// to. In a tree, `taken` holds the objects an earlier process of the same
/// checkpoint stored: their contents are not read or stored again.
pub(crate) fn capture(
    pid: i32,
    entries: &[MapEntry],
    fds: &[FdInfo],
    mut taken: Option<&mut HashSet<u64>>,
) -> Result<Vec<ShmemObject>, DumpError> {
    let mut out: BTreeMap<u64, ShmemObject> = BTreeMap::new();
    // Whether this process stores the contents of `id` (and claims it).
    let mut first = |id: u64| taken.as_deref_mut().is_none_or(|t| t.insert(id));
    for m in entries.iter().filter(|m| m.kind() == MappingKind::Shmem) {
        if out.contains_key(&m.inode) {
            continue;
        }
        let (kind, name) = match memfd_name(&m.path) {
            Some(n) => (ShmemKind::Memfd, n),
            None if m.tmpfs => (ShmemKind::TmpfsFile, m.path.as_str()),
            None if m.path.starts_with("/SYSV") => (ShmemKind::SysV, ""),
            None => (ShmemKind::Anonymous, ""),
        };
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        let with_data = first(m.inode);
        out.insert(m.inode, object(pid, &path, kind, name, with_data)?);
    }
    for f in fds {
        if let FdState::Memfd { id } = f.state {
            if out.contains_key(&id) {
                continue;
            }
            let name = memfd_name(&f.path).unwrap_or("");
            let path = format!("/proc/{pid}/fd/{}", f.fd);
            let with_data = first(id);
            out.insert(id, object(pid, &path, ShmemKind::Memfd, name, with_data)?);
        }
    }
    Ok(out.into_values().collect())
}
