//! Socket addresses as the image holds them (`struct sockaddr_*` bytes)
//! handed to `bind`, `connect` and `sendto`, and waiting for an address
//! the checkpointed process still holds.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use super::check;

fn sockaddr(addr: &[u8]) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = addr
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copying at most the storage's size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr(),
            (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
            n,
        )
    };
    (ss, n as libc::socklen_t)
}

pub(super) fn bind(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: a sockaddr of ours.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

pub(super) fn connect(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: a sockaddr of ours.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
}

/// `op`, tried again while it fails with `busy` (for two seconds at most):
/// an address the checkpointed process held stays taken until its socket
/// is gone, which can take a moment after the process (its last
/// descriptor held by a child that has yet to exec or exit).
pub(super) fn patiently(busy: i32, mut op: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
    let start = std::time::Instant::now();
    loop {
        match op() {
            Err(e) if e.raw_os_error() == Some(busy) && start.elapsed() < PATIENCE => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// `sendto` of one datagram to `addr`, never waiting.
pub(super) fn send_to(fd: &OwnedFd, data: &[u8], addr: &[u8]) -> io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: our buffer and a sockaddr of ours.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::other("a datagram sent in part"));
    }
    Ok(())
}
