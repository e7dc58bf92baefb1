//! Shared memory objects: shared anonymous memory, memfds, System V
//! segments and files on tmpfs mapped shared (`shm_open`).
//!
//! Saving: their contents are read through `/proc/PID/map_files` (or the
//! memfd's descriptor), skipping holes, and stored whole in the manifest at
//! every checkpoint: a tmpfs file is memory that a reboot loses and that the
//! process goes on changing after the checkpoint, not a file on disk to
//! reuse. In a tree each object is stored once.
//!
//! Restoring: each object is rebuilt in the restorer, with its contents,
//! before the process maps it: shared anonymous memory (made by a shared
//! anonymous mapping of ours, kept through `/proc/self/map_files`, so the
//! process sees `/dev/zero (deleted)` again), memfds (same name, seals
//! added back once every mapping exists), and files on tmpfs (written back
//! at their path with the checkpoint's contents: created if a reboot or
//! another machine lost them, rolled back if the process wrote on after
//! the checkpoint).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{FileExt as _, MetadataExt as _},
    },
};

use cr_ebpf_image::{FdInfo, FdState, Manifest, MappingKind, ShmemKind, ShmemObject};

use crate::{error::proc_err, ghost, proc::MapEntry, RestoreError, SaveError};

/// Default of [`Limits::shm`]: most allocated bytes of one shared memory
/// object whose contents are stored (they are read into memory while the
/// process is frozen). Raised with `--shm-limit`.
pub const DEFAULT_SHM_LIMIT: u64 = 4 << 30;

/// Most bytes of contents stored per object.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Of a deleted file held open or mapped (`--ghost-limit`).
    pub ghost: u64,
    /// Of a shared memory object (`--shm-limit`).
    pub shm: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            ghost: ghost::DEFAULT_LIMIT,
            shm: DEFAULT_SHM_LIMIT,
        }
    }
}

impl Limits {
    /// `ghost` and `shm`, 0 meaning the default of each.
    pub fn new(ghost: u64, shm: u64) -> Self {
        let d = Self::default();
        Self {
            ghost: if ghost == 0 { d.ghost } else { ghost },
            shm: if shm == 0 { d.shm } else { shm },
        }
    }
}

/// key and permission bits of System V segment `shmid` (`/proc/sysvipc/shm`).
fn sysv_key_mode(pid: i32, shmid: u64) -> Result<(i32, u32), SaveError> {
    let path = "/proc/sysvipc/shm";
    let text = std::fs::read_to_string(path).map_err(proc_err(pid, path.into()))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1).and_then(|v| v.parse::<u64>().ok()) == Some(shmid) {
            let key = f[0].parse::<i64>().unwrap_or(0) as i32;
            let mode = u32::from_str_radix(f.get(2).unwrap_or(&"0"), 8).unwrap_or(0);
            // SHM_DEST: removed, alive only while attached.
            if mode & 0o1000 != 0 {
                return Err(SaveError::NotSupported {
                    pid,
                    what: format!("System V shared memory segment {shmid} marked for removal"),
                });
            }
            return Ok((key, mode & 0o777));
        }
    }
    Err(SaveError::NotSupported {
        pid,
        what: format!("System V shared memory segment {shmid} not in {path}"),
    })
}

