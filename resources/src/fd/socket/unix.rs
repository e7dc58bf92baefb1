//! Unix sockets: socket pairs whose both ends are checkpointed, rebuilt
//! together with the messages queued on each end (read at checkpoint time
//! without being consumed); named sockets bound again at their path, their
//! file given its permissions and owner back (or removed again when it was
//! removed); directions shut down shut down again.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdState, SocketFile, SocketInfo, SOCKET_QUEUE_CAP};

use super::{check, diag::UnixDiag, getsockopt_int, setsockopt_int, SocketError};
use crate::SaveError;

/// The unix part of a socket's state: peer, backlog or queued messages,
/// directions shut down, the file it is bound to (`pid`'s cwd resolves a
/// relative name).
pub(super) fn save_unix(
    dup: &OwnedFd,
    s: &mut SocketInfo,
    d: &UnixDiag,
    pid: i32,
) -> Result<(), SocketError> {
    let stream = s.sock_type as i32 != libc::SOCK_DGRAM;
    // An unbound (or unnamed: a socket pair's) unix socket's name is just the family.
    if s.local.len() <= 2 {
        s.local.clear();
    }
    if s.peer.len() <= 2 {
        s.peer.clear();
    }
    s.peer_inode = d.peer;
    s.shutdown = d.shutdown;
    if s.listening {
        s.backlog = d.backlog;
        s.pending = d.pending;
    } else {
        // A stream or seqpacket socket that is not connected has no queue
        // (and reading it is an error).
        let connected = d.state == TCP_ESTABLISHED;
        if !stream || connected {
            let eof = d.shutdown & RCV_SHUTDOWN != 0;
            let (queue, senders) = peek_messages(dup, s.sock_type as i32, eof)?;
            s.queue = queue;
            // A datagram socket without a peer of its own got each message
            // from whoever sent it: they are sent again from there.
            if !stream && d.peer == 0 && !s.queue.is_empty() {
                s.senders = senders;
            }
        }
        // Connected to a connection its listener has not accepted yet: what
        // it sent waits in that connection, which nothing can read before
        // the listener accepts it.
        if stream && d.peer == 0 && d.outq > 0 {
            return Err(SocketError::NotSupported(
                "data sent on a unix connection not accepted yet".into(),
            ));
        }
        // Whether its shutdown reached that connection is not visible.
        if stream && d.peer == 0 && d.shutdown != 0 && !s.peer.is_empty() {
            return Err(SocketError::NotSupported(
                "a unix connection not accepted yet, shut down".into(),
            ));
        }
    }
    if let (Some(path), Some((ino, dev))) = (unix_path(&s.local), d.vfs) {
        let full = if path.is_absolute() {
            path.clone()
        } else {
            std::path::Path::new(&format!("/proc/{pid}/cwd")).join(&path)
        };
        use std::os::unix::fs::MetadataExt as _;
        s.file = Some(match std::fs::symlink_metadata(&full) {
            Ok(m)
                if m.ino() == u64::from(ino)
                    && libc::major(m.dev()) == dev >> 20
                    && libc::minor(m.dev()) == dev & 0xfffff =>
            {
                SocketFile::Kept {
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                }
            }
            Ok(_) => SocketFile::Removed,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => SocketFile::Removed,
            Err(e) => return Err(SocketError::Io("stat of a unix socket's file", e)),
        });
    }
    Ok(())
}

/// `sk_state` of a connected socket.
const TCP_ESTABLISHED: u8 = 1;
/// `sk_shutdown` bit: nothing more will be received.
const RCV_SHUTDOWN: u8 = 1;
/// At most this many empty messages are read from one queue.
const EMPTY_MESSAGES_CAP: usize = 1 << 16;

