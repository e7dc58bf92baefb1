//! Unix sockets: socket pairs whose both ends are checkpointed, rebuilt
//! together with the messages queued on each end (read at checkpoint time
//! without being consumed); named sockets bound again at their path.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdState, SocketInfo, SOCKET_QUEUE_CAP};

use super::{check, getsockopt_int, setsockopt_int, SocketError};
use crate::SaveError;

/// The messages in a unix or UDP socket's receive queue, left in place:
/// `SO_PEEK_OFF` walks the queue (the socket's own setting is put back).
pub(super) fn peek_messages(fd: &OwnedFd, stream: bool) -> Result<Vec<Vec<u8>>, SocketError> {
    let before =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(|e| ("SO_PEEK_OFF", e))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(|e| ("SO_PEEK_OFF", e))?;
    let out = (|| {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut total = 0;
        let mut buf = vec![0u8; 256 << 10];
        let mut control = [0u8; 256];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: zeroed msghdr is valid; pointers below are ours.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            // SAFETY: recvmsg into our buffers.
            let n = unsafe {
                libc::recvmsg(
                    fd.as_raw_fd(),
                    &mut msg,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    break;
                }
                return Err(SocketError::Io("peeking at the queue", e));
            }
            if msg.msg_controllen > 0 {
                // SAFETY: walking the control buffer the kernel filled.
                let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
                let mut rights = false;
                while !c.is_null() {
                    // SAFETY: `c` points into `control`.
                    let h = unsafe { &*c };
                    if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                        rights = true;
                        // Descriptors in flight were installed here: close them.
                        let n = (h.cmsg_len as usize - std::mem::size_of::<libc::cmsghdr>()) / 4;
                        // SAFETY: the data holds `n` descriptors.
                        let data = unsafe { libc::CMSG_DATA(c) }.cast::<i32>();
                        for i in 0..n {
                            // SAFETY: descriptors just installed in our process.
                            unsafe { libc::close(data.add(i).read_unaligned()) };
                        }
                    }
                    // SAFETY: as above.
                    c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
                }
                if rights {
                    return Err(SocketError::NotSupported(
                        "descriptors in flight (SCM_RIGHTS) queued on a unix socket".into(),
                    ));
                }
            }
            if n == 0 && stream {
                break;
            }
            total += n as usize;
            if total > SOCKET_QUEUE_CAP {
                return Err(SocketError::NotSupported(format!(
                    "a socket queue over {} MiB",
                    SOCKET_QUEUE_CAP >> 20
                )));
            }
            let chunk = buf[..n as usize].to_vec();
            match out.last_mut() {
                Some(last) if stream => last.extend_from_slice(&chunk),
                _ => out.push(chunk),
            }
        }
        Ok(out)
    })();
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, before);
    out
}

/// A unix socket's path (for removing a stale socket file before binding).
pub(super) fn unix_path(addr: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = addr.get(2..)?;
    if path.first().is_none_or(|b| *b == 0) {
        return None; // abstract or unnamed
    }
    let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
    Some(std::ffi::OsStr::from_bytes(&path[..end]).into())
}

pub(super) fn socketpair(s: &SocketInfo) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: the kernel writes two descriptors into the array.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            s.sock_type as i32 | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: two new descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Connected unix sockets are restored as pairs: both ends must be here,
/// and queued datagrams need their sender.
pub(super) fn check_pairs(procs: &[(i32, &[FdInfo])]) -> Result<(), SaveError> {
    let unix = |f: &FdInfo| match &f.state {
        FdState::Socket(s) if s.family == libc::AF_UNIX as u16 => Some(s.clone()),
        _ => None,
    };
    let inodes: std::collections::HashSet<u64> = procs
        .iter()
        .flat_map(|(_, fds)| fds.iter())
        .filter_map(unix)
        .map(|s| s.inode)
        .collect();
    let outside = if procs.len() > 1 {
        "a unix socket connected to a socket outside the process tree"
    } else {
        "a unix socket connected to a socket outside the process"
    };
    for &(pid, fds) in procs {
        for f in fds {
            let Some(s) = unix(f) else { continue };
            if s.peer_inode != 0 && !inodes.contains(&s.peer_inode) {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: outside.into(),
                });
            }
            if s.peer_inode == 0 && !s.queue.is_empty() {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what:
                        "queued messages on an unconnected unix socket (their senders are unknown)"
                            .into(),
                });
            }
        }
    }
    Ok(())
}