/// Object `path` of process `pid`, without its contents; with the file to
/// read them from only if `with_data` (else they are in another process's
/// image of the same tree checkpoint).
fn object(
    pid: i32,
    path: &str,
    kind: ShmemKind,
    name: &str,
    with_data: bool,
    limit: u64,
) -> Result<(ShmemObject, Option<File>), SaveError> {
    let f = File::open(path).map_err(proc_err(pid, path.to_string()))?;
    let meta = f.metadata().map_err(proc_err(pid, path.to_string()))?;
    let allocated = meta.blocks() * 512;
    if with_data && allocated > limit {
        return Err(SaveError::NotSupported {
            pid,
            what: format!(
                "a shared memory object with {} MiB of contents ({path}, of {} MiB; the limit \
                 is {} MiB: raise it with --shm-limit)",
                allocated >> 20,
                meta.size() >> 20,
                limit >> 20
            ),
        });
    }
    if meta.size() > cr_ebpf_image::SHMEM_SLOT {
        return Err(SaveError::NotSupported {
            pid,
            what: format!(
                "a shared memory object of {} GiB ({path}; at most {} GiB)",
                meta.size() >> 30,
                cr_ebpf_image::SHMEM_SLOT >> 30
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
        ShmemKind::SysV => sysv_key_mode(pid, meta.ino())?,
        ShmemKind::TmpfsFile | ShmemKind::Memfd => (0, meta.mode() & 0o7777),
        _ => (0, 0),
    };
    let o = ShmemObject {
        id: meta.ino(),
        kind,
        name: name.to_string(),
        size: meta.size(),
        seals,
        key,
        mode,
        elsewhere: !with_data,
        ..ShmemObject::default()
    };
    Ok((o, with_data.then_some(f)))
}

/// What shared anonymous memory's file is called.
pub const ANONYMOUS: &str = "/dev/zero (deleted)";

/// `memfd:NAME (deleted)` -> `NAME`.
pub fn memfd_name(path: &str) -> Option<&str> {
    path.strip_prefix("/memfd:")
        .map(|n| n.strip_suffix(" (deleted)").unwrap_or(n))
}

/// Every shared memory object the process's mappings and descriptors refer
/// to, with the file to read the contents of each it stores (by id; the
/// checkpoint reads them into the page store), and the deleted files they hold (at most `limits` bytes of contents
/// each, see [`crate::ghost`]). In a tree, `taken` holds the objects an earlier
/// process of the same checkpoint stored: their contents are not read or
/// stored again.
pub fn capture(
    pid: i32,
    entries: &[MapEntry],
    fds: &[FdInfo],
    mut taken: Option<&mut HashSet<u64>>,
    limits: Limits,
) -> Result<(Vec<ShmemObject>, HashMap<u64, File>), SaveError> {
    let ghost_limit = limits.ghost;
    let mut files = HashMap::new();
    let mut out: BTreeMap<u64, ShmemObject> = BTreeMap::new();
    // System V segments of an IPC namespace of its own are saved with
    // the namespace (`crate::ipc`): here only named, so that the mapping
    // is attached by id again.
    let foreign_ipc = {
        use std::os::unix::fs::MetadataExt as _;
        let ino = |p: String| std::fs::metadata(p).map(|m| m.ino()).ok();
        ino(format!("/proc/{pid}/ns/ipc")) != ino("/proc/self/ns/ipc".into())
    };
    // Whether this process stores the contents of `id` (and claims it).
    let mut first = |id: u64| taken.as_deref_mut().is_none_or(|t| t.insert(id));
    for m in entries.iter().filter(|m| m.kind() == MappingKind::Shmem) {
        if out.contains_key(&m.inode) {
            continue;
        }
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        if m.ghost {
            let name = ghost::deleted_path(&m.path).unwrap_or(&m.path);
            let with_data = first(m.inode);
            out.insert(
                m.inode,
                ghost::object(pid, &path, name, with_data, ghost_limit)?,
            );
            continue;
        }
        let (kind, name) = match memfd_name(&m.path) {
            Some(n) => (ShmemKind::Memfd, n),
            None if m.tmpfs => (ShmemKind::TmpfsFile, m.path.as_str()),
            None if m.path.starts_with("/SYSV") => (ShmemKind::SysV, ""),
            None => (ShmemKind::Anonymous, ""),
        };
        if kind == ShmemKind::SysV && foreign_ipc {
            out.insert(
                m.inode,
                ShmemObject {
                    id: m.inode,
                    kind,
                    ..ShmemObject::default()
                },
            );
            continue;
        }
        let with_data = first(m.inode);
        let (o, f) = object(pid, &path, kind, name, with_data, limits.shm)?;
        files.extend(f.map(|f| (o.id, f)));
        out.insert(m.inode, o);
    }
    // A working directory that was removed (anything else deleted there is
    // refused with the process's settings).
    let cwd = format!("/proc/{pid}/cwd");
    if let Some(name) = std::fs::read_link(&cwd)
        .ok()
        .and_then(|l| ghost::deleted_path(&l.to_string_lossy()).map(str::to_string))
    {
        let meta = std::fs::metadata(&cwd).ok().filter(|m| {
            m.is_dir() && !name.starts_with("/proc/") && ghost::refusal(&name, m).is_none()
        });
        if let Some(meta) = meta {
            if let std::collections::btree_map::Entry::Vacant(e) = out.entry(meta.ino()) {
                let with_data = first(meta.ino());
                e.insert(ghost::object(pid, &cwd, &name, with_data, ghost_limit)?);
            }
        }
    }
    for f in fds {
        if let FdState::Memfd { id } = f.state {
            if out.contains_key(&id) {
                continue;
            }
            let name = memfd_name(&f.path).unwrap_or("");
            let path = format!("/proc/{pid}/fd/{}", f.fd);
            let with_data = first(id);
            let (o, f) = object(pid, &path, ShmemKind::Memfd, name, with_data, limits.shm)?;
            files.extend(f.map(|f| (o.id, f)));
            out.insert(id, o);
        }
        if let FdState::Deleted { id } = f.state {
            if out.contains_key(&id) {
                continue;
            }
            let path = format!("/proc/{pid}/fd/{}", f.fd);
            let with_data = first(id);
            let o = if f.path == ANONYMOUS {
                let (o, file) =
                    object(pid, &path, ShmemKind::Anonymous, "", with_data, limits.shm)?;
                files.extend(file.map(|file| (o.id, file)));
                o
            } else {
                let name = ghost::deleted_path(&f.path).unwrap_or(&f.path);
                ghost::object(pid, &path, name, with_data, ghost_limit)?
            };
            out.insert(id, o);
        }
    }
    Ok((out.into_values().collect(), files))
}

fn fail(call: String) -> impl FnOnce(io::Error) -> RestoreError {
    move |err| RestoreError::Syscall { call, err }
}

fn anonymous(o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    let len = o.size.max(1) as usize;
    // SAFETY: a new shared anonymous mapping of ours, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(fail("mmap(MAP_SHARED | MAP_ANONYMOUS)".into())(
            io::Error::last_os_error(),
        ));
    }
    let result = fill_and_open(p as usize, len, o);
    // SAFETY: our mapping; the object lives on through the descriptor.
    unsafe { libc::munmap(p, len) };
    result
}

