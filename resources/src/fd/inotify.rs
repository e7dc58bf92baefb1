//! inotify instances: each watch with its watch descriptor, its mask and
//! the watched file (found again from the kernel's file handle in fdinfo,
//! checked by inode at restore); rebuilt in the restorer with the same
//! watch descriptors and handed over. A watched file that was deleted is
//! watched again on the deleted file the restore makes again, when the
//! process holds it open (its path is then recorded with ` (deleted)`).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, InotifyWatch};

use super::{owned, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// An inotify instance.
pub struct Inotify;

impl Descriptor for Inotify {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Inotify]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("inotify") {
            return None;
        }
        let mut watches = Vec::new();
        for line in seen.fdinfo.lines().filter(|l| l.starts_with("inotify wd:")) {
            match inotify_watch(line, cx.pid) {
                Ok(w) => watches.push(w),
                Err(e) => return Some(Err(cx.refuse(seen.fd, e))),
            }
        }
        watches.sort_by_key(|w| w.wd);
        // Events waiting to be read cannot be queued again.
        let queued = match cx.dup(seen.fd) {
            Ok(ours) => queued_bytes(ours.as_raw_fd()),
            Err(e) => return Some(Err(e)),
        };
        if queued != 0 {
            return Some(Err(cx.refuse(
                seen.fd,
                format!(
                    "an inotify instance with {queued} byte(s) of events waiting to be read: \
                     events cannot be queued again"
                ),
            )));
        }
        let mut info = seen.info(FdKind::Inotify);
        info.state = FdState::Inotify(watches);
        Some(Ok(info))
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Inotify(watches) = &f.state else {
            return Err(RestoreError::NotSupported(format!(
                "inotify instance {} without its state",
                f.fd
            )));
        };
        let fd = rebuild(watches, |id| cx.shmem.get(&id).map(|o| o.as_raw_fd()))?;
        cx.adopt(&fd).map(Some)
    }
}

/// One `inotify wd:2 ino:9a8157 sdev:fe00000 mask:80000002 ignored_mask:0
/// fhandle-bytes:8 fhandle-type:1 f_handle:57819a00733d77df` line, with the
/// watched file's path found from its handle; a deleted one only when
/// process `pid` holds it open (the restore makes it again).
fn inotify_watch(line: &str, pid: i32) -> Result<InotifyWatch, String> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .ok_or_else(|| format!("no {k} in the inotify line {line:?}"))
    };
    let hex = |k: &str| {
        field(k).and_then(|v| {
            u64::from_str_radix(v, 16).map_err(|_| format!("bad {k} in the inotify line {line:?}"))
        })
    };
    let wd: i32 = field("wd:")?
        .parse()
        .map_err(|_| format!("bad wd in {line:?}"))?;
    let mask = hex("mask:")? as u32;
    let (path, ino, dev) =
        marked_file(line).map_err(|e| format!("the file of inotify watch {wd}: {e}"))?;
    if path.ends_with(" (deleted)") && !holds_deleted(pid, dev, ino) {
        return Err(format!(
            "the file of inotify watch {wd} (inode {ino}): {path}: deleted, and no descriptor \
             of the process holds it (it could not be made again)"
        ));
    }
    Ok(InotifyWatch {
        wd,
        mask,
        path,
        ino,
        dev,
    })
}

/// The file an fdinfo line of an inotify watch or fanotify mark names
/// (`ino:` hex, `sdev:` the kernel's device number, `fhandle-type:`,
/// `f_handle:` hex bytes): its path found from the handle (` (deleted)`
/// appended for a deleted one), its inode and its device.
pub(super) fn marked_file(line: &str) -> Result<(String, u64, u64), String> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .ok_or_else(|| format!("no {k} in {line:?}"))
    };
    let hex = |k: &str| {
        field(k)
            .and_then(|v| u64::from_str_radix(v, 16).map_err(|_| format!("bad {k} in {line:?}")))
    };
    let (ino, sdev) = (hex("ino:")?, hex("sdev:")?);
    let handle_type = hex("fhandle-type:")? as i32;
    let h = field("f_handle:")?;
    let bytes = (0..h.len() / 2)
        .map(|i| u8::from_str_radix(&h[i * 2..i * 2 + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| format!("bad f_handle in {line:?}"))?;
    // The kernel's dev_t: major in the bits above 20.
    let (major, minor) = ((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32);
    let path = path_of_handle(major, minor, handle_type, &bytes)
        .map_err(|e| format!("inode {ino}: {e}"))?;
    Ok((path, ino, libc::makedev(major, minor)))
}

/// The path of a file given by a file handle on the filesystem `major:minor`
/// (a mount of it is looked up in our mountinfo; needs CAP_DAC_READ_SEARCH).
fn path_of_handle(
    major: u32,
    minor: u32,
    handle_type: i32,
    handle: &[u8],
) -> Result<String, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let want = format!("{major}:{minor}");
    let mount = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str())).then(|| f.get(4).map(|m| m.to_string()))?
        })
        .ok_or_else(|| format!("no mount of device {want} here"))?;
    let mount_fd = std::fs::File::open(&mount).map_err(|e| format!("{mount}: {e}"))?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: the handle buffer is ours and well formed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "open_by_handle_at: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    Ok(path)
}

