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
/// `carried`: the process's numbers for the descriptors in flight on its
/// queue, when they were saved ([`peek_in_flight`]); `walked.0`: its queue
/// as [`peek_in_flight`] read it, when it did (read again, it would miss
/// its empty messages); `walked.1`: its queue held an empty message at the
/// checkpoint before, whose walk marked it (see [`Walked`]).
pub(super) fn save_unix(
    dup: &OwnedFd,
    s: &mut SocketInfo,
    d: &UnixDiag,
    pid: i32,
    carried: Option<&Vec<Vec<i32>>>,
    walked: (Option<Walked>, bool),
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
        if let Some(eof) = readable(s.sock_type as i32, d, false) {
            if walked.1 && s.sock_type as i32 != libc::SOCK_STREAM && !queue_empty(dup)? {
                return Err(SocketError::NotSupported(
                    "a unix socket queue that held an empty message at the checkpoint before \
                     and has not emptied since: once peeked, an empty message is passed over \
                     by every later read of the queue, so it could not be kept"
                        .into(),
                ));
            }
            let messages = match walked.0 {
                Some(w) => w,
                None => walk(peek_messages(dup, s.sock_type as i32, eof)?),
            };
            if messages.iter().any(|m| m.2 != 0) {
                // Saved as descriptors of the process before (see the
                // in_flight module); the same messages, the same counts.
                let same = carried.is_some_and(|c| {
                    c.len() == messages.len()
                        && c.iter().zip(&messages).all(|(a, m)| a.len() == m.2)
                });
                match carried {
                    Some(c) if same => s.in_flight = c.clone(),
                    _ => {
                        return Err(SocketError::NotSupported(
                            "descriptors in flight (SCM_RIGHTS) queued on a unix socket that is \
                             itself in flight"
                                .into(),
                        ))
                    }
                }
            }
            let senders: Vec<Vec<u8>>;
            (s.queue, senders) = messages.into_iter().map(|m| (m.0, m.1)).unzip();
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

/// Whether the queue of a unix socket that `d` describes can be read (a
/// stream or seqpacket one must be connected), and whether it ends in an
/// end of file.
fn readable(ty: i32, d: &UnixDiag, listening: bool) -> Option<bool> {
    let stream = ty != libc::SOCK_DGRAM;
    (!listening && (!stream || d.state == TCP_ESTABLISHED))
        .then_some(d.shutdown & RCV_SHUTDOWN != 0)
}

/// A queue as read once: each message's bytes, its sender's address and
/// how many descriptors in flight it carries. A queue is read once per
/// checkpoint: the kernel marks an empty message peeked, and a walk with
/// `SO_PEEK_OFF` passes over a marked one (a second walk would miss it).
pub(super) type Walked = Vec<(Vec<u8>, Vec<u8>, usize)>;

/// Whether the queue of the unix socket `fd` is empty: a peek without an
/// offset sees its first message, even an empty one a walk marked.
fn queue_empty(fd: &OwnedFd) -> Result<bool, SocketError> {
    let before =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(|e| ("SO_PEEK_OFF", e))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, -1).map_err(|e| ("SO_PEEK_OFF", e))?;
    let mut b = [0u8; 1];
    // SAFETY: a peek of at most one byte into our buffer.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let err = io::Error::last_os_error();
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, before);
    Ok(n < 0 && err.raw_os_error() == Some(libc::EAGAIN))
}

/// `messages` as [`Walked`] (their descriptors closed).
fn walk(messages: Vec<Peeked>) -> Walked {
    messages
        .into_iter()
        .map(|m| (m.data, m.sender, m.fds.len()))
        .collect()
}

/// The descriptors in flight on the queue of the unix socket `dup` (of
/// type `ty`), each message's, received here (empty when it carries none),
/// and the queue as read (`None` when it cannot be read).
pub(super) fn peek_in_flight(
    dup: &OwnedFd,
    ty: i32,
    d: &UnixDiag,
    listening: bool,
) -> Result<(Vec<Vec<OwnedFd>>, Option<Walked>), SocketError> {
    let Some(eof) = readable(ty, d, listening) else {
        return Ok((Vec::new(), None));
    };
    let mut messages = peek_messages(dup, ty, eof)?;
    let fds: Vec<Vec<OwnedFd>> = messages
        .iter_mut()
        .map(|m| std::mem::take(&mut m.fds))
        .collect();
    let walked = messages
        .into_iter()
        .zip(&fds)
        .map(|(m, f)| (m.data, m.sender, f.len()))
        .collect();
    if fds.iter().all(Vec::is_empty) {
        return Ok((Vec::new(), Some(walked)));
    }
    Ok((fds, Some(walked)))
}

