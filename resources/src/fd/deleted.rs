//! Descriptors of deleted files, directories and symbolic links (and of
//! shared anonymous memory, `/dev/zero (deleted)`, opened through
//! `/proc/PID/map_files`):
//! the file itself is stored once per checkpoint as a shared memory object
//! ([`crate::ghost`], [`crate::shmem`]), which the descriptor names by id.
//!
//! At restore each open file is reopened through `/proc/self/fd` from the
//! one the restorer made, with its access mode and at its position (once
//! for the descriptors that shared it: `dup`, fork): it shows `PATH
//! (deleted)` as before.

use std::os::{
    fd::{AsRawFd as _, OwnedFd, RawFd},
    unix::fs::{MetadataExt as _, OpenOptionsExt as _},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{Descriptor, Prepare, RestoreCx, SaveCx, Seen, Shared};
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
        if !(ty == libc::S_IFREG || ty == libc::S_IFDIR || ty == libc::S_IFLNK)
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

    fn prepare(
        &self,
        fds: &[&FdInfo],
        opts: &Prepare,
        shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        // An open file shared by several descriptors (dup, fork) is made
        // once, for all of them.
        for f in fds.iter().filter(|f| f.desc != 0) {
            if shared.contains(FdKind::Deleted, f.desc) {
                continue;
            }
            let FdState::Deleted { id } = f.state else {
                continue;
            };
            let Some(&object) = opts.shmem.get(&id) else {
                continue; // open() names what is missing
            };
            shared.insert(FdKind::Deleted, f.desc, 0, reopen(object, f)?);
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        if f.desc != 0 && cx.shared.contains(FdKind::Deleted, f.desc) {
            return cx
                .adopt(cx.shared.get(FdKind::Deleted, f.desc, 0, f.fd)?)
                .map(Some);
        }
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
        cx.adopt(&reopen(object.as_raw_fd(), f)?).map(Some)
    }
}

/// An open file of its own of the object the restorer made (`object`),
/// with the access mode, flags and position of `f`.
fn reopen(object: RawFd, f: &FdInfo) -> Result<OwnedFd, RestoreError> {
    let path = format!("/proc/self/fd/{object}");
    // A symbolic link is held by an O_PATH | O_NOFOLLOW descriptor of the
    // link itself, as the restorer opened it: a duplicate of that.
    if std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        // SAFETY: F_DUPFD_CLOEXEC of a descriptor of ours.
        let fd = unsafe { libc::fcntl(object, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(RestoreError::Syscall {
                call: format!("duplicating the link {} for descriptor {}", f.path, f.fd),
                err: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a new descriptor we own.
        return Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
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
    Ok(file)
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
    fn a_deleted_file_shared_by_a_dup_comes_back_as_one_open_file() {
        let dir = testing::scratch("deleted-dup");
        let path = dir.join("log");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"0123456789").unwrap();
        let g = f.try_clone().unwrap();
        let other = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let pid = std::process::id() as i32;
        let mut saved = testing::save_own_many(&[f.as_raw_fd(), g.as_raw_fd(), other.as_raw_fd()]);
        crate::fd::description::share(&mut [(pid, &mut saved[..])], &Default::default());
        assert_ne!(saved[0].desc, 0);
        assert_eq!(saved[0].desc, saved[1].desc, "the dup shares it");
        assert_eq!(saved[2].desc, 0, "a second open is its own");
        let FdState::Deleted { id } = saved[0].state else {
            panic!("{:?}", saved[0].state)
        };
        let shm = crate::shmem::capture(
            pid,
            &[],
            &saved,
            None,
            crate::shmem::Limits::new(1 << 20, 0),
        )
        .unwrap()
        .0;
        let mut shmem = std::collections::HashMap::new();
        shmem.insert(id, ghost::make(&shm[0]).unwrap());
        let opts = Prepare {
            shmem: shmem.iter().map(|(i, o)| (*i, o.as_raw_fd())).collect(),
            ..Prepare::default()
        };
        let mut shared = Shared::default();
        let all: Vec<&FdInfo> = saved.iter().collect();
        Deleted.prepare(&all, &opts, &mut shared).unwrap();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        for info in &saved {
            Deleted.open(&cx, info).unwrap();
        }
        let got = rec.adopted();
        // SAFETY: kcmp with integer arguments only (KCMP_FILE = 0).
        let same = |a: &OwnedFd, b: &OwnedFd| unsafe {
            libc::syscall(libc::SYS_kcmp, pid, pid, 0, a.as_raw_fd(), b.as_raw_fd()) == 0
        };
        assert!(same(&got[0], &got[1]), "one open file for the dup");
        assert!(!same(&got[0], &got[2]), "the other open its own");
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
        let shm = crate::shmem::capture(
            pid,
            &[],
            std::slice::from_ref(&info),
            None,
            crate::shmem::Limits::new(1 << 20, 0),
        )
        .unwrap()
        .0;
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
        let shm = crate::shmem::capture(
            pid,
            &[],
            std::slice::from_ref(&info),
            None,
            crate::shmem::Limits::new(1 << 20, 0),
        )
        .unwrap()
        .0;
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

    #[test]
    fn a_descriptor_of_a_deleted_symbolic_link_is_made_again() {
        let dir = testing::scratch("deleted-link");
        let link = dir.join("link");
        std::os::unix::fs::symlink("some/target", &link).unwrap();
        let c = std::ffi::CString::new(link.display().to_string()).unwrap();
        // SAFETY: open of a NUL-terminated path.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        std::fs::remove_file(&link).unwrap();
        let info = testing::save_own(fd.as_raw_fd());
        assert_eq!(info.kind, FdKind::Deleted);
        let me = std::process::id() as i32;
        let o = ghost::object(
            me,
            &format!("/proc/{me}/fd/{}", fd.as_raw_fd()),
            &link.display().to_string(),
            true,
            ghost::DEFAULT_LIMIT,
        )
        .unwrap();
        assert_eq!(o.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(o.data, [(0, b"some/target".to_vec())]);
        // Made again: a link with that target, removed again, and the
        // descriptor is of the link itself.
        let made = ghost::make(&o).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err(), "removed again");
        let again = reopen(made.as_raw_fd(), &info).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: readlinkat of our descriptor with an empty path.
        let n = unsafe {
            libc::readlinkat(again.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), 64)
        };
        assert_eq!(&buf[..n as usize], b"some/target");
        let shown = std::fs::read_link(format!("/proc/self/fd/{}", again.as_raw_fd())).unwrap();
        assert_eq!(
            shown.display().to_string(),
            format!("{} (deleted)", link.display())
        );
        // SAFETY: F_GETFL on our descriptor.
        let fl = unsafe { libc::fcntl(again.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_PATH, 0);
    }
}
