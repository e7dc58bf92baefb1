//! fanotify groups: their flags and marks (on files, found again from the
//! kernel's file handle in fdinfo and checked by inode at restore, and on
//! mounts, by mount point), rebuilt in the restorer and handed over. A
//! group with events waiting to be read, or with a mark on a whole
//! filesystem, is refused.

use std::os::fd::{AsRawFd as _, OwnedFd};

use cr_ebpf_image::{Fanotify as Group, FanotifyMark, FdInfo, FdKind, FdState, MarkOn};

use super::{inotify::marked_file, owned, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// `FAN_MARK_ADD`, `FAN_MARK_MOUNT`, `FAN_MARK_IGNORED_MASK`.
const FAN_MARK_ADD: u32 = 0x1;
const FAN_MARK_MOUNT: u32 = 0x10;
const FAN_MARK_IGNORED_MASK: u32 = 0x20;
#[cfg(test)]
const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x40;

/// A fanotify group.
pub struct Fanotify;

impl Descriptor for Fanotify {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Fanotify]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[fanotify]") {
            return None;
        }
        Some((|| {
            let ours = cx.dup(seen.fd)?;
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            let r = unsafe { libc::ioctl(ours.as_raw_fd(), libc::FIONREAD, &mut n) };
            if r < 0 || n != 0 {
                return Err(cx.refuse(
                    seen.fd,
                    "a fanotify group with events waiting to be read (their descriptors \
                     cannot be made again)",
                ));
            }
            let g = parse(&seen.fdinfo, cx.pid).map_err(|e| cx.refuse(seen.fd, e))?;
            let mut info = seen.info(FdKind::Fanotify);
            info.state = FdState::Fanotify(Box::new(g));
            Ok(info)
        })())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Fanotify(g) = &f.state else {
            return Err(RestoreError::NotSupported(format!(
                "fanotify group {} without its state",
                f.fd
            )));
        };
        let fd = rebuild(g)?;
        cx.adopt(&fd).map(Some)
    }
}

/// A hex field `key` of an fdinfo line.
fn hex(line: &str, key: &str) -> Result<u64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| format!("no {key} in the fanotify line {line:?}"))
}

/// The group an fdinfo text describes, marks found in process `pid`'s
/// mounts.
fn parse(fdinfo: &str, pid: i32) -> Result<Group, String> {
    let mut g = Group::default();
    for line in fdinfo.lines() {
        let Some(rest) = line.strip_prefix("fanotify ") else {
            continue;
        };
        if rest.starts_with("flags:") {
            g.flags = hex(line, "flags:")? as u32;
            g.event_flags = hex(line, "event-flags:")? as u32;
            continue;
        }
        let (flags, mask, ignored) = (
            hex(line, "mflags:")? as u32,
            hex(line, "mask:")? as u32,
            hex(line, "ignored_mask:")? as u32,
        );
        let mark = if rest.starts_with("ino:") {
            let (path, ino, dev) =
                marked_file(line).map_err(|e| format!("the file of a fanotify mark: {e}"))?;
            if path.ends_with(" (deleted)") {
                return Err(format!("a fanotify mark on a deleted file ({path})"));
            }
            FanotifyMark {
                on: MarkOn::Inode,
                path,
                ino,
                dev,
                flags,
                mask,
                ignored,
            }
        } else if rest.starts_with("mnt_id:") {
            let id = hex(line, "mnt_id:")?;
            FanotifyMark {
                on: MarkOn::Mount,
                path: mount_point(pid, id)?,
                flags,
                mask,
                ignored,
                ..FanotifyMark::default()
            }
        } else {
            return Err(format!("a fanotify mark on a whole filesystem ({line})"));
        };
        g.marks.push(mark);
    }
    Ok(g)
}

/// The mount point of mount `id` of process `pid`.
fn mount_point(pid: i32, id: u64) -> Result<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map_err(|e| format!("/proc/{pid}/mountinfo: {e}"))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()?.parse::<u64>().ok()? == id).then(|| f.nth(3).map(str::to_string))?
        })
        .ok_or_else(|| format!("mount {id} of a fanotify mark is not in its mountinfo"))
}

