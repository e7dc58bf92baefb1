//! pidfds: the process they refer to, from fdinfo; opened again on the
//! same pid (which a tree restore gives back) and handed over.

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{owned, unreadable, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// A pidfd.
pub struct Pidfd;

impl Descriptor for Pidfd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Pidfd]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[pidfd]") {
            return None;
        }
        Some(
            match seen.field("Pid:").and_then(|v| v.parse::<i32>().ok()) {
                Some(pid) if pid > 0 => {
                    let mut info = seen.info(FdKind::Pidfd);
                    info.state = FdState::Pidfd { pid };
                    Ok(info)
                }
                Some(_) => Err(cx.refuse(seen.fd, "a pidfd of a process that has exited")),
                None => Err(unreadable(cx, seen, "pidfd's process")),
            },
        )
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Pidfd { pid } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "pidfd {} without its state",
                f.fd
            )));
        };
        // SAFETY: plain syscall.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
        if fd < 0 {
            return Err(RestoreError::NotSupported(format!(
                "a pidfd of process {pid}, which does not exist here: {}",
                std::io::Error::last_os_error()
            )));
        }
        let fd = owned(fd, "pidfd_open")?;
        cx.adopt(&fd).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_pidfd_of_a_live_process_round_trips() {
        let me = std::process::id() as i32;
        // SAFETY: plain syscall.
        let fd = owned(
            unsafe { libc::syscall(libc::SYS_pidfd_open, me, 0) } as i32,
            "pidfd_open",
        )
        .unwrap();
        let info = testing::save_own(fd.as_raw_fd());
        assert_eq!(info.state, FdState::Pidfd { pid: me });
        assert_eq!(testing::rebuilt_state(&Pidfd, &info), info.state);
        // A process that is gone is refused at checkpoint time.
        let seen = Seen {
            fdinfo: "pos:\t0\nPid:\t-1\nNSpid:\t-1\n".into(),
            ..testing::seen(fd.as_raw_fd())
        };
        let mut owner = testing::SaveOwner::new();
        assert!(Pidfd.save(&mut owner.cx(), &seen).unwrap().is_err());
    }
}
