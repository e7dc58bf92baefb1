//! Descriptors of deleted files and directories (and of shared anonymous
//! memory, `/dev/zero (deleted)`, opened through `/proc/PID/map_files`):
//! the file itself is stored once per checkpoint as a shared memory object
//! ([`crate::ghost`], [`crate::shmem`]), which the descriptor names by id.
//!
//! At restore each descriptor gets an open file of its own, reopened
//! through `/proc/self/fd` from the one the restorer made, with its access
//! mode and at its position: it shows `PATH (deleted)` as before.

use std::os::{
    fd::{AsRawFd as _, OwnedFd},
    unix::fs::{MetadataExt as _, OpenOptionsExt as _},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{ghost, shmem::ANONYMOUS, RestoreError, SaveError};

/// `__O_TMPFILE`, without the `O_DIRECTORY` that `O_TMPFILE` adds.
const O_TMPFILE_BIT: i32 = 0o20_000_000;

/// A deleted file, directory, or shared anonymous memory, open.
pub struct Deleted;

impl Descriptor for Deleted {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Deleted]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        let ty = seen.file_type();
        if !(ty == libc::S_IFREG || ty == libc::S_IFDIR)
            || ghost::deleted_path(&seen.link).is_none()
        {
            return None;
        }
        if seen.link != ANONYMOUS {
            if let Some(why) = ghost::refusal(&seen.link, &seen.meta) {
                return Some(Err(cx.refuse(seen.fd, why)));
            }
        }
        let mut info = seen.info(FdKind::Deleted);
        info.size = seen.meta.size();
        info.state = FdState::Deleted {
            id: seen.meta.ino(),
        };
        Some(Ok(info))
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Deleted { id } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "deleted file on descriptor {} without its object",
                f.fd
            )));
        };
        let object = cx.shmem.get(&id).ok_or_else(|| {
            RestoreError::NotSupported(format!(
                "the deleted file {} on descriptor {} was not made again",
                f.path, f.fd
            ))
        })?;
        let path = format!("/proc/self/fd/{}", object.as_raw_fd());
        // A file made with O_TMPFILE shows it (with O_DIRECTORY) in its
        // flags: it is reopened as the file it is.
        let tmpfile = if f.flags as i32 & O_TMPFILE_BIT != 0 {
            O_TMPFILE_BIT | libc::O_DIRECTORY
        } else {
            0
        };
        let flags = f.flags as i32
            & !tmpfile
            & !(libc::O_ACCMODE
                | libc::O_CREAT
                | libc::O_TRUNC
                | libc::O_EXCL
                | libc::O_NOCTTY
                | libc::O_ASYNC
                | libc::O_CLOEXEC);
        let mode = f.flags as i32 & libc::O_ACCMODE;
        let fail = |what: &str| {
            let call = format!("{what} {} for descriptor {}", f.path, f.fd);
            move |err| RestoreError::Syscall { call, err }
        };
        let file = std::fs::OpenOptions::new()
            .read(mode == libc::O_RDONLY || mode == libc::O_RDWR)
            .write(mode == libc::O_WRONLY || mode == libc::O_RDWR)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(&path)
            .map_err(fail("reopening"))?;
        let file = OwnedFd::from(file);
        if f.pos > 0 && flags & libc::O_PATH == 0 {
            // SAFETY: lseek on our descriptor.
            if unsafe { libc::lseek(file.as_raw_fd(), f.pos as i64, libc::SEEK_SET) } < 0 {
                return Err(fail("seeking")(std::io::Error::last_os_error()));
            }
        }
        cx.adopt(&file).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Seek as _, SeekFrom, Write as _},
        os::fd::AsRawFd as _,
    };

    use super::*;
    use crate::{fd::testing, ghost};

    fn position(fd: &OwnedFd) -> i64 {
        // SAFETY: lseek on our descriptor.
        unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR) }
    }

    #[test]
    fn a_deleted_file_comes_back_deleted_at_its_position_and_mode() {
        let dir = testing::scratch("deleted-fd");
        let path = dir.join("log");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        f.write_all(b"0123456789").unwrap();
        f.seek(SeekFrom::Start(6)).unwrap();
        std::fs::remove_file(&path).unwrap();
        let info = testing::save_own(f.as_raw_fd());
        assert_eq!(info.kind, FdKind::Deleted);
        let FdState::Deleted { id } = info.state else {
            panic!("{:?}", info.state)
        };
        let pid = std::process::id() as i32;
        let shm =
            crate::shmem::capture(pid, &[], std::slice::from_ref(&info), None, 1 << 20).unwrap();
        assert_eq!(shm.len(), 1);
        let made = ghost::make(&shm[0]).unwrap();

        let mut shmem = std::collections::HashMap::new();
        shmem.insert(id, made);
        let shared = super::super::Shared::default();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        Deleted.open(&cx, &info).unwrap();
        let got = rec.adopted().pop().unwrap();
        assert_eq!(position(&got), 6);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", got.as_raw_fd())).unwrap();
        assert_eq!(link.display().to_string(), info.path);
        // SAFETY: fcntl query on our descriptor.
        let fl = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_WRONLY);
        assert_eq!(
            std::fs::read(format!("/proc/self/fd/{}", shmem[&id].as_raw_fd())).unwrap(),
            b"0123456789"
        );
        // Its own open file, not the restorer's.
        assert_eq!(position(&shmem[&id]), 0);
    }

    #[test]
    fn a_file_made_with_o_tmpfile_is_reopened_as_a_file() {
        let dir = testing::scratch("deleted-tmpfile");
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; a new descriptor we own.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        };
        assert!(fd >= 0);
        // SAFETY: ours.
        let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let info = testing::save_own(f.as_raw_fd());
        assert_eq!(info.kind, FdKind::Deleted);
        assert_ne!(info.flags as i32 & O_TMPFILE_BIT, 0, "{:o}", info.flags);
        let FdState::Deleted { id } = info.state else {
            panic!("{:?}", info.state)
        };
        let pid = std::process::id() as i32;
        let shm =
            crate::shmem::capture(pid, &[], std::slice::from_ref(&info), None, 1 << 20).unwrap();
        let mut shmem = std::collections::HashMap::new();
        shmem.insert(id, ghost::make(&shm[0]).unwrap());
        let shared = super::super::Shared::default();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        Deleted.open(&cx, &info).expect("not ENOTDIR");
    }
}
