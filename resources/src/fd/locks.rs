//! File locks (`flock`, POSIX record locks, OFD locks). `/proc/PID/fdinfo`
//! lists, for each descriptor, the locks held through it (`lock:` lines;
//! other processes' locks on the same file are not listed): each is saved
//! once, with one descriptor it is held through, and taken again through
//! that descriptor once every descriptor of the restored process has its
//! number, before the process runs. A lock another process took while this
//! one was down fails the restore, naming it. Leases (`F_SETLEASE`) are
//! taken again too, and a lease being broken is taken again and broken
//! again the same way (the break's signal, which the process has had
//! already, is taken back out of the restored process's queue); delegations
//! are refused. (A thread blocked waiting for a lock is in its syscall,
//! which the restore redoes.)

use cr_ebpf_image::{FileLock, LockKind};

use super::{description::same_description, SaveCx, Seen};
use crate::{sys::Sys, RestoreError, SaveError};

/// `F_OFD_SETLK`.
const F_OFD_SETLK: u64 = 37;
/// `F_SETOWN_EX`, `F_GETOWN_EX`.
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;

/// One `lock:` line of fdinfo of descriptor `fd` (opened read-only when
/// `readonly`): the lock and its file (`dev:ino`), or why it cannot be
/// saved.
fn parse(fd: i32, readonly: bool, line: &str) -> Result<(FileLock, String), String> {
    // lock:	1: POSIX  ADVISORY  WRITE 13391 fe:00:10035310 100 199
    let w: Vec<&str> = line.split_whitespace().collect();
    let bad = || format!("an unreadable lock line {line:?}");
    let kind = match *w.get(2).ok_or_else(bad)? {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "LEASE" => LockKind::Lease,
        other => return Err(format!("a {} held through it", other.to_lowercase())),
    };
    let (kind, write) = match (kind, w.get(3).copied(), w.get(4).copied()) {
        (LockKind::Lease, Some("ACTIVE"), Some("WRITE")) => (kind, true),
        (LockKind::Lease, Some("ACTIVE"), Some("READ")) => (kind, false),
        // A lease being broken shows the type it is being broken to: a
        // write lease down to read, or any lease (a read lease can only be
        // held through a read-only descriptor) down to nothing.
        (LockKind::Lease, Some("BREAKING"), Some("READ")) => (LockKind::LeaseBreakingToRead, true),
        (LockKind::Lease, Some("BREAKING"), Some("UNLCK")) => {
            (LockKind::LeaseBreakingToNone, !readonly)
        }
        (LockKind::Lease, state, ty) => {
            return Err(format!(
                "a lease in state {} of type {}",
                state.unwrap_or("?"),
                ty.unwrap_or("?")
            ))
        }
        (_, Some("ADVISORY"), Some("WRITE")) => (kind, true),
        (_, Some("ADVISORY"), Some("READ")) => (kind, false),
        (_, Some("ADVISORY"), ty) => {
            return Err(format!("a file lock of type {}", ty.unwrap_or("?")))
        }
        (_, state, _) => {
            return Err(format!(
                "a {} file lock",
                state.unwrap_or("?").to_lowercase()
            ))
        }
    };
    let file = w.get(6).ok_or_else(bad)?.to_string();
    let start: u64 = w.get(7).and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let len = match *w.get(8).ok_or_else(bad)? {
        "EOF" => 0,
        end => end
            .parse::<u64>()
            .ok()
            .and_then(|e| (e + 1).checked_sub(start))
            .ok_or_else(bad)?,
    };
    Ok((
        FileLock {
            fd,
            kind,
            write,
            start,
            len,
        },
        file,
    ))
}

/// The locks held through `seen` not already saved (through another
/// descriptor of the same file, and for `flock` and OFD locks of the same
/// open file description) in `saved`, whose files `files` names.
pub(super) fn save(
    cx: &SaveCx<'_>,
    seen: &Seen,
    saved: &mut Vec<FileLock>,
    files: &mut Vec<String>,
) -> Result<(), SaveError> {
    let lines = seen
        .fdinfo
        .lines()
        .filter(|l| l.starts_with("lock:") && !l.contains("->"));
    for line in lines {
        let readonly = seen.flags as i32 & libc::O_ACCMODE == libc::O_RDONLY;
        let (lock, file) = parse(seen.fd, readonly, line).map_err(|e| cx.refuse(seen.fd, e))?;
        if lock.kind != LockKind::Posix {
            refuse_shared(cx, seen, line)?;
        }
        let same = saved.iter().zip(files.iter()).any(|(o, f)| {
            *f == file
                && (o.kind, o.write, o.start, o.len)
                    == (lock.kind, lock.write, lock.start, lock.len)
                && (lock.kind == LockKind::Posix || same_description(cx.pid, o.fd, cx.pid, lock.fd))
        });
        if !same {
            saved.push(lock);
            files.push(file);
        }
    }
    Ok(())
}