/// One message of a unix socket's receive queue, peeked.
pub(super) struct Peeked {
    /// Its bytes (a stream's: as many as came together).
    pub data: Vec<u8>,
    /// Its sender's address (empty: unnamed).
    pub sender: Vec<u8>,
    /// The descriptors in flight it carries (`SCM_RIGHTS`), received here.
    pub fds: Vec<OwnedFd>,
}

/// Room for `SCM_MAX_FD` descriptors and a few other control messages.
const CONTROL_LEN: usize = 4096;

/// The messages in a unix socket's receive queue (of socket type `ty`),
/// left in place: `SO_PEEK_OFF` walks the queue (the socket's own setting
/// is put back). `eof`: receiving is shut down, so an empty queue reads as
/// end of file (0) instead of `EAGAIN`; for a seqpacket socket the queue's
/// byte count then tells an empty message from the end. The stream bytes
/// that came together are one message, apart from bytes that carry
/// descriptors in flight (the kernel never reads past those either).
pub(super) fn peek_messages(fd: &OwnedFd, ty: i32, eof: bool) -> Result<Vec<Peeked>, SocketError> {
    let mut queued: libc::c_int = 0;
    if eof && ty == libc::SOCK_SEQPACKET {
        // SAFETY: FIONREAD writes one int.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) })
            .map_err(|e| SocketError::Io("reading the queue's length", e))?;
    }
    let before =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(|e| ("SO_PEEK_OFF", e))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(|e| ("SO_PEEK_OFF", e))?;
    let out = peek_all(fd, ty, eof, queued as usize);
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, before);
    out
}

/// [`peek_messages`] with the peek offset at the queue's start.
fn peek_all(fd: &OwnedFd, ty: i32, eof: bool, queued: usize) -> Result<Vec<Peeked>, SocketError> {
    let stream = ty == libc::SOCK_STREAM;
    let mut out: Vec<Peeked> = Vec::new();
    let (mut total, mut empty) = (0, 0);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let (n, sender, fds) = peek_one(fd, &mut buf)?;
        let Some(n) = n else { break };
        if n == 0 && (stream || (eof && total >= queued)) {
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
        total += n;
        if total > SOCKET_QUEUE_CAP {
            return Err(SocketError::NotSupported(format!(
                "a socket queue over {} MiB",
                SOCKET_QUEUE_CAP >> 20
            )));
        }
        // A stream's peek glues the bytes of one writer together up to and
        // including those that carry descriptors (and every peek before
        // those bytes reports them): where they start cannot be told.
        if stream && !fds.is_empty() {
            return Err(SocketError::NotSupported(
                "descriptors in flight (SCM_RIGHTS) queued on a unix stream socket (which of \
                 its bytes carry them cannot be read)"
                    .into(),
            ));
        }
        let chunk = &buf[..n];
        push(&mut out, chunk, sender, fds, stream);
    }
    Ok(out)
}

/// Adds the bytes `data` (with their sender and descriptors) to the
/// messages `out`: a stream's bytes without descriptors join the bytes
/// before them that have none.
fn push(out: &mut Vec<Peeked>, data: &[u8], sender: Vec<u8>, fds: Vec<OwnedFd>, stream: bool) {
    match out.last_mut() {
        Some(last) if stream && fds.is_empty() && last.fds.is_empty() => {
            last.data.extend_from_slice(data)
        }
        _ => out.push(Peeked {
            data: data.to_vec(),
            sender,
            fds,
        }),
    }
}

/// What one peek found: the message's length (`None`: the queue is
/// empty), its sender, the descriptors it carries.
type Found = (Option<usize>, Vec<u8>, Vec<OwnedFd>);