/// Copies the object's contents into our mapping at `start` and opens the
/// shared memory file behind it.
fn fill_and_open(start: usize, len: usize, o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    for (off, bytes) in &o.data {
        // SAFETY: inside the mapping (the image decoder checked the runs
        // against the size).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (start + *off as usize) as *mut u8,
                bytes.len(),
            )
        };
    }
    let path = format!(
        "/proc/self/map_files/{:x}-{:x}",
        start,
        start + len.div_ceil(4096) * 4096
    );
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(fail(format!("open {path}")))
}

fn memfd(o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    let name = std::ffi::CString::new(o.name.as_bytes())
        .map_err(|_| RestoreError::NotSupported(format!("memfd name {:?} with a NUL", o.name)))?;
    // A memfd made without MFD_ALLOW_SEALING reports just F_SEAL_SEAL.
    let mut flags = libc::MFD_CLOEXEC;
    if o.seals != libc::F_SEAL_SEAL as u32 {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: plain syscall with our name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(fail("memfd_create".into())(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    // Its permission bits (0 in images before they were recorded).
    if o.mode != 0 {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(o.mode & 0o7777))
            .map_err(fail(format!("fchmod(memfd {})", o.name)))?;
    }
    f.set_len(o.size).map_err(fail("ftruncate(memfd)".into()))?;
    for (off, bytes) in &o.data {
        f.write_all_at(bytes, *off)
            .map_err(fail("writing a memfd".into()))?;
    }
    Ok(OwnedFd::from(f))
}

fn tmpfs_file(o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(o.mode & 0o7777)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&o.name)
        .map_err(fail(format!(
            "opening {} (a tmpfs file the process shares)",
            o.name
        )))?;
    // Exactly the checkpoint's contents: what was written since is dropped,
    // holes stay holes.
    f.set_len(0)
        .and_then(|()| f.set_len(o.size))
        .map_err(fail(format!("ftruncate({})", o.name)))?;
    for (off, bytes) in &o.data {
        f.write_all_at(bytes, *off)
            .map_err(fail(format!("writing {}", o.name)))?;
    }
    Ok(OwnedFd::from(f))
}

/// A System V segment with id `o.id`: the one that still exists (it
/// outlives the processes that attached it, as a file would; left as it
/// is), or a new one made with that id (`shm_next_id`) and filled.
fn sysv(o: &ShmemObject) -> Result<(), RestoreError> {
    let id = o.id as i32;
    // SAFETY: zeroed shmid_ds is valid; IPC_STAT fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } == 0 {
        if ds.shm_perm.__key == o.key && ds.shm_segsz as u64 == o.size {
            return Ok(());
        }
        return Err(RestoreError::NotSupported(format!(
            "System V shared memory id {id} is taken by another segment (key {:#x}, {} bytes)",
            ds.shm_perm.__key, ds.shm_segsz
        )));
    }
    std::fs::write("/proc/sys/kernel/shm_next_id", id.to_string())
        .map_err(fail("writing /proc/sys/kernel/shm_next_id".into()))?;
    // SAFETY: plain syscall.
    let got = unsafe {
        libc::shmget(
            o.key,
            o.size as usize,
            libc::IPC_CREAT | libc::IPC_EXCL | (o.mode & 0o777) as i32,
        )
    };
    if got < 0 {
        return Err(fail(format!("shmget(key {:#x})", o.key))(
            io::Error::last_os_error(),
        ));
    }
    if got != id {
        // SAFETY: removing the segment we just made.
        unsafe { libc::shmctl(got, libc::IPC_RMID, std::ptr::null_mut()) };
        return Err(RestoreError::NotSupported(format!(
            "System V shared memory segment {id} came back as {got}"
        )));
    }
    // SAFETY: attaching our new segment anywhere, filling it, detaching.
    unsafe {
        let p = libc::shmat(id, std::ptr::null(), 0);
        if p as isize == -1 {
            return Err(fail("shmat".into())(io::Error::last_os_error()));
        }
        for (off, bytes) in &o.data {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (p as *mut u8).add(*off as usize),
                bytes.len(),
            );
        }
        libc::shmdt(p);
    }
    Ok(())
}

