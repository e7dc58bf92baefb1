//! Regular files, directories, symbolic links (an `O_PATH | O_NOFOLLOW`
//! descriptor of the link itself) and character devices: reopened by path
//! at restore (files at their offset), after checking the file is still
//! the one the process had.

use std::os::unix::fs::MetadataExt as _;

use cr_ebpf_image::{FdInfo, FdKind, Manifest, ShmemKind};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// Files, directories (kind `File`) and character devices (`CharDevice`).
pub struct File;

/// `N` of a path under `/proc/N/`.
fn proc_pid(path: &str) -> Option<i32> {
    path.strip_prefix("/proc/")?.split('/').next()?.parse().ok()
}

/// Whether process `pid` is the one that started `start` clock ticks after
/// the boot of the checkpoint of `m`; else why not.
fn same_process(m: &Manifest, pid: i32, start: u64) -> Result<(), String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    if !m.process.boot_id.is_empty() && boot.trim() != m.process.boot_id.trim() {
        return Err("the machine rebooted (or is another) since the checkpoint".into());
    }
    match crate::proc::stat(pid) {
        Ok(st) if st.start_time == start => Ok(()),
        Ok(_) => Err(format!("process {pid} is another one now")),
        Err(_) => Err(format!("process {pid} is gone")),
    }
}

/// Where a descriptor of a namespace of cr-ebpf's own is reopened.
const OWN_NAMESPACE: &str = "/proc/self/ns/";

/// The kind of namespace a `/proc/PID/fd/N` link such as `net:[4026531833]`
/// names.
fn namespace_kind(link: &str) -> Option<&str> {
    let (kind, rest) = link.split_once(":[")?;
    let ino = rest.strip_suffix(']')?;
    let known = ["net", "uts", "ipc", "pid", "mnt", "user", "cgroup", "time"];
    (known.contains(&kind) && ino.bytes().all(|b| b.is_ascii_digit())).then_some(kind)
}

/// A descriptor of a namespace (`open("/proc/self/ns/net")`): one of
/// cr-ebpf's own namespaces is carried as that (a restore hands over the
/// restorer's: on this host, the same one); any other is refused.
fn namespace(cx: &mut SaveCx<'_>, seen: &Seen) -> Result<FdInfo, SaveError> {
    let kind = namespace_kind(&seen.link).unwrap_or_default();
    let own = format!("{OWN_NAMESPACE}{kind}");
    match std::fs::metadata(&own) {
        Ok(m) if m.ino() == seen.meta.ino() && m.dev() == seen.meta.dev() => {
            let mut info = seen.info(FdKind::File);
            info.path = own;
            Ok(info)
        }
        _ => Err(cx.refuse(
            seen.fd,
            format!(
                "a descriptor of a {kind} namespace other than cr-ebpf's ({})",
                seen.link
            ),
        )),
    }
}