/// Peeks at the next message (at the peek offset) into `buf`.
fn peek_one(fd: &OwnedFd, buf: &mut [u8]) -> Result<Found, SocketError> {
    // SAFETY: a zeroed sockaddr_un is a valid buffer for the kernel.
    let mut name: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut control = vec![0u8; CONTROL_LEN];
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
            return Ok((None, Vec::new(), Vec::new()));
        }
        return Err(SocketError::Io("peeking at the queue", e));
    }
    let fds = rights(&msg);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(SocketError::NotSupported(
            "a queued message whose control data does not fit in 4 KiB".into(),
        ));
    }
    let len = (msg.msg_namelen as usize).min(std::mem::size_of_val(&name));
    // SAFETY: the kernel wrote `len` bytes of the address.
    let bytes = unsafe {
        std::slice::from_raw_parts((&name as *const libc::sockaddr_un).cast::<u8>(), len)
    };
    let sender = if len <= 2 { Vec::new() } else { bytes.to_vec() };
    Ok((Some(n as usize), sender, fds))
}

/// The descriptors of the `SCM_RIGHTS` messages of `msg`, installed in our
/// process by the kernel.
fn rights(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    if msg.msg_controllen == 0 {
        return fds;
    }
    // SAFETY: walking the control buffer the kernel filled.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` points into the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header's aligned length.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = (h.cmsg_len as usize).saturating_sub(head) / 4;
            // SAFETY: the data holds `n` descriptors.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<i32>();
            for i in 0..n {
                // SAFETY: descriptors the kernel just installed in our process.
                fds.push(unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) });
            }
        }
        // SAFETY: as above.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    fds
}

/// A unix socket address for messages: its path, `@name` for an abstract
/// one, empty for none.
pub(super) fn peer_name(addr: &[u8]) -> String {
    match addr.get(2..) {
        None | Some([]) => String::new(),
        Some([0, rest @ ..]) => {
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            format!("@{}", String::from_utf8_lossy(&rest[..end]))
        }
        Some(_) => unix_path(addr).map_or_else(String::new, |p| p.display().to_string()),
    }
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
pub(super) fn mirrored(bits: u8) -> u8 {
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

/// Why the files in flight on `s` could not be sent again at restore, if
/// they could not: they are sent by its peer, which must be restored with
/// it and not shut down for sending, or by the other end of the new pair
/// of an end whose peer had closed.
fn in_flight_unsendable(
    s: &SocketInfo,
    inodes: &std::collections::HashMap<u64, &SocketInfo>,
) -> Option<&'static str> {
    if s.in_flight.is_empty() || orphan(s) {
        return None;
    }
    match inodes.get(&s.peer_inode) {
        Some(p) if p.peer_inode == s.inode && p.inode != s.inode => (p.shutdown & 2 != 0)
            .then_some("descriptors in flight (SCM_RIGHTS) queued on a unix socket whose peer is shut down for sending"),
        _ => Some(
            "descriptors in flight (SCM_RIGHTS) queued on a unix socket without a peer of its own",
        ),
    }
}

/// Connected unix sockets are restored as pairs: both ends must be here,
/// queued datagrams need their sender, and the directions shut down must
/// come back as they were.
pub(super) fn check_pairs(procs: &[(i32, &[FdInfo])], ext_unix_sk: bool) -> Result<(), SaveError> {
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
            if let Some(what) = in_flight_unsendable(&s, &inodes) {
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what: what.into(),
                });
            }
            let Some(peer) = (s.peer_inode != 0).then(|| inodes.get(&s.peer_inode)) else {
                continue;
            };
            let Some(peer) = peer else {
                // A datagram socket connected to a named socket outside (a
                // logger's, `/dev/log`) is connected to that name again: a
                // datagram's peer cannot tell the difference. What it
                // received from there cannot come again.
                let name = peer_name(&s.peer);
                let dgram = s.sock_type as i32 == libc::SOCK_DGRAM;
                if (dgram || ext_unix_sk) && !name.is_empty() && s.queue.is_empty() {
                    continue;
                }
                let what = if name.is_empty() {
                    outside.to_string()
                } else if dgram {
                    format!(
                        "{outside} ({name}) with datagrams from it waiting to be read: they \
                         cannot come again from there"
                    )
                } else if !s.queue.is_empty() {
                    format!(
                        "{outside} ({name}) with bytes from it waiting to be read: they cannot \
                         come again from there"
                    )
                } else {
                    format!(
                        "{outside} ({name}): a new connection would be a new client to its \
                         peer (journald's stdout stream, for one, expects its header first); \
                         `--ext-unix-sk` takes it, connected to {name} again at restore"
                    )
                };
                return Err(SaveError::NotSupportedFd {
                    pid,
                    fd: f.fd,
                    what,
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
