//! The one typed layer of syscalls a restore makes inside the process being
//! built (and, in [`ask`], of the questions a checkpoint asks a frozen
//! process). [`Injected`] runs them in a ptrace-stopped stub; [`fake::Recording`]
//! records them, so a resource's restore side can be unit-tested without a
//! process.
//!
//! The stub has a scratch page for syscall arguments that live in memory
//! (paths, structs): [`Sys::put`] writes there and returns the address.

pub mod ask;
pub mod fake;
mod injected;

use std::os::fd::BorrowedFd;

pub use injected::Injected;

use crate::RestoreError;

/// Size of the scratch page.
pub const PAGE: u64 = 4096;

/// Status flags `fcntl(F_SETFL)` can change (`O_NONBLOCK`, `O_APPEND`, ...).
pub const SETTABLE_FLAGS: u32 =
    (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME) as u32;

/// `struct clone_args` of `clone3`, as far as a restore uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneArgs {
    /// `CLONE_*` flags.
    pub flags: u64,
    /// Signal to the parent at exit (`SIGCHLD` for a process, 0 for a thread).
    pub exit_signal: u64,
    /// The pid or tid the new task must get (`set_tid`).
    pub set_tid: i32,
}

/// Syscalls in the process being restored.
pub trait Sys {
    /// Runs syscall `nr`; a negative result is a [`RestoreError::Syscall`]
    /// naming `name` and the first arguments.
    fn call(&self, name: &str, nr: i64, args: [u64; 6]) -> Result<i64, RestoreError>;

    /// Writes `bytes` at `offset` of the scratch page; returns their address
    /// in the process.
    fn put(&self, offset: u64, bytes: &[u8]) -> Result<u64, RestoreError>;

    /// Writes `bytes` at `addr` of the process (memory it mapped for
    /// arguments too long for the scratch page).
    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), RestoreError>;

    /// The process's new descriptor on the same open file as `ours`, a
    /// descriptor of the restorer (`pidfd_getfd` through a pidfd of ours
    /// the process opens once).
    fn adopt(&self, ours: BorrowedFd<'_>) -> Result<i64, RestoreError>;

    /// A descriptor of the restorer on the same open file as the process's
    /// descriptor `fd` (`pidfd_getfd`).
    fn take(&self, fd: i64) -> Result<std::os::fd::OwnedFd, RestoreError> {
        Err(RestoreError::NotSupported(format!(
            "taking descriptor {fd} of the process being built"
        )))
    }

    /// Closes what [`Sys::adopt`] keeps open in the process (its pidfd of
    /// the restorer), once every descriptor is handed over.
    fn release_adopter(&self) -> Result<(), RestoreError> {
        Ok(())
    }

    /// `close(fd)`.
    fn close(&self, fd: i64) -> Result<(), RestoreError> {
        self.call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])
            .map(drop)
    }

    /// `dup3(old, new, cloexec ? O_CLOEXEC : 0)`.
    fn dup3(&self, old: i64, new: i32, cloexec: bool) -> Result<(), RestoreError> {
        let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
        self.call(
            "dup3",
            libc::SYS_dup3,
            [old as u64, new as u64, flags, 0, 0, 0],
        )
        .map(drop)
    }

    /// A duplicate of `fd` at `floor` or above (`fcntl(F_DUPFD)`).
    fn dup_above(&self, fd: i64, floor: u64) -> Result<i64, RestoreError> {
        self.call(
            "fcntl(F_DUPFD)",
            libc::SYS_fcntl,
            [fd as u64, libc::F_DUPFD as u64, floor, 0, 0, 0],
        )
    }

    /// `fcntl(fd, F_SETFL, flags)`.
    fn set_status_flags(&self, fd: i64, flags: u32) -> Result<(), RestoreError> {
        self.call(
            "fcntl(F_SETFL)",
            libc::SYS_fcntl,
            [fd as u64, libc::F_SETFL as u64, flags as u64, 0, 0, 0],
        )
        .map(drop)
    }

    /// `openat(AT_FDCWD, path, flags)` (the path goes at the start of the
    /// scratch page).
    fn openat(&self, path: &str, flags: i32) -> Result<i64, RestoreError> {
        let mut bytes = path.as_bytes().to_vec();
        bytes.push(0);
        if bytes.len() as u64 > PAGE {
            return Err(RestoreError::NotSupported(format!(
                "path longer than a page: {path}"
            )));
        }
        let at = self.put(0, &bytes)?;
        self.call(
            "openat",
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, at, flags as u64, 0, 0, 0],
        )
    }

    /// `lseek(fd, pos, SEEK_SET)`.
    fn seek(&self, fd: i64, pos: u64) -> Result<(), RestoreError> {
        self.call(
            "lseek",
            libc::SYS_lseek,
            [fd as u64, pos, libc::SEEK_SET as u64, 0, 0, 0],
        )
        .map(drop)
    }

    /// `epoll_create1(cloexec ? EPOLL_CLOEXEC : 0)`.
    fn epoll_create(&self, cloexec: bool) -> Result<i64, RestoreError> {
        let flags = if cloexec {
            libc::EPOLL_CLOEXEC as u64
        } else {
            0
        };
        self.call(
            "epoll_create1",
            libc::SYS_epoll_create1,
            [flags, 0, 0, 0, 0, 0],
        )
    }

    /// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})`.
    fn epoll_add(&self, epfd: i32, fd: i32, events: u32, data: u64) -> Result<(), RestoreError> {
        // struct epoll_event is packed on x86_64: u32 events, u64 data.
        let mut ev = Vec::with_capacity(12);
        ev.extend_from_slice(&events.to_le_bytes());
        ev.extend_from_slice(&data.to_le_bytes());
        let at = self.put(0, &ev)?;
        self.call(
            "epoll_ctl(EPOLL_CTL_ADD)",
            libc::SYS_epoll_ctl,
            [epfd as u64, libc::EPOLL_CTL_ADD as u64, fd as u64, at, 0, 0],
        )
        .map(drop)
    }

    /// `mmap(addr, len, prot, flags, fd, offset)`.
    fn mmap(
        &self,
        addr: u64,
        len: u64,
        prot: u32,
        flags: i32,
        fd: i64,
        offset: u64,
    ) -> Result<u64, RestoreError> {
        self.call(
            "mmap",
            libc::SYS_mmap,
            [addr, len, prot as u64, flags as u64, fd as u64, offset],
        )
        .map(|a| a as u64)
    }

    /// `clone3(args)`: the new task's id (the arguments go at offset 512 of
    /// the scratch page, the tid array at 1024).
    fn clone3(&self, args: &CloneArgs) -> Result<i64, RestoreError> {
        let tid_at = self.put(1024, &args.set_tid.to_le_bytes())?;
        let mut raw = Vec::with_capacity(88);
        // flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size, cgroup
        for v in [args.flags, 0, 0, 0, args.exit_signal, 0, 0, 0, tid_at, 1, 0] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        let at = self.put(512, &raw)?;
        self.call(
            "clone3",
            libc::SYS_clone3,
            [at, raw.len() as u64, 0, 0, 0, 0],
        )
    }
}