/// A group made again with `g`'s flags and marks.
fn rebuild(g: &Group) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::MetadataExt as _;
    // Made blocking: the stub sets its status flags as saved.
    let init = g.flags & !(libc::FAN_CLOEXEC | libc::FAN_NONBLOCK);
    // SAFETY: plain syscall.
    let fd = owned(
        unsafe { libc::fanotify_init(init | libc::FAN_CLOEXEC, g.event_flags) },
        "fanotify_init",
    )?;
    // fdinfo lists the newest mark first: added oldest first, they list
    // in the same order again.
    for m in g.marks.iter().rev() {
        if m.on == MarkOn::Inode {
            let meta = std::fs::metadata(&m.path).map_err(|e| RestoreError::File {
                path: m.path.clone(),
                what: format!("(marked by fanotify) is gone: {e}"),
            })?;
            if meta.ino() != m.ino || meta.dev() != m.dev {
                return Err(RestoreError::File {
                    path: m.path.clone(),
                    what: "(marked by fanotify) was replaced since the checkpoint".into(),
                });
            }
        }
        let on = if m.on == MarkOn::Mount {
            FAN_MARK_MOUNT
        } else {
            0
        };
        let path = std::ffi::CString::new(m.path.as_bytes()).map_err(|_| {
            RestoreError::NotSupported(format!("a fanotify path with a NUL: {}", m.path))
        })?;
        for (extra, mask) in [(0, m.mask), (FAN_MARK_IGNORED_MASK, m.ignored)] {
            if mask == 0 {
                continue;
            }
            // SAFETY: our group and a NUL-terminated path.
            let r = unsafe {
                libc::fanotify_mark(
                    fd.as_raw_fd(),
                    FAN_MARK_ADD | on | extra | m.flags,
                    mask as u64,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                )
            };
            if r < 0 {
                return Err(RestoreError::File {
                    path: m.path.clone(),
                    what: format!(
                        "(marked by fanotify) cannot be marked again: {}",
                        std::io::Error::last_os_error()
                    ),
                });
            }
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::testing;

    #[test]
    fn marks_on_a_file_and_a_mount_come_back() {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC, 0) };
        if fd < 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "fanotify needs root"
            );
            eprintln!(
                "skipped: fanotify_init: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let dir = testing::scratch("fanotify");
        let file = dir.join("watched");
        std::fs::write(&file, b"x").unwrap();
        let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
        let root = c"/";
        // SAFETY: our group, NUL-terminated paths.
        unsafe {
            assert_eq!(
                libc::fanotify_mark(
                    fd,
                    FAN_MARK_ADD,
                    libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE,
                    libc::AT_FDCWD,
                    c.as_ptr()
                ),
                0
            );
            assert_eq!(
                // Surviving modification: without it any write on the
                // root mount (a build running beside the test) clears the
                // ignored mask of either group between the two reads.
                libc::fanotify_mark(
                    fd,
                    FAN_MARK_ADD
                        | FAN_MARK_MOUNT
                        | FAN_MARK_IGNORED_MASK
                        | FAN_MARK_IGNORED_SURV_MODIFY,
                    libc::FAN_ACCESS,
                    libc::AT_FDCWD,
                    root.as_ptr()
                ),
                0
            );
        }
        let me = std::process::id() as i32;
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let g = parse(&text, me).unwrap();
        assert_eq!(g.marks.len(), 2, "{g:?}");
        let made = rebuild(&g).unwrap();
        let again =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", made.as_raw_fd())).unwrap();
        let g2 = parse(&again, me).unwrap();
        assert_eq!(g2, g);
        // A file replaced since: refused.
        std::fs::write(dir.join("other"), b"y").unwrap();
        std::fs::rename(dir.join("other"), &file).unwrap();
        let err = rebuild(&g).unwrap_err().to_string();
        assert!(err.contains("replaced") || err.contains("gone"), "{err}");
        // SAFETY: closing our descriptor.
        unsafe { libc::close(fd) };
    }
}
