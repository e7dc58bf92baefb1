//! eventfd, timerfd, signalfd, inotify and pidfd descriptors, rebuilt in the
//! restorer and handed to the stub. (Epoll sets are built inside the stub, where the
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
        FdState::Inotify(ref watches) => inotify(watches)?,
        FdState::Pidfd { pid } => {
            // SAFETY: plain syscall.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
            if fd < 0 {
                return Err(RestoreError::NotSupported(format!(
                    "a pidfd of process {pid}, which does not exist here: {}",
                    io::Error::last_os_error()
                )));
            }
            owned(fd, "pidfd_open")?
        }
        _ => return Ok(None),
    }))
}

/// An inotify instance whose watches get their original descriptors: the
/// kernel hands them out counting up from 1, so gaps (watches removed
/// before the checkpoint) are filled with watches on scratch directories,
/// removed again, and their events drained before the process sees them.
fn inotify(watches: &[cr_ebpf_image::InotifyWatch]) -> Result<OwnedFd, RestoreError> {
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
            let got = add(std::path::Path::new(&w.path), w.mask)?;
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