/// Every object of the image, by id (System V segments are made or found
/// here, and attached by id in the stub: no descriptor).
fn build(objects: &[ShmemObject]) -> Result<HashMap<u64, OwnedFd>, RestoreError> {
    let mut out = HashMap::new();
    for o in objects {
        let fd = match o.kind {
            ShmemKind::Anonymous => anonymous(o)?,
            ShmemKind::Memfd => memfd(o)?,
            ShmemKind::TmpfsFile => tmpfs_file(o)?,
            ShmemKind::DeletedFile => ghost::make(o)?,
            ShmemKind::SysV => {
                sysv(o)?;
                continue;
            }
            ShmemKind::Invalid => unreachable!("rejected when the image was read"),
        };
        out.insert(o.id, fd);
    }
    Ok(out)
}

/// Adds the memfds' seals back (after the process mapped them: a write
/// seal forbids new writable shared mappings).
pub fn seal(objects: &[ShmemObject], built: &HashMap<u64, OwnedFd>) -> Result<(), RestoreError> {
    for o in objects.iter().filter(|o| {
        o.kind == ShmemKind::Memfd && o.seals != 0 && o.seals != libc::F_SEAL_SEAL as u32
    }) {
        if let Some(fd) = built.get(&o.id) {
            // SAFETY: fcntl on our descriptor.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, o.seals as libc::c_int) }
                != 0
            {
                return Err(fail(format!(
                    "F_ADD_SEALS({:#x}) on memfd {}",
                    o.seals, o.name
                ))(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

/// Every shared memory object the processes `ms` refer to, made once, by
/// id. Every process of a tree names the objects it maps; one of them holds
/// each object's contents.
pub fn prepare(ms: &[&Manifest]) -> Result<HashMap<u64, OwnedFd>, RestoreError> {
    let mut objects: Vec<ShmemObject> = Vec::new();
    // System V segments of an IPC namespace of its own are made with it.
    let here = ms.iter().flat_map(|m| {
        let own_ipc = m.process.membership.ipc.is_some();
        m.shmem
            .iter()
            .filter(move |o| !(own_ipc && o.kind == ShmemKind::SysV))
    });
    for o in here {
        match objects.iter_mut().find(|x| x.id == o.id) {
            Some(x) if x.elsewhere && !o.elsewhere => *x = o.clone(),
            Some(_) => {}
            None => objects.push(o.clone()),
        }
    }
    if let Some(o) = objects.iter().find(|o| o.elsewhere) {
        return Err(RestoreError::NotSupported(format!(
            "the contents of shared memory object {} ({:?} {:?}) are in no image of \
             this checkpoint (an image of the tree is missing?)",
            o.id, o.kind, o.name
        )));
    }
    build(&objects)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn a_memfd_with_a_hole_and_seals_round_trips() {
        // SAFETY: a NUL-terminated name; plain syscall.
        let fd = unsafe {
            libc::memfd_create(
                c"cr-ebpf-shm".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        // SAFETY: a new descriptor we own.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(3 << 20).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (3 << 20) - 4).unwrap();
        // SAFETY: fcntl on our memfd.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
        let ino = f.metadata().unwrap().ino();
        let fds = [FdInfo {
            fd: f.as_raw_fd(),
            path: "/memfd:cr-ebpf-shm (deleted)".into(),
            state: FdState::Memfd { id: ino },
            ..FdInfo::default()
        }];
        let pid = std::process::id() as i32;
        let (mut saved, files) = capture(pid, &[], &fds, None, Limits::default()).unwrap();
        assert_eq!(saved.len(), 1);
        saved[0].data = ghost::read_runs(&files[&ino], saved[0].size, 4 << 20).unwrap();
        let o = &saved[0];
        assert_eq!(
            (o.kind, o.name.as_str(), o.size),
            (ShmemKind::Memfd, "cr-ebpf-shm", 3 << 20)
        );
        assert_eq!(o.seals as i32, libc::F_SEAL_SHRINK);
        assert_eq!(o.mode, 0o600, "its permission bits");
        let stored: usize = o.data.iter().map(|(_, d)| d.len()).sum();
        assert!(stored < 3 << 20, "holes are not stored ({stored} bytes)");

        let m = Manifest {
            shmem: saved.clone(),
            ..Manifest::default()
        };
        let built = prepare(&[&m]).unwrap();
        seal(&m.shmem, &built).unwrap();
        let back = File::from(built[&ino].try_clone().unwrap());
        let mut buf = [0u8; 4];
        back.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"head");
        back.read_exact_at(&mut buf, (3 << 20) - 4).unwrap();
        assert_eq!(&buf, b"tail");
        assert_eq!(back.metadata().unwrap().len(), 3 << 20);
        assert_eq!(
            back.metadata().unwrap().permissions().mode() & 0o7777,
            0o600
        );
        // SAFETY: fcntl query on our descriptor.
        let seals = unsafe { libc::fcntl(back.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, libc::F_SEAL_SHRINK);

        // Contents said to be elsewhere but found nowhere: refused.
        let mut gone = saved[0].clone();
        gone.data.clear();
        gone.elsewhere = true;
        let m = Manifest {
            shmem: vec![gone],
            ..Manifest::default()
        };
        assert!(prepare(&[&m]).is_err());
    }
}