impl Descriptor for File {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::File, FdKind::CharDevice]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        match seen.file_type() {
            libc::S_IFREG if namespace_kind(&seen.link).is_some() => Some(namespace(cx, seen)),
            libc::S_IFREG | libc::S_IFDIR | libc::S_IFLNK => {
                // A symbolic link is open only with O_PATH | O_NOFOLLOW, and
                // opened again so.
                // Deleted ones are the deleted kind's, asked first.
                if seen.link.ends_with(" (deleted)") {
                    return Some(Err(
                        cx.refuse(seen.fd, format!("deleted file {}", seen.link))
                    ));
                }
                let mut info = seen.info(FdKind::File);
                info.size = seen.meta.size();
                // A file of another process's /proc: of a process restored
                // with it (it has the same pid then), or of one outside
                // that must still be the same at restore: its start time
                // is recorded (in the size field, plus one: such files
                // have no size).
                if let Some(other) = proc_pid(&seen.link) {
                    if other != cx.pid && !cx.scope.pids.contains(&other) {
                        match crate::proc::stat(other) {
                            Ok(st) => info.size = st.start_time + 1,
                            Err(e) => {
                                return Some(Err(cx.refuse(
                                    seen.fd,
                                    format!(
                                        "{} of process {other}, which is not checkpointed \
                                         with it and cannot be read ({e})",
                                        seen.link
                                    ),
                                )))
                            }
                        }
                    }
                }
                info.mtime_ns =
                    seen.meta.mtime() as u64 * 1_000_000_000 + seen.meta.mtime_nsec() as u64;
                Some(Ok(info))
            }
            libc::S_IFCHR => {
                // Terminals are the tty kind's, asked first.
                if seen.link.ends_with(" (deleted)") {
                    return Some(Err(cx.refuse(
                        seen.fd,
                        format!("a device node that was removed ({})", seen.link),
                    )));
                }
                Some(Ok(seen.info(FdKind::CharDevice)))
            }
            _ => None,
        }
    }

    fn preflight(&self, m: &Manifest, f: &FdInfo) -> Result<(), RestoreError> {
        if f.kind != FdKind::File {
            return Ok(());
        }
        // A tmpfs file the process maps shared is written back from the
        // image before descriptors are opened.
        let rebuilt = m
            .shmem
            .iter()
            .any(|o| o.kind == ShmemKind::TmpfsFile && o.id == f.inode && o.name == f.path);
        // Files of /proc/PID of the restored processes exist once they do;
        // their inodes are new ones anyway. A namespace of the restorer's
        // own is one it has.
        if let (Some(other), true) = (proc_pid(&f.path), f.size != 0) {
            return same_process(m, other, f.size - 1).map_err(|why| RestoreError::File {
                path: f.path.clone(),
                what: format!(
                    "(open on fd {}) is of process {other}, which was not checkpointed with \
                     it: {why}",
                    f.fd
                ),
            });
        }
        if rebuilt || proc_pid(&f.path).is_some() || f.path.starts_with(OWN_NAMESPACE) {
            return Ok(());
        }
        // A descriptor of a symbolic link itself (O_NOFOLLOW): the link's.
        let meta = if f.flags as i32 & libc::O_NOFOLLOW != 0 {
            std::fs::symlink_metadata(&f.path)
        } else {
            std::fs::metadata(&f.path)
        };
        let meta = meta.map_err(|e| RestoreError::File {
            path: f.path.clone(),
            what: format!("(open on fd {}) cannot be found: {e}", f.fd),
        })?;
        let mtime = meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64;
        // A file the process only reads must be unchanged; one it may write
        // (a log, often shared with other writers) must be the same file, but
        // its size and time legitimately move on. A directory (the cwd most
        // programs hold open) changes whenever a file in it comes or goes:
        // it must be the same directory (device and inode), nothing more.
        let writable = f.flags as i32 & libc::O_ACCMODE != libc::O_RDONLY;
        let same = meta.ino() == f.inode && (f.dev == 0 || meta.dev() == f.dev);
        let changed = !same
            || (!writable && !meta.is_dir() && (meta.size() != f.size || mtime != f.mtime_ns));
        if changed {
            return Err(RestoreError::File {
                path: f.path.clone(),
                what: if meta.is_dir() {
                    format!(
                        "(a directory open on fd {}) was replaced since the checkpoint \
                         (device or inode differ): restoring would hand the process \
                         another directory",
                        f.fd
                    )
                } else {
                    format!(
                        "(open on fd {}) changed since the checkpoint (inode, size or \
                         modification time differ): restoring would hand the process a \
                         different file",
                        f.fd
                    )
                },
            });
        }
        Ok(())
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        _opts: &super::Prepare,
        shared: &mut super::Shared,
    ) -> Result<(), RestoreError> {
        super::description::prepare(fds, shared)
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        if f.desc != 0 && cx.shared.contains(FdKind::File, f.desc) {
            // One description with other descriptors: made once, handed over.
            return cx
                .adopt(cx.shared.get(FdKind::File, f.desc, 0, f.fd)?)
                .map(Some);
        }
        if f.path.starts_with(OWN_NAMESPACE) {
            // Opened here: the restored process may have namespaces of its own.
            let ns = std::fs::File::open(&f.path).map_err(|e| RestoreError::File {
                path: f.path.clone(),
                what: format!("(fd {}) cannot be opened: {e}", f.fd),
            })?;
            return cx.adopt(&std::os::fd::OwnedFd::from(ns)).map(Some);
        }
        let flags =
            f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);
        let fd = cx.sys.openat(&f.path, flags).map_err(|e| match e {
            e @ RestoreError::NotSupported(_) => e,
            e => RestoreError::File {
                path: f.path.clone(),
                what: format!("(fd {}) cannot be reopened: {e}", f.fd),
            },
        })?;
        if f.kind == FdKind::File && f.pos > 0 {
            cx.sys.seek(fd, f.pos)?;
        }
        Ok(Some(fd))
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Seek as _, os::fd::AsRawFd as _};

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_file_at_an_offset_round_trips() {
        let dir = testing::scratch("file");
        let path = dir.join("data");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        f.seek(std::io::SeekFrom::Start(4)).unwrap();
        let info = testing::save_own(f.as_raw_fd());
        assert_eq!(info.kind, FdKind::File);
        assert_eq!((info.pos, info.size), (4, 10));
        assert_eq!(info.path, path.display().to_string());
        assert!(info.cloexec);

        let m = testing::manifest(vec![info.clone()]);
        File.preflight(&m, &info).expect("the same file passes");
        let rec = testing::restore(&m);
        assert_eq!(
            rec.names(),
            [
                "openat",
                "lseek",
                "fcntl(F_DUPFD)",
                "close",
                "fcntl(F_SETFL)",
                "dup3",
                "close"
            ]
        );
        let open = rec.calls("openat")[0];
        assert_eq!(rec.string(open[1]), info.path);
        assert_eq!(open[2] as i32 & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(
            open[2] as i32 & libc::O_CLOEXEC,
            0,
            "close-on-exec comes with dup3"
        );
        assert_eq!(rec.calls("lseek")[0][1], 4);
        assert_eq!(rec.calls("fcntl(F_SETFL)")[0][2] as i32, libc::O_APPEND);
        let dup3 = rec.calls("dup3")[0];
        assert_eq!((dup3[1] as i32, dup3[2] as i32), (info.fd, libc::O_CLOEXEC));

        // Replaced since: refused before anything starts.
        std::fs::write(dir.join("new"), b"0123456789").unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        assert!(File.preflight(&m, &info).is_err());
    }

    #[test]
    fn a_descriptor_of_a_symbolic_link_itself_round_trips() {
        let dir = testing::scratch("symlink");
        std::fs::write(dir.join("target"), b"x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        let c = std::ffi::CString::new(link.display().to_string()).unwrap();
        // SAFETY: open of a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let info = testing::save_own(fd.as_raw_fd());
        assert_eq!(info.kind, FdKind::File);
        assert_eq!(info.path, link.display().to_string());
        let m = testing::manifest(vec![info.clone()]);
        File.preflight(&m, &info)
            .expect("the link itself, not its target");
        let rec = testing::restore(&m);
        let open = rec.calls("openat")[0];
        assert_eq!(rec.string(open[1]), info.path);
        assert_ne!(open[2] as i32 & libc::O_NOFOLLOW, 0);
        assert_ne!(open[2] as i32 & libc::O_PATH, 0);
        // Pointed elsewhere since: another link, refused.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(dir.join("other"), &link).unwrap();
        assert!(File.preflight(&m, &info).is_err());
    }

    #[test]
    fn files_of_proc_of_processes_outside_must_be_of_the_same_process_at_restore() {
        assert_eq!(proc_pid("/proc/42/maps"), Some(42));
        assert_eq!(proc_pid("/proc/self/maps"), None);
        assert_eq!(proc_pid("/etc/passwd"), None);
        let parent = std::os::unix::process::parent_id() as i32;
        let f = std::fs::File::open(format!("/proc/{parent}/stat")).unwrap();
        let mut owner = testing::SaveOwner::new();
        let info = File
            .save(&mut owner.cx(), &testing::seen(f.as_raw_fd()))
            .unwrap()
            .unwrap();
        let start = crate::proc::stat(parent).unwrap().start_time;
        assert_eq!(info.size, start + 1, "its start time is recorded");
        let m = testing::manifest(vec![info.clone()]);
        File.preflight(&m, &info).expect("the same process");
        let other = FdInfo {
            size: start + 2,
            ..info.clone()
        };
        let err = File.preflight(&m, &other).unwrap_err().to_string();
        assert!(err.contains("is another one now"), "{err}");
        let own = std::fs::File::open("/proc/self/status").unwrap();
        let info = testing::save_own(own.as_raw_fd());
        assert_eq!(info.size, 0);
        File.preflight(&testing::manifest(vec![info.clone()]), &info)
            .expect("its own /proc files exist once it does");
    }

    #[test]
    fn a_device_is_reopened_without_a_seek() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let info = testing::save_own(f.as_raw_fd());
        assert_eq!(info.kind, FdKind::CharDevice);
        let rec = testing::restore(&testing::manifest(vec![info]));
        assert!(rec.calls("lseek").is_empty());
        assert_eq!(rec.string(rec.calls("openat")[0][1]), "/dev/null");
    }

    #[test]
    fn a_directory_is_checked_for_identity_not_for_its_contents() {
        let dir = testing::scratch("dir");
        let d = std::fs::File::open(&*dir).unwrap();
        let info = testing::save_own(d.as_raw_fd());
        assert_eq!(info.kind, FdKind::File);
        let m = testing::manifest(vec![info.clone()]);
        // Files come and go in it: still the same directory.
        std::fs::write(dir.join("new"), b"x").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        File.preflight(&m, &info)
            .expect("a directory that gained files");
        // Replaced by another directory at the same path: refused.
        let other = testing::scratch("dir-other");
        std::fs::remove_dir_all(&*dir).unwrap();
        std::fs::rename(&*other, &*dir).unwrap();
        let err = File.preflight(&m, &info).unwrap_err();
        assert!(err.to_string().contains("a directory open on fd"), "{err}");
        drop(other);
    }

    #[test]
    fn a_descriptor_of_our_own_namespace_is_reopened_as_ours() {
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let info = testing::save_own(ns.as_raw_fd());
        assert_eq!(info.path, "/proc/self/ns/net");
        let m = testing::manifest(vec![info.clone()]);
        File.preflight(&m, &info).expect("ours exists here");
        assert_eq!(namespace_kind("time:[4026531834]"), Some("time"));
        assert_eq!(namespace_kind("/tmp/net:[1]"), None);
        assert_eq!(namespace_kind("pipe:[1]"), None);
    }
}
