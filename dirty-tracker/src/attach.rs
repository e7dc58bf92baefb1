//! Attaching the uffd-wp backend to another process.
//!
//! The userfaultfd must belong to the target's memory, so it is created
//! inside the target by an injected `userfaultfd()` syscall (the target is
//! frozen for the few microseconds this takes), taken into our process with
//! `pidfd_getfd`, and closed again in the target: the target's descriptor
//! table is left exactly as it was, and nothing in its behaviour changes
//! except that its first write to each protected page takes a ~1 µs fault.

use std::os::fd::{FromRawFd, OwnedFd};

use cr_ebpf_tracee::{Frozen, Injector, TraceError};

use crate::{
    sys,
    uffd_wp::{WpError, WpTracker},
};

/// Why attaching failed. The target is running again in every case.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Freezing the target or injecting into it failed.
    #[error("injecting userfaultfd() into process {pid}")]
    Trace {
        /// The target.
        pid: i32,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// The kernel refused a step.
    #[error("{what} in process {pid}: {source}")]
    Syscall {
        /// The target.
        pid: i32,
        /// What was attempted.
        what: &'static str,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// Enabling write-protect tracking failed.
    #[error("enabling write-protect tracking for process {pid}")]
    Wp {
        /// The target.
        pid: i32,
        /// The cause.
        #[source]
        source: WpError,
    },
}

/// Creates a userfaultfd in process `pid`, takes it, and returns a tracker
/// for that process's memory (nothing registered yet).
pub fn attach(pid: i32) -> Result<WpTracker, AttachError> {
    let trace = |source| AttachError::Trace { pid, source };
    let frozen = Frozen::freeze(pid).map_err(trace)?;
    let injector = Injector::new(pid).map_err(trace)?;
    let main = &frozen.threads()[0];
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY) as u64;
    let fd = injector
        .call(main, libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])
        .map_err(trace)?;
    if fd < 0 {
        return Err(AttachError::Syscall {
            pid,
            what: "userfaultfd()",
            source: std::io::Error::from_raw_os_error(-fd as i32),
        });
    }
    let taken = take_fd(pid, fd as i32);
    // Whatever happened, the descriptor leaves the target's table.
    let closed = injector
        .call(main, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])
        .map_err(trace);
    frozen.thaw().map_err(trace)?;
    closed?;
    let uffd = taken.map_err(|source| AttachError::Syscall {
        pid,
        what: "pidfd_getfd() of the new userfaultfd",
        source,
    })?;
    WpTracker::for_process(uffd, pid as u32).map_err(|source| AttachError::Wp { pid, source })
}

/// Process `pid`'s descriptor `fd`, duplicated into this process
/// (`pidfd_open` + `pidfd_getfd`).
pub fn take_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls with integer arguments; each new descriptor is
    // owned right away.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(got as i32))
    }
}
