//! [`Sys`] through ptrace: each call is injected at a `syscall`
//! instruction of the stub (its trampoline), arguments in memory go to the
//! trampoline's data page.

use std::{cell::Cell, os::fd::AsRawFd as _, os::fd::BorrowedFd};

use cr_ebpf_tracee::Tracee;

use super::{Sys, PAGE};
use crate::RestoreError;

/// Syscalls injected into the thread `t` of a stub.
pub struct Injected<'a> {
    t: &'a Tracee,
    pid: i32,
    insn: u64,
    data: u64,
    /// The stub's pidfd of the restorer, once opened (for [`Sys::adopt`]).
    pidfd: Cell<Option<i64>>,
    /// Where that pidfd is kept: clear of the process's own descriptors,
    /// which are put in place later with `dup3`.
    floor: u64,
}

impl<'a> Injected<'a> {
    /// Syscalls at the `syscall` instruction at `insn`, with the scratch
    /// page at `data`, in the thread `t` of process `pid`.
    pub fn new(t: &'a Tracee, pid: i32, insn: u64, data: u64) -> Self {
        Self {
            t,
            pid,
            insn,
            data,
            pidfd: Cell::new(None),
            floor: 64,
        }
    }

    /// Keeps the pidfd of [`Sys::adopt`] at or above `floor`.
    pub fn with_floor(mut self, floor: u64) -> Self {
        self.floor = floor;
        self
    }

    /// The same process and scratch page, in its thread `t`.
    pub fn on<'b>(&self, t: &'b Tracee) -> Injected<'b> {
        Injected::new(t, self.pid, self.insn, self.data)
    }

    /// The process being built.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The thread the calls run in.
    pub fn tracee(&self) -> &Tracee {
        self.t
    }
}

impl Sys for Injected<'_> {
    fn call(&self, name: &str, nr: i64, args: [u64; 6]) -> Result<i64, RestoreError> {
        let r = self
            .t
            .inject_syscall(self.insn, nr, args)
            .map_err(|source| RestoreError::Build {
                what: format!("injecting {name}({:#x}, {:#x}, ...)", args[0], args[1]),
                source,
            })?;
        if (-4095..0).contains(&r) {
            return Err(RestoreError::Syscall {
                call: format!(
                    "{name}({:#x}, {:#x}, {:#x}, ...)",
                    args[0], args[1], args[2]
                ),
                err: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(r)
    }

    fn put(&self, offset: u64, bytes: &[u8]) -> Result<u64, RestoreError> {
        assert!(offset + bytes.len() as u64 <= PAGE);
        cr_ebpf_tracee::write_memory(self.pid, self.data + offset, bytes).map_err(|source| {
            RestoreError::Build {
                what: "writing the trampoline data page".into(),
                source,
            }
        })?;
        Ok(self.data + offset)
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), RestoreError> {
        cr_ebpf_tracee::write_memory(self.pid, addr, bytes).map_err(|source| RestoreError::Build {
            what: format!("writing {} bytes at {addr:#x}", bytes.len()),
            source,
        })
    }

    fn release_adopter(&self) -> Result<(), RestoreError> {
        match self.pidfd.take() {
            Some(p) => self.close(p),
            None => Ok(()),
        }
    }

    fn take(&self, fd: i64) -> Result<std::os::fd::OwnedFd, RestoreError> {
        use std::os::fd::FromRawFd as _;
        let fail = |call: &str| RestoreError::Syscall {
            call: format!("{call} (descriptor {fd} of process {})", self.pid),
            err: std::io::Error::last_os_error(),
        };
        // SAFETY: plain syscall with integer arguments.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if pidfd < 0 {
            return Err(fail("pidfd_open"));
        }
        // SAFETY: a new descriptor we own.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: plain syscall with integer arguments.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if got < 0 {
            return Err(fail("pidfd_getfd"));
        }
        // SAFETY: a new descriptor the kernel just returned.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(got as i32) })
    }

    fn adopt(&self, ours: BorrowedFd<'_>) -> Result<i64, RestoreError> {
        let pidfd = match self.pidfd.get() {
            Some(p) => p,
            None => {
                let low = self.call(
                    "pidfd_open(restorer)",
                    libc::SYS_pidfd_open,
                    [std::process::id() as u64, 0, 0, 0, 0, 0],
                )?;
                let p = self.dup_above(low, self.floor)?;
                self.close(low)?;
                self.pidfd.set(Some(p));
                p
            }
        };
        self.call(
            "pidfd_getfd",
            libc::SYS_pidfd_getfd,
            [pidfd as u64, ours.as_raw_fd() as u64, 0, 0, 0, 0],
        )
    }
}
