//! File locks (`flock`, POSIX record locks, OFD locks). `/proc/PID/fdinfo`
//! lists, for each descriptor, the locks held through it (`lock:` lines;
//! other processes' locks on the same file are not listed). They are not
//! restored yet: a descriptor holding one is refused at checkpoint time,
//! naming the lock, while the process keeps running. (A thread blocked
//! waiting for a lock is in its syscall, which the restore redoes.)

use super::{SaveCx, Seen};
use crate::SaveError;

/// The kind, mode and range of the first lock held through `seen`, as
/// fdinfo words (`FLOCK ADVISORY WRITE`, ...).
fn held(fdinfo: &str) -> Option<String> {
    let line = fdinfo.lines().find(|l| l.starts_with("lock:"))?;
    // lock:	1: FLOCK  ADVISORY  WRITE 13391 fe:00:10035309 0 EOF
    let w: Vec<&str> = line.split_whitespace().collect();
    Some(format!(
        "{} {} lock, {}, bytes {}-{}",
        w.get(2).copied().unwrap_or("?"),
        w.get(4).copied().unwrap_or("?").to_lowercase(),
        w.get(3).copied().unwrap_or("?").to_lowercase(),
        w.get(7).copied().unwrap_or("?"),
        w.get(8).copied().unwrap_or("?"),
    ))
}

/// Refuses a descriptor through which a lock is held.
pub fn refuse_held(cx: &SaveCx<'_>, seen: &Seen) -> Result<(), SaveError> {
    match held(&seen.fdinfo) {
        Some(lock) => Err(cx.refuse(
            seen.fd,
            format!(
                "a file lock held through it ({lock} on {}): file locks are not restored yet, \
                 and another process could take it while this one is down",
                seen.link
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_held_lock_of_each_kind_is_refused() {
        let dir = testing::scratch("locks");
        let f = std::fs::File::create(dir.join("a")).unwrap();
        let mut owner = testing::SaveOwner::new();
        refuse_held(&owner.cx(), &testing::seen(f.as_raw_fd())).expect("no lock yet");
        // SAFETY: flock on our own descriptor.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        let err = refuse_held(&owner.cx(), &testing::seen(f.as_raw_fd())).unwrap_err();
        assert!(err.to_string().contains("FLOCK write lock"), "{err}");
        assert_eq!(
            held("lock:\t1: POSIX  ADVISORY  READ 77 fe:00:12 100 199\n").as_deref(),
            Some("POSIX read lock, advisory, bytes 100-199")
        );
        assert!(held("pos:\t0\nflags:\t02\n").is_none());
        assert!(held("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1 0 EOF\n")
            .unwrap()
            .starts_with("OFDLCK write"));
    }
}
