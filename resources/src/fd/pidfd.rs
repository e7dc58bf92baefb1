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
                // Exited and reaped: its exit status, which the pidfd still
                // tells (PIDFD_GET_INFO), comes back with a process made to
                // end the same way.
                Some(_) => match cx.dup(seen.fd).ok().and_then(|d| exit_status(&d)) {
                    Some(status) => {
                        let mut info = seen.info(FdKind::Pidfd);
                        info.state = FdState::Pidfd { pid: DEAD };
                        info.size = status as u32 as u64;
                        Ok(info)
                    }
                    None => Err(cx.refuse(
                        seen.fd,
                        "a pidfd of a process that has exited (its exit status cannot be read \
                         on this kernel: PIDFD_GET_INFO, Linux 6.15+)",
                    )),
                },
                None => Err(unreadable(cx, seen, "pidfd's process")),
            },
        )
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        _opts: &super::Prepare,
        shared: &mut super::Shared,
    ) -> Result<(), RestoreError> {
        for f in fds {
            if f.state != (FdState::Pidfd { pid: DEAD }) || shared.contains(FdKind::Pidfd, f.inode)
            {
                continue;
            }
            shared.insert(FdKind::Pidfd, f.inode, 0, dead(f.size as u32 as i32)?);
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Pidfd { pid } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "pidfd {} without its state",
                f.fd
            )));
        };
        if pid == DEAD {
            return cx
                .adopt(cx.shared.get(FdKind::Pidfd, f.inode, 0, f.fd)?)
                .map(Some);
        }
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

/// The pid of a pidfd whose process has exited and was reaped (format 1.8;
/// its wait status in [`FdInfo::size`], its pidfs inode in
/// [`FdInfo::inode`]: pidfds of one process share it).
pub const DEAD: i32 = -1;

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)`, 72 bytes asked.
const PIDFD_GET_INFO: u64 = 3 << 30 | 72 << 16 | 0xFF << 8 | 11;
/// `PIDFD_INFO_EXIT`: the exit status is wanted, and known.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// The wait status of the exited process of `pidfd`, when the kernel says.
fn exit_status(pidfd: &std::os::fd::OwnedFd) -> Option<i32> {
    use std::os::fd::AsRawFd as _;
    let mut info = [0u8; 72];
    info[..8].copy_from_slice(&PIDFD_INFO_EXIT.to_ne_bytes());
    // SAFETY: the kernel writes at most the 72 bytes the request names.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, info.as_mut_ptr()) };
    let mask = u64::from_ne_bytes(info[..8].try_into().expect("8"));
    (r == 0 && mask & PIDFD_INFO_EXIT != 0)
        .then(|| i32::from_ne_bytes(info[60..64].try_into().expect("4")))
}

/// A pidfd of a new process that ended with wait status `status` (killed
/// by the same signal, or exited with the same code), reaped here.
fn dead(status: i32) -> Result<std::os::fd::OwnedFd, RestoreError> {
    // SAFETY: the child only makes async-signal-safe calls.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: ending this child as the original ended.
        unsafe {
            if libc::WIFSIGNALED(status) {
                libc::signal(libc::WTERMSIG(status), libc::SIG_DFL);
                libc::kill(libc::getpid(), libc::WTERMSIG(status));
            }
            libc::_exit(libc::WEXITSTATUS(status));
        }
    }
    if child < 0 {
        return Err(RestoreError::Syscall {
            call: "fork (a process for a pidfd of one that exited)".into(),
            err: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: plain syscall on our child (a zombie at worst: not reaped yet).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) } as libc::c_int;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
    owned(fd, "pidfd_open")
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

    #[test]
    fn a_pidfd_of_a_reaped_process_comes_back_dead_the_same_way() {
        let original = dead(libc::SIGTERM).unwrap();
        let Some(status) = exit_status(&original) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI: PIDFD_GET_INFO exit status (Linux 6.15+) missing"
            );
            eprintln!("skipped: no PIDFD_GET_INFO exit status on this kernel (6.15+)");
            return;
        };
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTERM);
        let info = testing::save_own(original.as_raw_fd());
        assert_eq!(info.state, FdState::Pidfd { pid: DEAD });
        assert_eq!(info.size as u32 as i32, status);
        let mut shared = crate::fd::Shared::default();
        Pidfd
            .prepare(&[&info], &crate::fd::Prepare::default(), &mut shared)
            .unwrap();
        let made = shared.get(FdKind::Pidfd, info.inode, 0, info.fd).unwrap();
        assert_eq!(exit_status(made), Some(status));
        // SAFETY: a signal through the pidfd of a process that is gone.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, made.as_raw_fd(), 0, 0, 0) };
        assert_eq!(r, -1);
    }
}