/// Bytes of events waiting on inotify descriptor `fd` (`FIONREAD`; an
/// error counts as some).
fn queued_bytes(fd: i32) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        -1
    } else {
        n
    }
}

/// Whether process `pid` holds open the deleted file `dev`:`ino`.
fn holds_deleted(pid: i32, dev: u64, ino: u64) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().ends_with(" (deleted)"))
            && std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino && m.dev() == dev)
    })
}

/// An inotify instance whose watches get their original descriptors: the
/// kernel hands them out counting up from 1, so gaps (watches removed
/// before the checkpoint) are filled with watches on scratch directories,
/// removed again, and their events drained before the process sees them.
/// A watched deleted file is watched again through the restorer's
/// descriptor of it, `deleted(inode)`.
fn rebuild(
    watches: &[InotifyWatch],
    deleted: impl Fn(u64) -> Option<std::os::fd::RawFd>,
) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: plain syscall.
    let fd = owned(
        unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) },
        "inotify_init1",
    )?;
    let scratch = std::env::temp_dir().join(format!("cr-ebpf-inotify-{}", std::process::id()));
    let mut fillers = Vec::new();
    let add = |path: &std::path::Path, mask: u32| -> Result<i32, RestoreError> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            RestoreError::NotSupported(format!("an inotify path with a NUL: {}", path.display()))
        })?;
        // SAFETY: a NUL-terminated path of ours.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(RestoreError::File {
                path: path.display().to_string(),
                what: format!(
                    "(watched by inotify) cannot be watched again: {}",
                    io::Error::last_os_error()
                ),
            });
        }
        Ok(wd)
    };
    let result = (|| {
        let mut next = 1;
        for w in watches {
            while next < w.wd {
                let dir = scratch.join(next.to_string());
                std::fs::create_dir_all(&dir).map_err(|e| RestoreError::Syscall {
                    call: format!("mkdir {}", dir.display()),
                    err: e,
                })?;
                let got = add(&dir, libc::IN_IGNORED | libc::IN_DELETE_SELF)?;
                fillers.push(got);
                next = got + 1;
            }
            let path = if w.path.ends_with(" (deleted)") {
                let object = deleted(w.ino).ok_or_else(|| RestoreError::File {
                    path: w.path.clone(),
                    what: "(watched by inotify) was not made again".into(),
                })?;
                format!("/proc/self/fd/{object}")
            } else {
                let meta = std::fs::metadata(&w.path).map_err(|e| RestoreError::File {
                    path: w.path.clone(),
                    what: format!("(watched by inotify) is gone: {e}"),
                })?;
                if meta.ino() != w.ino || meta.dev() != w.dev {
                    return Err(RestoreError::File {
                        path: w.path.clone(),
                        what: "(watched by inotify) was replaced since the checkpoint".into(),
                    });
                }
                w.path.clone()
            };
            let got = add(std::path::Path::new(&path), w.mask)?;
            if got != w.wd {
                return Err(RestoreError::NotSupported(format!(
                    "inotify watch {} of {} came back as {got}",
                    w.wd, w.path
                )));
            }
            next = got + 1;
        }
        Ok(())
    })();
    for wd in fillers {
        // SAFETY: removing a watch of ours.
        unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
    }
    let _ = std::fs::remove_dir_all(&scratch);
    // The fillers' IN_IGNORED events: not for the process.
    let mut buf = [0u8; 4096];
    // SAFETY: reading our own nonblocking descriptor into our buffer.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    result?;
    // Blocking again unless the process had it nonblocking (set by the stub).
    // SAFETY: fcntl on our descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn watches_come_back_with_their_descriptors() {
        let dir = testing::scratch("inotify");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let watch = |wd, p: &std::path::Path, mask| {
            let m = std::fs::metadata(p).unwrap();
            InotifyWatch {
                wd,
                mask,
                path: p.display().to_string(),
                ino: m.ino(),
                dev: m.dev(),
            }
        };
        // Watch 1 and 3 were removed before the checkpoint: the gaps are
        // filled and emptied again.
        let info = FdInfo {
            fd: 7,
            kind: FdKind::Inotify,
            state: FdState::Inotify(vec![
                watch(2, &a, libc::IN_CREATE),
                watch(4, &b, libc::IN_DELETE | libc::IN_MODIFY),
            ]),
            ..FdInfo::default()
        };
        let rec = testing::restore_one(&Inotify, &info);
        let made = rec.adopted().pop().unwrap();
        let text =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", made.as_raw_fd())).unwrap();
        let wds: Vec<(String, String)> = text
            .lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .map(|l| {
                let f = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .unwrap()
                        .to_string()
                };
                (f("wd:"), f("mask:"))
            })
            .collect();
        let mut wds = wds;
        wds.sort();
        assert_eq!(
            wds,
            [
                ("2".to_string(), format!("{:x}", libc::IN_CREATE)),
                (
                    "4".to_string(),
                    format!("{:x}", libc::IN_DELETE | libc::IN_MODIFY)
                )
            ]
        );
        // A watched directory replaced since the checkpoint is refused.
        std::fs::create_dir(dir.join("c")).unwrap();
        std::fs::remove_dir(&b).unwrap();
        std::fs::rename(dir.join("c"), &b).unwrap();
        let shared = super::super::Shared::default();
        let shmem = std::collections::HashMap::new();
        let rec = crate::sys::fake::Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        let err = Inotify.open(&cx, &info).unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
    }

    #[test]
    fn a_watch_whose_file_cannot_be_found_is_refused() {
        let line = "inotify wd:1 ino:2 sdev:fff00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:0000000000000000";
        assert!(inotify_watch(line, 1).is_err());
        assert!(inotify_watch("inotify wd:x", 1).is_err());
    }

    #[test]
    fn a_watched_deleted_file_held_open_is_watched_again_through_its_new_copy() {
        let dir = testing::scratch("inotify-deleted");
        let path = dir.join("gone");
        let held = std::fs::File::create(&path).unwrap();
        let ino = held.metadata().unwrap().ino();
        // SAFETY: plain syscalls on our descriptors and paths.
        let ifd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: as above.
        let wd = unsafe { libc::inotify_add_watch(ifd, c.as_ptr(), libc::IN_CLOSE_WRITE) };
        assert_eq!(wd, 1);
        std::fs::remove_file(&path).unwrap();
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{ifd}")).unwrap();
        let line = text.lines().find(|l| l.starts_with("inotify wd:")).unwrap();
        let me = std::process::id() as i32;
        let w = inotify_watch(line, me).unwrap();
        assert!(w.path.ends_with(" (deleted)"), "{}", w.path);
        assert_eq!(w.ino, ino);
        // Not held by that process: refused.
        let parent = std::os::unix::process::parent_id() as i32;
        assert!(inotify_watch(line, parent)
            .unwrap_err()
            .contains("no descriptor"));
        // SAFETY: closing our descriptor.
        unsafe { libc::close(ifd) };
        // Rebuilt on the copy the restore made (here, a new file).
        let copy = std::fs::File::create(dir.join("copy")).unwrap();
        let fd = rebuild(std::slice::from_ref(&w), |id| {
            (id == ino).then(|| copy.as_raw_fd())
        })
        .unwrap();
        let text =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let copy_ino = format!("ino:{:x} ", copy.metadata().unwrap().ino());
        assert!(
            text.contains("inotify wd:1 ") && text.contains(&copy_ino),
            "{text}"
        );
        let err = rebuild(&[w], |_| None).unwrap_err().to_string();
        assert!(err.contains("not made again"), "{err}");
        // Events waiting are counted (and refused by the save).
        // SAFETY: plain syscalls on our descriptors and paths.
        let ifd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        let d = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: as above.
        assert!(unsafe { libc::inotify_add_watch(ifd, d.as_ptr(), libc::IN_CREATE) } > 0);
        assert_eq!(queued_bytes(ifd), 0);
        std::fs::File::create(dir.join("new")).unwrap();
        assert!(queued_bytes(ifd) > 0);
        // SAFETY: closing our descriptor.
        unsafe { libc::close(ifd) };
        drop(held);
    }
}
