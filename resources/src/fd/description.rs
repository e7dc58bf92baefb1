//! Open file descriptions shared by several descriptors: a `dup`, a
//! descriptor inherited across `fork`, one received over a unix socket.
//! They share one file position and one set of status flags, so a restore
//! must make one description for all of them: it is opened once, in the
//! restorer, and handed to each. Regular files, and pipe ends (each end is
//! one object already; an end opened again through `/proc/PID/fd/N` is
//! another description of it, see the pipe module); sockets are one object
//! per inode.

use std::collections::HashMap;
use std::os::{
    fd::{FromRawFd as _, OwnedFd},
    unix::ffi::OsStrExt as _,
};

use cr_ebpf_image::{FdInfo, FdKind};

use super::Shared;
use crate::RestoreError;

/// `KCMP_FILE`: whether two descriptors are one open file description.
const KCMP_FILE: i32 = 0;

/// Whether descriptor `a` of `pa` and `b` of `pb` are one description.
pub(crate) fn same_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    // SAFETY: kcmp with integer arguments only.
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) == 0 }
}

/// A regular file a restore can open before the processes exist (not one
/// of their own `/proc` files, not a namespace), a deleted file (made
/// again by the restorer; see the deleted module), a pipe end, or an epoll
/// set (made once by a process for its descriptors of it: see the epoll
/// module).
fn shareable(f: &FdInfo) -> bool {
    matches!(f.kind, FdKind::Pipe | FdKind::Deleted | FdKind::Epoll)
        || (f.kind == FdKind::File && f.path.starts_with('/') && !f.path.starts_with("/proc/"))
}

/// Where the files in flight of processes are held: (pid, the number a
/// file in flight is saved under) -> our own descriptor of it.
pub type InFlight = HashMap<(i32, i32), i32>;

/// Gives every group of descriptors of `procs` (pid, its descriptors) that
/// are one open file description the same [`FdInfo::desc`]: the first
/// one's pid and number (`pid << 32 | fd`); a description of one
/// descriptor keeps 0. The processes must be stopped. A file in flight
/// (`in_flight`) is compared through our own descriptor of it.
pub fn share(procs: &mut [(i32, &mut [FdInfo])], in_flight: &InFlight) {
    let me = std::process::id() as i32;
    let at = |pid: i32, fd: i32| match in_flight.get(&(pid, fd)) {
        Some(own) => (me, *own),
        None => (pid, fd),
    };
    // The first descriptor of each description, by file: (pid, fd).
    let mut firsts: HashMap<(u64, u64), Vec<(i32, i32)>> = HashMap::new();
    let mut groups: Vec<(usize, usize, u64)> = Vec::new(); // process, index, id
    for (pi, (pid, fds)) in procs.iter().enumerate() {
        for (fi, f) in fds.iter().enumerate() {
            if !shareable(f) {
                continue;
            }
            let of_file = firsts.entry((f.dev, f.inode)).or_default();
            let (q, e) = at(*pid, f.fd);
            match of_file.iter().find(|&&(p, d)| {
                let (p, d) = at(p, d);
                same_description(p, d, q, e)
            }) {
                Some(&(p, d)) => groups.push((pi, fi, (p as u64) << 32 | d as u64)),
                None => of_file.push((*pid, f.fd)),
            }
        }
    }
    // A pipe end's descriptions are told apart even when each has one
    // descriptor (its own id); a file's only when shared.
    for (pid, fds) in procs.iter_mut() {
        for f in fds.iter_mut() {
            f.desc = if f.kind == FdKind::Pipe {
                (*pid as u64) << 32 | f.fd as u64
            } else {
                0
            };
        }
    }
    for &(pi, fi, id) in &groups {
        procs[pi].1[fi].desc = id;
        // The first of the group shares it too.
        let (p, d) = ((id >> 32) as i32, id as u32 as i32);
        if let Some((_, fds)) = procs.iter_mut().find(|(pid, _)| *pid == p) {
            if let Some(f) = fds.iter_mut().find(|f| f.fd == d) {
                f.desc = id;
            }
        }
    }
}

/// Opens, in the restorer, every description `fds` share, at its position.
pub fn prepare(fds: &[&FdInfo], shared: &mut Shared) -> Result<(), RestoreError> {
    for f in fds
        .iter()
        .filter(|f| f.desc != 0 && f.kind == FdKind::File && shareable(f))
    {
        if shared.contains(FdKind::File, f.desc) {
            continue;
        }
        shared.insert(FdKind::File, f.desc, 0, open(f)?);
    }
    Ok(())
}

/// The description of `f`, opened here.
fn open(f: &FdInfo) -> Result<OwnedFd, RestoreError> {
    let err = |what: &str, e: std::io::Error| RestoreError::File {
        path: f.path.clone(),
        what: format!("(fd {}, shared with other descriptors) {what}: {e}", f.fd),
    };
    let path = std::ffi::CString::new(std::path::Path::new(&f.path).as_os_str().as_bytes())
        .map_err(|e| err("has a NUL byte", std::io::Error::other(e)))?;
    let flags = f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL) | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path of ours; no mode is needed without O_CREAT.
    let raw = unsafe { libc::open(path.as_ptr(), flags) };
    if raw < 0 {
        return Err(err("cannot be reopened", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if f.pos > 0 && flags & libc::O_PATH == 0 {
        // SAFETY: lseek on our descriptor.
        let r = unsafe {
            libc::lseek(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                f.pos as i64,
                libc::SEEK_SET,
            )
        };
        if r < 0 {
            return Err(err("cannot be positioned", std::io::Error::last_os_error()));
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_dup_shares_its_description_and_a_second_open_does_not() {
        let dir = testing::scratch("desc");
        let path = dir.join("data");
        std::fs::write(&path, b"0123456789").unwrap();
        let a = std::fs::File::open(&path).unwrap();
        let b = a.try_clone().unwrap();
        let c = std::fs::File::open(&path).unwrap();
        let pid = std::process::id() as i32;
        let mut fds: Vec<FdInfo> = [&a, &b, &c]
            .iter()
            .map(|f| testing::save_own(f.as_raw_fd()))
            .collect();
        share(&mut [(pid, &mut fds[..])], &InFlight::new());
        let id = (pid as u64) << 32 | a.as_raw_fd() as u64;
        assert_eq!((fds[0].desc, fds[1].desc, fds[2].desc), (id, id, 0));

        // Restored: one description for both, at the position.
        fds[0].pos = 4;
        fds[1].pos = 4;
        let mut shared = Shared::default();
        prepare(&fds.iter().collect::<Vec<_>>(), &mut shared).unwrap();
        let one = shared.get(FdKind::File, id, 0, 3).unwrap();
        // SAFETY: lseek on a descriptor the test owns.
        let pos = unsafe { libc::lseek(one.as_raw_fd(), 0, libc::SEEK_CUR) };
        assert_eq!(pos, 4);
        assert!(!shared.contains(FdKind::File, 0));
    }
}
