//! Named FIFOs: each descriptor reopened with its access mode, the bytes
//! buffered in the FIFO put back as a pipe's are (read at checkpoint time
//! with `tee`, without being consumed).
//!
//! At restore the restorer first opens the FIFO read-write and
//! nonblocking (so that neither it nor any later open waits for the other
//! side), refills it through that open file, then opens each descriptor
//! through `/proc/self/fd` of it; its own open file is closed before the
//! processes run, so readers and writers count as before. A FIFO removed
//! from its directory is made again at its path with its permissions and
//! owner (`mkfifo`), opened, and removed again: it shows `PATH (deleted)`.
//! A FIFO a process outside the checkpoint holds is refused: its buffered
//! bytes would be there twice.

use std::{
    collections::HashSet,
    fs,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::Path,
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, Manifest};

use super::{
    pipe::{peek_pipe, write_all},
    Descriptor, Prepare, RestoreCx, SaveCx, Seen, Shared,
};
use crate::{error::proc_err, ghost, RestoreError, SaveError};

/// A named FIFO.
pub struct Fifo;

fn fail(call: String) -> impl FnOnce(std::io::Error) -> RestoreError {
    move |err| RestoreError::Syscall { call, err }
}

/// The path of `f` (without ` (deleted)`).
fn path_of(f: &FdInfo) -> &str {
    ghost::deleted_path(&f.path).unwrap_or(&f.path)
}

/// The restorer's own read-write open file of the FIFO of `f`.
fn keeper(f: &FdInfo) -> Result<OwnedFd, RestoreError> {
    let open = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(p)
            .map(OwnedFd::from)
            .map_err(fail(format!("opening the FIFO {}", p.display())))
    };
    match f.state {
        FdState::Fifo {
            deleted: true,
            mode,
            uid,
            gid,
        } => ghost::transient(Path::new(path_of(f)), false, |p| {
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| RestoreError::NotSupported(format!("FIFO path {p:?} with a NUL")))?;
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(fail(format!("mkfifo {}", p.display()))(
                    std::io::Error::last_os_error(),
                ));
            }
            let fd = open(p)?;
            ghost::set_owner_mode(&fd, uid, gid, mode)
                .map_err(fail(format!("fchown/fchmod of the FIFO {}", p.display())))?;
            Ok(fd)
        }),
        _ => open(Path::new(&f.path)),
    }
}

