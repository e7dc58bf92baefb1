//! memfd descriptors: the shared memory object they open (its contents and
//! seals are saved by [`crate::shmem`]); the restorer's object is handed
//! over at restore.

use std::os::unix::fs::MetadataExt as _;

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{shmem::memfd_name, RestoreError, SaveError};

/// A memfd.
pub struct Memfd;

impl Descriptor for Memfd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Memfd]
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
        let ours = cx.shmem.get(&id).ok_or_else(|| {
            RestoreError::NotSupported(format!("memfd on descriptor {} was not rebuilt", f.fd))
        })?;
        cx.adopt(ours).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::*;
    use crate::{fd::testing, sys::fake::Event};

    #[test]
    fn a_memfd_names_its_object_and_gets_the_restored_one() {
        // SAFETY: a NUL-terminated name; plain syscall.
        let fd = unsafe { libc::memfd_create(c"cr-ebpf-test".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let info = testing::save_own(fd.as_raw_fd());
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino();
        assert_eq!(info.state, FdState::Memfd { id: ino });
        let mut shmem = std::collections::HashMap::new();
        shmem.insert(ino, fd.try_clone().unwrap());
        let shared = super::super::Shared::default();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        Memfd.open(&cx, &info).unwrap();
        assert!(
            matches!(rec.events()[0], Event::Adopt { ours, .. } if ours == shmem[&ino].as_raw_fd())
        );
        // Without its object: an error, not a guess.
        let none = std::collections::HashMap::new();
        let cx = RestoreCx { shmem: &none, ..cx };
        assert!(Memfd.open(&cx, &info).is_err());
    }
}
