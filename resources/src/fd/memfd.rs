//! memfd descriptors: the shared memory object they open (its contents and
//! seals are saved by [`crate::shmem`]) and their file position.
//!
//! `memfd_create` makes one read-write open file; a process gets others by
//! opening `/proc/PID/fd/N`, often read-only. At restore the read-write
//! descriptors get the open file `memfd_create` made in the restorer (at
//! their position), and each read-only or write-only one an open file of
//! its own, reopened through `/proc/self/fd` with its access mode and
//! position. The two kinds of open file differ in what the process can
//! see: one `memfd_create` made does not keep the memfd from being
//! executed (`execveat`), a reopened writable one does (`ETXTBSY`). So two
//! different read-write open files of one memfd, which would come back as
//! one, are refused at checkpoint time.

use std::{
    io::{Seek as _, SeekFrom},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
};

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{shmem::memfd_name, RestoreError, SaveError};

/// A memfd.
pub struct Memfd;

/// `KCMP_FILE`: whether two descriptors are one open file description.
const KCMP_FILE: i32 = 0;

fn read_write(f: &FdInfo) -> bool {
    f.flags as i32 & libc::O_ACCMODE == libc::O_RDWR
}

impl Descriptor for Memfd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Memfd]
    }

    fn check_tree(
        &self,
        procs: &[(i32, &[FdInfo])],
        _scope: &super::TreeScope,
    ) -> Result<(), SaveError> {
        let rw: Vec<(i32, &FdInfo, u64)> = procs
            .iter()
            .flat_map(|(pid, fds)| fds.iter().map(move |f| (*pid, f)))
            .filter_map(|(pid, f)| match f.state {
                FdState::Memfd { id } if read_write(f) => Some((pid, f, id)),
                _ => None,
            })
            .collect();
        for (i, &(pa, a, ida)) in rw.iter().enumerate() {
            if let Some(&(pb, b, _)) = rw[i + 1..].iter().find(|(pb, b, idb)| {
                *idb == ida
                    // SAFETY: kcmp with integer arguments only.
                    && unsafe { libc::syscall(libc::SYS_kcmp, pa, *pb, KCMP_FILE, a.fd, b.fd) }
                        != 0
            }) {
                return Err(SaveError::NotSupportedFd {
                    pid: pb,
                    fd: b.fd,
                    what: format!(
                        "memfd {} opened read-write a second time (fd {} of pid {pa} is another open \
                         file of it): both would be restored as one",
                        b.path, a.fd
                    ),
                });
            }
        }
        Ok(())
    }

    fn save(&self, _cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.file_type() != libc::S_IFREG || memfd_name(&seen.link).is_none() {
            return None;
        }
        let mut info = seen.info(FdKind::Memfd);
        info.size = seen.meta.size();
        info.state = FdState::Memfd {
            id: seen.meta.ino(),
        };
        Some(Ok(info))
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Memfd { id } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "memfd {} without its object",
                f.fd
            )));
        };
        let object = cx.shmem.get(&id).ok_or_else(|| {
            RestoreError::NotSupported(format!("memfd on descriptor {} was not rebuilt", f.fd))
        })?;
        let fail = |what: &str| {
            let what = format!("{what} memfd {} for descriptor {}", f.path, f.fd);
            move |err| RestoreError::Syscall { call: what, err }
        };
        if read_write(f) {
            // SAFETY: lseek on our descriptor.
            if unsafe { libc::lseek(object.as_raw_fd(), f.pos as i64, libc::SEEK_SET) } < 0 {
                return Err(fail("seeking")(std::io::Error::last_os_error()));
            }
            return cx.adopt(object).map(Some);
        }
        let path = format!("/proc/self/fd/{}", object.as_raw_fd());
        let mode = f.flags as i32 & libc::O_ACCMODE;
        let mut file = std::fs::OpenOptions::new()
            .read(mode == libc::O_RDONLY)
            .write(mode == libc::O_WRONLY)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(fail("reopening"))?;
        file.seek(SeekFrom::Start(f.pos)).map_err(fail("seeking"))?;
        cx.adopt(&OwnedFd::from(file)).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Seek as _, Write as _},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    };

    use super::*;
    use crate::fd::testing;

    fn position(fd: &OwnedFd) -> i64 {
        // SAFETY: lseek on our descriptor.
        unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR) }
    }

    #[test]
    fn each_memfd_descriptor_gets_its_own_file_at_its_position_and_mode() {
        // SAFETY: a NUL-terminated name; plain syscall.
        let fd = unsafe { libc::memfd_create(c"cr-ebpf-test".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: a new descriptor we own.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(b"hello").unwrap();
        file.seek(SeekFrom::Start(3)).unwrap();
        // A second open file on it, read-only, at 0 (as open of /proc/PID/fd/N).
        let reader = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        let infos = testing::save_own_many(&[file.as_raw_fd(), reader.as_raw_fd()]);
        let ino = file.metadata().unwrap().ino();
        assert_eq!(infos[0].state, FdState::Memfd { id: ino });
        assert_eq!((infos[0].pos, infos[1].pos), (3, 0));

        let mut shmem = std::collections::HashMap::new();
        shmem.insert(ino, OwnedFd::from(file.try_clone().unwrap()));
        let shared = super::super::Shared::default();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        Memfd.open(&cx, &infos[0]).unwrap();
        Memfd.open(&cx, &infos[1]).unwrap();
        let got = rec.adopted();
        assert_eq!((position(&got[0]), position(&got[1])), (3, 0));
        let mode = |fd: &OwnedFd| {
            // SAFETY: fcntl query on our descriptor.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            flags & libc::O_ACCMODE
        };
        assert_eq!(
            (mode(&got[0]), mode(&got[1])),
            (libc::O_RDWR, libc::O_RDONLY)
        );
        // Two open files, not one: moving one leaves the other.
        // SAFETY: lseek on our descriptor.
        unsafe { libc::lseek(got[1].as_raw_fd(), 4, libc::SEEK_SET) };
        assert_eq!(position(&got[0]), 3);

        // The read-write one is the open file memfd_create made.
        let same = |a: &OwnedFd, b: &OwnedFd| {
            let me = std::process::id() as i32;
            // SAFETY: kcmp with integer arguments only.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_kcmp,
                    me,
                    me,
                    KCMP_FILE,
                    a.as_raw_fd(),
                    b.as_raw_fd(),
                )
            };
            r == 0
        };
        assert!(same(&got[0], &shmem[&ino]));
        assert!(!same(&got[1], &shmem[&ino]));

        // Without its object: an error, not a guess.
        let none = std::collections::HashMap::new();
        let cx = RestoreCx { shmem: &none, ..cx };
        assert!(Memfd.open(&cx, &infos[0]).is_err());
    }

    #[test]
    fn a_second_read_write_open_file_of_a_memfd_is_refused() {
        // SAFETY: a NUL-terminated name; plain syscall.
        let fd = unsafe { libc::memfd_create(c"cr-ebpf-test".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: a new descriptor we own.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let dup = file.try_clone().unwrap();
        let me = std::process::id() as i32;
        let infos = testing::save_own_many(&[file.as_raw_fd(), dup.as_raw_fd()]);
        Memfd
            .check_tree(&[(me, &infos[..])], &Default::default())
            .expect("one open file, two descriptors");
        let again = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .unwrap();
        let infos = testing::save_own_many(&[file.as_raw_fd(), again.as_raw_fd()]);
        let err = Memfd
            .check_tree(&[(me, &infos[..])], &Default::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("read-write a second time"),
            "{err}"
        );
    }
}