impl Descriptor for Fifo {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Fifo]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.file_type() != libc::S_IFIFO || !seen.link.starts_with('/') {
            return None;
        }
        let (dev, ino) = (seen.meta.dev(), seen.meta.ino());
        let deleted = ghost::deleted_path(&seen.link).is_some() && seen.meta.nlink() == 0;
        if seen.link.ends_with(" (deleted)") && !deleted {
            return Some(Err(cx.refuse(
                seen.fd,
                format!(
                    "named FIFO {} removed but still linked elsewhere (not found)",
                    seen.link
                ),
            )));
        }
        if let Some(why) = cx.scope.outside(cx.pid).fifo(dev, ino) {
            return Some(Err(cx.refuse(
                seen.fd,
                format!(
                    "named FIFO {} also outside the checkpoint ({why})",
                    seen.link
                ),
            )));
        }
        Some((|| {
            let (pid, fd) = (cx.pid, seen.fd);
            let mut info = seen.info(FdKind::Fifo);
            info.state = FdState::Fifo {
                deleted,
                mode: seen.meta.mode() & 0o7777,
                uid: seen.meta.uid(),
                gid: seen.meta.gid(),
            };
            let dup = cx.dup(fd)?;
            // SAFETY: fcntl query on our duplicate.
            let size = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETPIPE_SZ) };
            info.pipe_size = size.max(0) as u32;
            if cx.scope.data_taken.insert(format!("fifo:{dev}:{ino}")) {
                // A reader of our own, for tee (a nonblocking open for
                // reading never waits).
                let path = format!("/proc/{pid}/fd/{fd}");
                let reader = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(proc_err(pid, path))?;
                info.data = peek_pipe(&OwnedFd::from(reader), info.pipe_size as usize)
                    .map_err(proc_err(pid, format!("contents of the FIFO on fd {fd}")))?;
            }
            Ok(info)
        })())
    }

    fn preflight(&self, _m: &Manifest, f: &FdInfo) -> Result<(), RestoreError> {
        if matches!(f.state, FdState::Fifo { deleted: true, .. }) {
            return Ok(());
        }
        let meta = fs::metadata(&f.path).map_err(|e| RestoreError::File {
            path: f.path.clone(),
            what: format!("(a FIFO open on fd {}) cannot be found: {e}", f.fd),
        })?;
        if meta.mode() & libc::S_IFMT != libc::S_IFIFO
            || meta.ino() != f.inode
            || (f.dev != 0 && meta.dev() != f.dev)
        {
            return Err(RestoreError::File {
                path: f.path.clone(),
                what: format!(
                    "(a FIFO open on fd {}) was replaced since the checkpoint",
                    f.fd
                ),
            });
        }
        Ok(())
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        _opts: &Prepare,
        shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        let mut made = HashSet::new();
        for f in fds {
            if !made.insert((f.dev, f.inode)) {
                continue;
            }
            let same = fds.iter().filter(|g| (g.dev, g.inode) == (f.dev, f.inode));
            let size = same.clone().map(|g| g.pipe_size).max().unwrap_or(0);
            let data = same
                .map(|g| &g.data[..])
                .find(|d| !d.is_empty())
                .unwrap_or(&[]);
            let k = keeper(f)?;
            if size > 0 {
                // SAFETY: fcntl on our FIFO.
                unsafe { libc::fcntl(k.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
            }
            write_all(&k, data)?;
            shared.insert(FdKind::Fifo, f.inode, 0, k);
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let k = cx.shared.get(FdKind::Fifo, f.inode, 0, f.fd)?;
        let mode = f.flags as i32 & libc::O_ACCMODE;
        // Nonblocking: the restorer's read-write open file is the other
        // side for now (the status flags are set afterwards).
        let end = fs::OpenOptions::new()
            .read(mode != libc::O_WRONLY)
            .write(mode != libc::O_RDONLY)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", k.as_raw_fd()))
            .map_err(fail(format!("reopening the FIFO {} (fd {})", f.path, f.fd)))?;
        cx.adopt(&OwnedFd::from(end)).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, io::Write as _, os::fd::AsRawFd as _};

    use super::*;
    use crate::fd::testing;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
    }

    fn open(p: &Path, write: bool) -> fs::File {
        fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .unwrap()
    }

    #[test]
    fn a_fifo_pair_with_bytes_in_flight_round_trips() {
        let dir = testing::scratch("fifo");
        let path = dir.join("f");
        mkfifo(&path);
        let r = open(&path, false);
        let mut w = open(&path, true);
        w.write_all(b"in flight").unwrap();
        let saved = testing::save_own_many(&[r.as_raw_fd(), w.as_raw_fd()]);
        assert!(saved.iter().all(|f| f.kind == FdKind::Fifo));
        assert_eq!(saved[0].data, b"in flight");
        assert!(saved[1].data.is_empty(), "stored once");
        let m = testing::manifest(saved.clone());
        for f in &saved {
            Fifo.preflight(&m, f).unwrap();
        }
        // The process is gone: its FIFO empty, as after a kill.
        drop((r, w));
        let (rec, shared) = testing::restore_keeping(&m);
        let got = rec.adopted();
        drop(shared); // the restorer's own open file goes before the process runs
        let mut reader = fs::File::from(got[0].try_clone().unwrap());
        let mut buf = [0u8; 64];
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"in flight");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", got[1].as_raw_fd())).unwrap();
        assert_eq!(link, path);
        // SAFETY: fcntl query on our descriptor.
        let fl = unsafe { libc::fcntl(got[1].as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_WRONLY);
        // The writer closed: end of file.
        drop(got);
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn a_removed_fifo_is_made_again_and_removed() {
        let dir = testing::scratch("fifo-ghost");
        let path = dir.join("f");
        mkfifo(&path);
        let r = open(&path, false);
        let mut w = open(&path, true);
        w.write_all(b"x").unwrap();
        std::fs::remove_file(&path).unwrap();
        let saved = testing::save_own_many(&[r.as_raw_fd()]);
        assert_eq!(
            saved[0].state,
            FdState::Fifo {
                deleted: true,
                mode: 0o640,
                // SAFETY: plain queries.
                uid: unsafe { libc::geteuid() },
                // SAFETY: as above.
                gid: unsafe { libc::getegid() },
            }
        );
        let m = testing::manifest(saved.clone());
        let (rec, _shared) = testing::restore_keeping(&m);
        let got = rec.adopted();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", got[0].as_raw_fd())).unwrap();
        assert_eq!(
            link.display().to_string(),
            format!("{} (deleted)", path.display())
        );
        assert!(!path.exists());
        let mut buf = [0u8; 4];
        let n = fs::File::from(got[0].try_clone().unwrap())
            .read(&mut buf)
            .unwrap();
        assert_eq!(&buf[..n], b"x");
    }
}