/// The messages in a unix socket's receive queue (of socket type `ty`),
/// left in place: `SO_PEEK_OFF` walks the queue (the socket's own setting
/// is put back). `eof`: receiving is shut down, so an empty queue reads as
/// end of file (0) instead of `EAGAIN`; for a seqpacket socket the queue's
/// byte count then tells an empty message from the end.
/// Messages, and their senders' addresses (empty: unnamed).
type Messages = (Vec<Vec<u8>>, Vec<Vec<u8>>);

pub(super) fn peek_messages(fd: &OwnedFd, ty: i32, eof: bool) -> Result<Messages, SocketError> {
    let stream = ty == libc::SOCK_STREAM;
    let mut queued: libc::c_int = 0;
    if eof && ty == libc::SOCK_SEQPACKET {
        // SAFETY: FIONREAD writes one int.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) })
            .map_err(|e| SocketError::Io("reading the queue's length", e))?;
    }
    let mut empty = 0;
    let before =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(|e| ("SO_PEEK_OFF", e))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(|e| ("SO_PEEK_OFF", e))?;
    let out = (|| {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut senders: Vec<Vec<u8>> = Vec::new();
        // SAFETY: a zeroed sockaddr_un is a valid buffer for the kernel.
        let mut name: libc::sockaddr_un = unsafe { std::mem::zeroed() };
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
            msg.msg_name = (&mut name as *mut libc::sockaddr_un).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as u32;
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
            if n == 0 && (stream || (eof && total >= queued as usize)) {
                break;
            }
            if n == 0 {
                empty += 1;
                if empty > EMPTY_MESSAGES_CAP {
                    return Err(SocketError::NotSupported(format!(
                        "a socket queue of over {EMPTY_MESSAGES_CAP} empty messages"
                    )));
                }
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
                _ => {
                    out.push(chunk);
                    let len = (msg.msg_namelen as usize).min(std::mem::size_of_val(&name));
                    // SAFETY: the kernel wrote `len` bytes of the address.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            (&name as *const libc::sockaddr_un).cast::<u8>(),
                            len,
                        )
                    };
                    senders.push(if len <= 2 { Vec::new() } else { bytes.to_vec() });
                }
            }
        }
        Ok((out, senders))
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

/// The listener among `all` through which the stream connection
/// `accepted` (whose other end is `other`) was accepted: it is named after
/// the listener, and the other end's peer name is the listener's.
pub(super) fn listener_of<'a>(
    accepted: &SocketInfo,
    other: &SocketInfo,
    all: impl IntoIterator<Item = &'a SocketInfo>,
) -> Option<&'a SocketInfo> {
    if accepted.local.is_empty()
        || other.peer != accepted.local
        || accepted.sock_type as i32 == libc::SOCK_DGRAM
    {
        return None;
    }
    all.into_iter()
        .find(|l| l.listening && l.local == accepted.local && l.sock_type == accepted.sock_type)
}

/// The shutdown bits a stream end gives its peer: receiving shut down here
/// is sending shut down there.
fn mirrored(bits: u8) -> u8 {
    (bits & 1) << 1 | (bits & 2) >> 1
}

/// Whether the restore reproduces the shutdown state of the connection
/// `x`-`y` exactly: `shutdown` on one end of a stream connection shuts the
/// peer's opposite direction too, so an end shut down before it connected
/// (its peer not shut down to match) can only come back through the
/// listener that accepted it (see `build::pair`).
fn shutdown_restorable(x: &SocketInfo, y: &SocketInfo, all: &[&SocketInfo]) -> bool {
    if x.sock_type as i32 == libc::SOCK_DGRAM {
        return true;
    }
    let covers =
        |a: &SocketInfo, b: &SocketInfo| a.shutdown & mirrored(b.shutdown) == mirrored(b.shutdown);
    if listener_of(y, x, all.iter().copied()).is_some() {
        covers(x, y)
    } else if listener_of(x, y, all.iter().copied()).is_some() {
        covers(y, x)
    } else {
        covers(x, y) && covers(y, x)
    }
}

