//! Deleted symbolic links a process holds by an `O_PATH | O_NOFOLLOW`
//! descriptor of the link itself (the ghost module stores and makes them
//! like other deleted files): the target is the contents; made again with
//! `symlink`, its owner and times set without following it.

use std::{
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::Path,
};

use cr_ebpf_image::{ShmemKind, ShmemObject};

use crate::{error::proc_err, RestoreError, SaveError};

fn fail(what: String) -> impl FnOnce(io::Error) -> RestoreError {
    move |err| RestoreError::Syscall { call: what, err }
}

/// The deleted symbolic link behind `path` (a descriptor of the link
/// itself, `O_PATH | O_NOFOLLOW`), which had the path `name`: its target
/// is its contents.
pub fn object(pid: i32, path: &str, name: &str, with_data: bool) -> Result<ShmemObject, SaveError> {
    let err = || proc_err(pid, path.to_string());
    // The descriptor's file, the link itself (the magic link leads to it).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(err())?;
    let meta = f.metadata().map_err(err())?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat of our O_PATH descriptor with an empty path (the
    // link itself) into our buffer.
    let n = unsafe {
        libc::readlinkat(
            f.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(err()(io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(ShmemObject {
        id: meta.ino(),
        kind: ShmemKind::DeletedFile,
        name: name.to_string(),
        mode: meta.mode(),
        elsewhere: !with_data,
        uid: meta.uid(),
        gid: meta.gid(),
        atime_ns: (meta.atime() as u64) * 1_000_000_000 + meta.atime_nsec() as u64,
        mtime_ns: (meta.mtime() as u64) * 1_000_000_000 + meta.mtime_nsec() as u64,
        size: buf.len() as u64,
        data: if with_data {
            vec![(0, buf)]
        } else {
            Vec::new()
        },
        ..ShmemObject::default()
    })
}

/// Makes the deleted symbolic link `o` again at `p` (its target is its
/// contents), gives it its owner and times, and opens the link itself
/// (`O_PATH | O_NOFOLLOW`).
pub fn make_at(p: &Path, o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::ffi::OsStrExt as _;
    let target: Vec<u8> = o.data.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let what = |w: &str| format!("{w} {} (a deleted symbolic link made again)", o.name);
    {
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), p)
            .map_err(fail(what("symlink")))?;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| fail(what("naming"))(io::Error::other(e)))?;
        let ts = |ns: u64| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        let times = [ts(o.atime_ns), ts(o.mtime_ns)];
        // SAFETY: calls on a NUL-terminated path with our own buffers.
        let set = unsafe {
            libc::fchownat(
                libc::AT_FDCWD,
                c.as_ptr(),
                o.uid,
                o.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            ) == 0
                && libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ) == 0
        };
        if !set {
            return Err(fail(what("owner and times of"))(io::Error::last_os_error()));
        }
        // SAFETY: open of a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(fail(what("opening"))(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor we own.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}
