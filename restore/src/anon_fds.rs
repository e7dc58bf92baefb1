//! eventfd, timerfd and signalfd descriptors, rebuilt in the restorer and
//! handed to the stub. (Epoll sets are built inside the stub, where the
//! descriptor numbers of their registrations are the process's own.)

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::FdState;

use crate::RestoreError;

/// `TFD_IOC_SET_TICKS`: expirations not read yet.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

fn owned(fd: libc::c_int, call: &str) -> Result<OwnedFd, RestoreError> {
    if fd < 0 {
        return Err(RestoreError::Syscall {
            call: call.into(),
            err: io::Error::last_os_error(),
        });
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// The descriptor for `state`, or `None` when it is not one of these kinds.
pub(crate) fn build(state: &FdState) -> Result<Option<OwnedFd>, RestoreError> {
    Ok(Some(match *state {
        FdState::EventFd { count, semaphore } => {
            let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
            // eventfd's initial value is 32 bits: the rest is written.
            // SAFETY: plain syscall.
            let fd = owned(unsafe { libc::eventfd(0, flags) }, "eventfd")?;
            if count > 0 {
                // SAFETY: writing 8 bytes of ours.
                let n = unsafe { libc::write(fd.as_raw_fd(), (&count as *const u64).cast(), 8) };
                if n != 8 {
                    return Err(RestoreError::Syscall {
                        call: format!("write({count}) to a restored eventfd"),
                        err: io::Error::last_os_error(),
                    });
                }
            }
            fd
        }
        FdState::TimerFd {
            clockid,
            abstime: _,
            value_ns,
            interval_ns,
            ticks,
        } => {
            // SAFETY: plain syscall.
            let fd = owned(
                unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC) },
                "timerfd_create",
            )?;
            // The remaining time counts from now (an absolute timer keeps
            // its distance to expiry); an expired periodic timer waiting to
            // be read fires again one interval from now.
            let value = if value_ns == 0 { interval_ns } else { value_ns };
            if value > 0 {
                let spec = libc::itimerspec {
                    it_interval: timespec(interval_ns),
                    it_value: timespec(value),
                };
                // SAFETY: our itimerspec.
                let r = unsafe {
                    libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut())
                };
                if r != 0 {
                    return Err(RestoreError::Syscall {
                        call: "timerfd_settime".into(),
                        err: io::Error::last_os_error(),
                    });
                }
            }
            if ticks > 0 {
                // SAFETY: the ioctl reads one u64 of ours.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } != 0 {
                    return Err(RestoreError::Syscall {
                        call: "ioctl(TFD_IOC_SET_TICKS)".into(),
                        err: io::Error::last_os_error(),
                    });
                }
            }
            fd
        }
        FdState::SignalFd { mask } => {
            // SAFETY: an empty set filled bit by bit.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::sigemptyset(&mut set) };
            for sig in 1..=64 {
                if mask & (1u64 << (sig - 1)) != 0 {
                    // SAFETY: adding a signal number to our set.
                    unsafe { libc::sigaddset(&mut set, sig) };
                }
            }
            // SAFETY: plain syscall with our set.
            let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
            owned(fd, "signalfd")?
        }
        _ => return Ok(None),
    }))
}
