//! Removing a network lock at restore (the lock itself is made by the
//! loader: `loader/src/netlock.rs`). Its map of connections is emptied
//! first: the classifier lets every packet through from the next one on.
//! Then its directory in bpffs is removed; the links go with their last
//! pin, but the kernel detaches them later, from a work queue, so the map
//! is what makes the unlock take effect at once (packets made right after
//! it, such as the FINs `fin.rs` makes again, must not be dropped).

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

use cr_ebpf_common::netlock::{NetLockKey, PIN_ROOT};

use super::fail;
use crate::RestoreError;

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;

/// Removes the network locks `names`; one already gone is no error.
pub(super) fn unlock_network(names: &[String]) -> Result<(), RestoreError> {
    for name in names {
        let dir = Path::new(PIN_ROOT).join(name);
        match clear(&dir.join("connections")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(fail("emptying the network lock's connections")(e));
            }
            _ => {}
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(fail("removing the network lock")(e));
            }
            _ => {}
        }
    }
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed, 8-byte aligned union bpf_attr prefix of
    // the size given, laid out for `cmd` by the caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Deletes every key of the pinned map at `path` (keys: [`NetLockKey`]).
fn clear(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut get = [c.as_ptr() as u64, 0];
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let map_fd = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    let mut key = NetLockKey::default();
    // The map holds at most its capacity; bound the loop by it.
    for _ in 0..=cr_ebpf_common::netlock::CAPACITY {
        // BPF_MAP_GET_NEXT_KEY: map_fd, key (NULL: the first), next_key.
        let mut next = [map_fd, 0, &mut key as *mut NetLockKey as u64, 0];
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut next) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // BPF_MAP_DELETE_ELEM: map_fd, key.
        let mut del = [map_fd, &key as *const NetLockKey as u64, 0, 0];
        match bpf(BPF_MAP_DELETE_ELEM, &mut del) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
