//! Shared memory objects rebuilt in the restorer, with their contents,
//! before the stub maps them: shared anonymous memory (made by a shared
//! anonymous mapping of ours, kept through `/proc/self/map_files`, so the
//! process sees `/dev/zero (deleted)` again), memfds (same name, seals
//! added back once every mapping exists), and files on tmpfs (written back
//! at their path with the checkpoint's contents: created if a reboot or
//! another machine lost them, rolled back if the process wrote on after
//! the checkpoint).

use std::{
    collections::HashMap,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::FileExt as _,
    },
};

use cr_ebpf_image::{ShmemKind, ShmemObject};

use crate::RestoreError;

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
pub(crate) fn build(objects: &[ShmemObject]) -> Result<HashMap<u64, OwnedFd>, RestoreError> {
    let mut out = HashMap::new();
    for o in objects {
        let fd = match o.kind {
            ShmemKind::Anonymous => anonymous(o)?,
            ShmemKind::Memfd => memfd(o)?,
            ShmemKind::TmpfsFile => tmpfs_file(o)?,
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
pub(crate) fn seal(
    objects: &[ShmemObject],
    built: &HashMap<u64, OwnedFd>,
) -> Result<(), RestoreError> {
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