/// A stream or seqpacket end whose peer has closed: it is shut down both
/// ways (the peer's close did that) but may still hold what the peer sent,
/// and its peer's name.
/// So is an unnamed datagram socket holding messages with no peer: only
/// the other end of its socket pair, gone since, could have sent them.
pub(super) fn orphan(s: &SocketInfo) -> bool {
    let unix = s.family == libc::AF_UNIX as u16 && !s.listening && s.peer_inode == 0;
    if s.sock_type as i32 == libc::SOCK_DGRAM {
        return unix && s.local.is_empty() && s.peer.is_empty() && !s.queue.is_empty();
    }
    unix && s.shutdown == 3 && (!s.peer.is_empty() || !s.queue.is_empty())
}

/// Whether the messages queued on the datagram socket `s`, which has no
/// peer of its own, can be sent to it again by their senders: it has a
/// name to be sent to, and each sender is unnamed or a socket of `all`.
pub(super) fn resendable(s: &SocketInfo, all: &[&SocketInfo]) -> bool {
    s.sock_type as i32 == libc::SOCK_DGRAM
        && !s.local.is_empty()
        && s.senders.len() == s.queue.len()
        && s.senders.iter().all(|a| {
            a.is_empty()
                || all
                    .iter()
                    .any(|o| o.family == libc::AF_UNIX as u16 && o.local == *a)
        })
}

/// The clients among `all` whose connection waits on the listener `l`:
/// they connect again at restore.
fn waiting(l: &SocketInfo, all: &[&SocketInfo]) -> u32 {
    all.iter()
        .filter(|c| {
            c.family == libc::AF_UNIX as u16
                && !c.listening
                && c.peer_inode == 0
                && c.peer == l.local
                && !orphan(c)
        })
        .count() as u32
}

/// Connected unix sockets are restored as pairs: both ends must be here,
/// queued datagrams need their sender, and the directions shut down must
/// come back as they were.
pub(super) fn check_pairs(procs: &[(i32, &[FdInfo])]) -> Result<(), SaveError> {
    let unix = |f: &FdInfo| match &f.state {
        FdState::Socket(s) if s.family == libc::AF_UNIX as u16 => Some(s.clone()),
        _ => None,
    };
    let all: Vec<Box<SocketInfo>> = procs
        .iter()
        .flat_map(|(_, fds)| fds.iter())
        .filter_map(unix)
        .collect();
    let all: Vec<&SocketInfo> = all.iter().map(|s| s.as_ref()).collect();
    let inodes: std::collections::HashMap<u64, &SocketInfo> =
        all.iter().map(|s| (s.inode, *s)).collect();
    let outside = if procs.len() > 1 {
        "a unix socket connected to a socket outside the process tree"
    } else {
        "a unix socket connected to a socket outside the process"
    };
    for &(pid, fds) in procs {
        for f in fds {
            let Some(s) = unix(f) else { continue };
            if s.peer_inode == 0 && !s.queue.is_empty() && !orphan(&s) && !resendable(&s, &all) {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: "queued messages on an unconnected unix socket from senders that are \
                           not checkpointed with it (or unknown)"
                        .into(),
                });
            }
            if s.listening && s.pending > waiting(&s, &all) {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: "a connection waiting to be accepted on a unix listener whose client \
                           has closed (what it sent cannot be read without accepting it)"
                        .into(),
                });
            }
            let Some(peer) = (s.peer_inode != 0).then(|| inodes.get(&s.peer_inode)) else {
                continue;
            };
            let Some(peer) = peer else {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: outside.into(),
                });
            };
            if !shutdown_restorable(&s, peer, &all) {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: "a unix connection one end of which was shut down before it was \
                           connected, without its listener"
                        .into(),
                });
            }
        }
    }
    Ok(())
}

/// The `sockaddr_un` bytes of `path`.
#[cfg(test)]
pub(super) fn tests_addr(path: &std::path::Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut a = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    a.extend_from_slice(path.as_os_str().as_bytes());
    a
}