/// An `flock` or OFD lock belongs to the open file description, which
/// each restored process gets its own of: one shared with another process
/// (inherited across fork) would be held twice, or conflict with itself,
/// after a restore. Refused: a description of another process of the
/// checkpoint, or a lock taken by a process outside it.
fn refuse_shared(cx: &SaveCx<'_>, seen: &Seen, line: &str) -> Result<(), SaveError> {
    let owner: i32 = line
        .split_whitespace()
        .nth(5)
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let ours = |p: i32| p == cx.pid || cx.scope.pids.contains(&p);
    if owner > 0 && !ours(owner) {
        return Err(cx.refuse(
            seen.fd,
            format!(
                "a file lock on {} taken by process {owner}, which is not checkpointed with it \
                 (a description inherited across fork)",
                seen.link
            ),
        ));
    }
    // A regular file's description shared across fork comes back as one
    // (see the description module), with its lock.
    let one_again = seen.file_type() == libc::S_IFREG
        && seen.link.starts_with('/')
        && !seen.link.starts_with("/proc/")
        && !seen.link.ends_with(" (deleted)");
    if one_again {
        return Ok(());
    }
    for &other in cx.scope.pids.iter().filter(|&&p| p != cx.pid) {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(ofd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let same_path =
                std::fs::read_link(e.path()).is_ok_and(|l| l.display().to_string() == seen.link);
            if same_path && same_description(cx.pid, seen.fd, other, ofd) {
                return Err(cx.refuse(
                    seen.fd,
                    format!(
                        "a file lock on {} held through a description shared with fd {ofd} of \
                         process {other}: each would be restored with its own",
                        seen.link
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Takes every lock of `locks` in the process being built.
pub fn restore(
    sys: &dyn Sys,
    locks: &[FileLock],
    path_of: impl Fn(i32) -> String,
) -> Result<(), RestoreError> {
    for l in locks {
        let r = match l.kind {
            LockKind::Flock => {
                let op = if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB;
                sys.call(
                    "flock",
                    libc::SYS_flock,
                    [l.fd as u64, op as u64, 0, 0, 0, 0],
                )
            }
            LockKind::Posix | LockKind::Ofd => {
                // struct flock: short l_type, l_whence; long l_start, l_len; int l_pid.
                let mut f = [0u8; 32];
                let ty = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                } as i16;
                f[0..2].copy_from_slice(&ty.to_le_bytes());
                f[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_le_bytes());
                f[8..16].copy_from_slice(&l.start.to_le_bytes());
                f[16..24].copy_from_slice(&l.len.to_le_bytes());
                let at = sys.put(0, &f)?;
                let (name, cmd) = match l.kind {
                    LockKind::Ofd => ("fcntl(F_OFD_SETLK)", F_OFD_SETLK),
                    _ => ("fcntl(F_SETLK)", libc::F_SETLK as u64),
                };
                sys.call(name, libc::SYS_fcntl, [l.fd as u64, cmd, at, 0, 0, 0])
            }
            LockKind::Lease | LockKind::LeaseBreakingToRead | LockKind::LeaseBreakingToNone => {
                let ty = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                sys.call(
                    "fcntl(F_SETLEASE)",
                    libc::SYS_fcntl,
                    [l.fd as u64, libc::F_SETLEASE as u64, ty as u64, 0, 0, 0],
                )
                .and_then(|r| break_again(sys, l).map(|()| r))
            }
            LockKind::Invalid => unreachable!("refused when the image was read"),
        };
        r.map_err(|e| {
            RestoreError::NotSupported(format!(
                "the {:?} {} lock on {} (fd {}) cannot be taken again: {e} (another \
                 process took it while this one was down?)",
                l.kind,
                if l.write { "write" } else { "read" },
                path_of(l.fd),
                l.fd
            ))
        })?;
    }
    Ok(())
}

/// Starts breaking lease `l`, just taken again, as it was being broken:
/// the process opens its file again through `/proc/self/fd` without
/// blocking (`EWOULDBLOCK`: the break has begun), the way that breaks it to
/// the same type, with the file's owner unset meanwhile; then the break's
/// signal, which the process had at the break before the checkpoint, is
/// taken out of its queue in case the kernel made it the owner (its own
/// pending signals are queued after the descriptors).
fn break_again(sys: &dyn Sys, l: &FileLock) -> Result<(), RestoreError> {
    let mode = match l.kind {
        LockKind::LeaseBreakingToRead => libc::O_RDONLY,
        LockKind::LeaseBreakingToNone => libc::O_WRONLY,
        _ => return Ok(()),
    };
    let path = format!("/proc/self/fd/{}", l.fd);
    // No owner while it breaks (the owner restored before would get the
    // signal), then the owner it has again.
    let owner = sys.put(64, &[0; 8])?;
    let fcntl = |name: &str, cmd: i32, arg: u64| {
        sys.call(
            name,
            libc::SYS_fcntl,
            [l.fd as u64, cmd as u64, arg, 0, 0, 0],
        )
    };
    fcntl("fcntl(F_GETOWN_EX)", F_GETOWN_EX, owner)?;
    let none = sys.put(72, &[0; 8])?;
    fcntl("fcntl(F_SETOWN_EX)", F_SETOWN_EX, none)?;
    match sys.openat(&path, mode | libc::O_NONBLOCK | libc::O_CLOEXEC) {
        Err(RestoreError::Syscall { err, .. }) if err.raw_os_error() == Some(libc::EWOULDBLOCK) => {
        }
        Ok(fd) => {
            sys.close(fd)?;
            return Err(RestoreError::NotSupported(format!(
                "the lease on fd {} was taken again but opening its file did not break it",
                l.fd
            )));
        }
        Err(e) => return Err(e),
    }
    fcntl("fcntl(F_SETOWN_EX)", F_SETOWN_EX, owner)?;
    let sig = match sys.call(
        "fcntl(F_GETSIG)",
        libc::SYS_fcntl,
        [l.fd as u64, super::async_io::F_GETSIG as u64, 0, 0, 0, 0],
    )? {
        0 => libc::SIGIO,
        s => s as i32,
    };
    let set: u64 = 1 << (sig - 1);
    let at = sys.put(0, &[set.to_le_bytes(), [0; 8], [0; 8]].concat())?;
    // A signal of the real-time range queues once per break; the rest once.
    for _ in 0..64 {
        let got = sys.call(
            "rt_sigtimedwait",
            libc::SYS_rt_sigtimedwait,
            [at, 0, at + 8, 8, 0, 0],
        );
        match got {
            Ok(_) => continue,
            Err(RestoreError::Syscall { err, .. }) if err.raw_os_error() == Some(libc::EAGAIN) => {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::{fd::testing, sys::fake::Recording};

    #[test]
    fn lock_lines_of_this_kernel_parse() {
        let (l, f) = parse(
            3,
            false,
            "lock:\t1: FLOCK  ADVISORY  WRITE 13391 fe:00:10035309 0 EOF",
        )
        .unwrap();
        assert_eq!(
            (l.kind, l.write, l.start, l.len, f.as_str()),
            (LockKind::Flock, true, 0, 0, "fe:00:10035309")
        );
        let (l, _) = parse(
            4,
            false,
            "lock:\t1: POSIX  ADVISORY  READ 77 fe:00:12 100 199",
        )
        .unwrap();
        assert_eq!(
            (l.kind, l.write, l.start, l.len),
            (LockKind::Posix, false, 100, 100)
        );
        let (l, _) = parse(
            5,
            false,
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1 0 EOF",
        )
        .unwrap();
        assert_eq!(l.kind, LockKind::Ofd);
        let (l, _) = parse(5, false, "lock:\t1: LEASE  ACTIVE    READ 77 fe:00:1 0 EOF").unwrap();
        assert_eq!(
            (l.kind, l.write, l.start, l.len),
            (LockKind::Lease, false, 0, 0)
        );
        let (l, _) = parse(5, true, "lock:\t1: LEASE  BREAKING  READ  77 fe:00:1 0 EOF").unwrap();
        assert_eq!((l.kind, l.write), (LockKind::LeaseBreakingToRead, true));
        let (l, _) = parse(5, true, "lock:\t1: LEASE  BREAKING  UNLCK 77 fe:00:1 0 EOF").unwrap();
        assert_eq!((l.kind, l.write), (LockKind::LeaseBreakingToNone, false));
        let (l, _) = parse(
            5,
            false,
            "lock:\t1: LEASE  BREAKING  UNLCK 77 fe:00:1 0 EOF",
        )
        .unwrap();
        assert_eq!((l.kind, l.write), (LockKind::LeaseBreakingToNone, true));
        assert!(
            parse(5, false, "lock:\t1: DELEG  ACTIVE    READ 77 fe:00:1 0 EOF")
                .unwrap_err()
                .contains("deleg")
        );
        assert!(parse(
            5,
            false,
            "lock:\t1: POSIX  MANDATORY WRITE 77 fe:00:1 0 EOF"
        )
        .is_err());
    }

    #[test]
    fn locks_of_the_process_are_saved_once_and_taken_again() {
        let dir = testing::scratch("locks");
        let f = std::fs::File::create(dir.join("a")).unwrap();
        let dup = f.try_clone().unwrap();
        // SAFETY: flock on our own descriptor.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        let mut owner = testing::SaveOwner::new();
        let cx = owner.cx();
        let (mut saved, mut files) = (Vec::new(), Vec::new());
        for fd in [f.as_raw_fd(), dup.as_raw_fd()] {
            save(&cx, &testing::seen(fd), &mut saved, &mut files).unwrap();
        }
        assert_eq!(saved.len(), 1, "one lock, seen through two descriptors");
        assert_eq!(
            (saved[0].fd, saved[0].kind, saved[0].write),
            (f.as_raw_fd(), LockKind::Flock, true)
        );
        let rec = Recording::new();
        restore(&rec, &saved, |_| "a".into()).unwrap();
        let c = rec.calls("flock")[0];
        assert_eq!(
            (c[0] as i32, c[1] as i32),
            (f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)
        );
        let posix = [FileLock {
            fd: 9,
            kind: LockKind::Posix,
            write: false,
            start: 10,
            len: 5,
        }];
        let rec = Recording::new();
        restore(&rec, &posix, |_| "b".into()).unwrap();
        let c = rec.calls("fcntl(F_SETLK)")[0];
        let fl = rec.memory("fcntl(F_SETLK)", 0, c[2], 32);
        assert_eq!(i16::from_le_bytes([fl[0], fl[1]]), libc::F_RDLCK as i16);
        assert_eq!(u64::from_le_bytes(fl[8..16].try_into().unwrap()), 10);
        assert_eq!(u64::from_le_bytes(fl[16..24].try_into().unwrap()), 5);
        // Taken by someone else meanwhile: named.
        let rec = Recording::new();
        rec.fail("flock", libc::EWOULDBLOCK);
        let err = restore(&rec, &saved, |_| "/x/a".into()).unwrap_err();
        assert!(err.to_string().contains("/x/a"), "{err}");
    }

    #[test]
    fn a_lease_is_taken_again_with_f_setlease() {
        let rec = crate::sys::fake::Recording::new();
        let lease = FileLock {
            fd: 5,
            kind: LockKind::Lease,
            write: true,
            start: 0,
            len: 0,
        };
        restore(&rec, &[lease], |_| "/f".into()).unwrap();
        assert_eq!(
            rec.calls("fcntl(F_SETLEASE)")[0][..3],
            [5, libc::F_SETLEASE as u64, libc::F_WRLCK as u64]
        );
    }

    #[test]
    fn a_lease_being_broken_is_broken_again_without_a_signal_to_its_owner() {
        let lease = FileLock {
            fd: 6,
            kind: LockKind::LeaseBreakingToNone,
            write: false,
            start: 0,
            len: 0,
        };
        let rec = Recording::new();
        rec.fail("openat", libc::EWOULDBLOCK);
        rec.fail("rt_sigtimedwait", libc::EAGAIN);
        restore(&rec, &[lease], |_| "/f".into()).unwrap();
        assert_eq!(
            rec.names(),
            [
                "fcntl(F_SETLEASE)",
                "fcntl(F_GETOWN_EX)",
                "fcntl(F_SETOWN_EX)",
                "openat",
                "fcntl(F_SETOWN_EX)",
                "fcntl(F_GETSIG)",
                "rt_sigtimedwait"
            ]
        );
        assert_eq!(rec.calls("fcntl(F_SETLEASE)")[0][2], libc::F_RDLCK as u64);
        let open = rec.calls("openat")[0];
        assert_eq!(
            open[2] as i32 & libc::O_ACCMODE,
            libc::O_WRONLY,
            "broken by a writer"
        );
        let sets = rec.calls("fcntl(F_SETOWN_EX)");
        assert_eq!(rec.memory("fcntl(F_SETOWN_EX)", 0, sets[0][2], 8), [0; 8]);
        // Down to read: a write lease, broken by a reader.
        let rec = Recording::new();
        rec.fail("openat", libc::EWOULDBLOCK);
        rec.fail("rt_sigtimedwait", libc::EAGAIN);
        let down = FileLock {
            kind: LockKind::LeaseBreakingToRead,
            write: true,
            ..lease
        };
        restore(&rec, &[down], |_| "/f".into()).unwrap();
        assert_eq!(rec.calls("fcntl(F_SETLEASE)")[0][2], libc::F_WRLCK as u64);
        assert_eq!(
            rec.calls("openat")[0][2] as i32 & libc::O_ACCMODE,
            libc::O_RDONLY
        );
        // An open that does not block broke nothing: an error.
        let rec = Recording::new();
        let err = restore(&rec, &[lease], |_| "/f".into()).unwrap_err();
        assert!(err.to_string().contains("did not break it"), "{err}");
    }
}
