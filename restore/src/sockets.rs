//! Sockets, rebuilt in the restorer itself and then handed to the stub:
//! listeners bound again, UDP sockets bound and connected, unix socket
//! pairs with their queued messages, established TCP connections through
//! `TCP_REPAIR` (sequence numbers, queues, options, window, timestamp).

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{SocketInfo, TcpRepair};

use crate::RestoreError;

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCP_NO_QUEUE: i32 = 0;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

fn fail(call: impl Into<String>) -> impl FnOnce(io::Error) -> RestoreError {
    let call = call.into();
    move |err| RestoreError::Syscall { call, err }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: the value is our own buffer of the given length.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
}

fn set_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    setsockopt(fd, level, name, &v.to_ne_bytes())
}

fn socket(s: &SocketInfo) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            s.family as i32,
            s.sock_type as i32 | libc::SOCK_CLOEXEC,
            s.protocol as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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

fn bind(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
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

fn connect(fd: &OwnedFd, addr: &[u8]) -> io::Result<()> {
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

/// Sends all of `data` (one message), retrying short writes of a stream.
fn send_all(fd: &OwnedFd, data: &[u8], flags: i32) -> io::Result<()> {
    let mut off = 0;
    loop {
        // SAFETY: sending our own buffer.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast(),
                data.len() - off,
                flags | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        off += n as usize;
        if off >= data.len() {
            return Ok(());
        }
    }
}

/// A unix socket's path (for removing a stale socket file before binding).
fn unix_path(addr: &[u8]) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = addr.get(2..)?;
    if path.first().is_none_or(|b| *b == 0) {
        return None; // abstract or unnamed
    }
    let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
    Some(std::ffi::OsStr::from_bytes(&path[..end]).into())
}

/// Options as saved, before binding; buffer sizes are left to the kernel
/// (they are forced for TCP connections only, whose queues must fit).
fn apply_options(fd: &OwnedFd, s: &SocketInfo, skip_reuseaddr: bool) -> Result<(), RestoreError> {
    for o in &s.options {
        let buffer =
            o.level == libc::SOL_SOCKET && matches!(o.name, libc::SO_SNDBUF | libc::SO_RCVBUF);
        let reuse = o.level == libc::SOL_SOCKET && o.name == libc::SO_REUSEADDR;
        if buffer || (reuse && skip_reuseaddr) {
            continue;
        }
        setsockopt(fd, o.level, o.name, &o.value).map_err(fail(format!(
            "setsockopt({}, {}) on a restored socket",
            o.level, o.name
        )))?;
    }
    Ok(())
}

fn option_int(s: &SocketInfo, level: i32, name: i32) -> Option<i32> {
    s.options
        .iter()
        .find(|o| o.level == level && o.name == name)
        .and_then(|o| Some(i32::from_ne_bytes(o.value.get(..4)?.try_into().ok()?)))
}

/// An established TCP connection, rebuilt without a handshake.
fn tcp_connection(s: &SocketInfo, t: &TcpRepair) -> Result<OwnedFd, RestoreError> {
    let fd = socket(s).map_err(fail("socket (TCP connection)"))?;
    // The queues must fit: the buffers as they were (the kernel doubles these).
    for (name, saved) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        if let Some(v) = option_int(s, libc::SOL_SOCKET, saved) {
            set_int(&fd, libc::SOL_SOCKET, name, v / 2)
                .map_err(fail("SO_SNDBUFFORCE/SO_RCVBUFFORCE"))?;
        }
    }
    set_int(&fd, libc::IPPROTO_TCP, TCP_REPAIR, 1).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            RestoreError::NotSupported(
                "re-establishing a TCP connection needs CAP_NET_ADMIN (TCP_REPAIR)".into(),
            )
        } else {
            fail("setsockopt(TCP_REPAIR)")(e)
        }
    })?;
    let tcp = |name, v: i32, what: &str| {
        set_int(&fd, libc::IPPROTO_TCP, name, v).map_err(fail(what.to_string()))
    };
    // In repair mode binding succeeds next to a listener on the same port.
    bind(&fd, &s.local).map_err(fail("bind (TCP connection)"))?;
    tcp(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(TCP_QUEUE_SEQ, t.recv_seq as i32, "TCP_QUEUE_SEQ (receive)")?;
    tcp(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(TCP_QUEUE_SEQ, t.send_seq as i32, "TCP_QUEUE_SEQ (send)")?;
    tcp(TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    // No SYN: the socket becomes established as it was.
    connect(&fd, &s.peer).map_err(fail("connect (TCP repair)"))?;
    let mut opts: Vec<u8> = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MAXSEG, t.mss);
    if t.options & 4 != 0 {
        opt(
            TCPOPT_WINDOW,
            t.snd_wscale as u32 | (t.rcv_wscale as u32) << 16,
        );
    }
    if t.options & 2 != 0 {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if t.options & 1 != 0 {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    setsockopt(&fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &opts)
        .map_err(fail("TCP_REPAIR_OPTIONS"))?;
    // The peer checks timestamps: the connection's own clock goes on.
    tcp(TCP_TIMESTAMP, t.timestamp as i32, "TCP_TIMESTAMP")?;
    let sent = t.send_queue.len() - t.unsent as usize;
    if sent > 0 {
        tcp(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
        send_all(&fd, &t.send_queue[..sent], 0).map_err(fail("refilling the TCP send queue"))?;
    }
    if !t.recv_queue.is_empty() {
        tcp(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
        send_all(&fd, &t.recv_queue, 0).map_err(fail("refilling the TCP receive queue"))?;
    }
    tcp(TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    let mut w = Vec::with_capacity(20);
    for v in t.window {
        w.extend_from_slice(&v.to_ne_bytes());
    }
    setsockopt(&fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &w).map_err(fail("TCP_REPAIR_WINDOW"))?;
    apply_options(&fd, s, true)?;
    tcp(TCP_REPAIR, 0, "leaving TCP_REPAIR")?;
    // Leaving repair mode cleared SO_REUSEADDR.
    if let Some(v) = option_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR) {
        set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, v).map_err(fail("SO_REUSEADDR"))?;
    }
    // What the process wrote and the kernel had not sent yet goes out now.
    if t.unsent > 0 {
        send_all(&fd, &t.send_queue[sent..], 0).map_err(fail("sending the unsent TCP bytes"))?;
    }
    Ok(fd)
}

/// An established TCP connection closed instead of restored: the peer
/// gets a reset (through the connection rebuilt for a moment, when that is
/// possible), the process an unconnected socket in its place, on which its
/// reads and writes fail as on a connection that broke.
fn closed_connection(s: &SocketInfo, t: &TcpRepair) -> Result<OwnedFd, RestoreError> {
    if let Ok(fd) = tcp_connection(s, t) {
        // SO_LINGER {on, 0 s}: close sends RST.
        let _ = setsockopt(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &[1, 0, 0, 0, 0, 0, 0, 0],
        );
        drop(fd);
    }
    socket(s).map_err(fail("socket (closed TCP connection)"))
}

/// Any socket but a connected unix pair.
fn single(s: &SocketInfo, close_connections: bool) -> Result<OwnedFd, RestoreError> {
    if let Some(t) = &s.tcp {
        if close_connections {
            return closed_connection(s, t);
        }
        return tcp_connection(s, t);
    }
    let fd = socket(s).map_err(fail(format!("socket({}, {})", s.family, s.sock_type)))?;
    apply_options(&fd, s, false)?;
    if !s.local.is_empty() {
        if s.family == libc::AF_UNIX as u16 {
            // A socket file left by the dead process: only a socket is removed.
            if let Some(p) = unix_path(&s.local) {
                use std::os::unix::fs::FileTypeExt as _;
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        bind(&fd, &s.local).map_err(fail("bind (restored socket)"))?;
    }
    if s.listening {
        // SAFETY: plain syscall on our socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), s.backlog.max(1) as i32) })
            .map_err(fail("listen (restored socket)"))?;
    } else if !s.peer.is_empty() {
        connect(&fd, &s.peer).map_err(fail("connect (restored socket)"))?;
    }
    Ok(fd)
}

fn socketpair(s: &SocketInfo) -> io::Result<(OwnedFd, OwnedFd)> {
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

/// Every socket of `sockets` (descriptor number, socket) once, by inode (a
/// socket open under several numbers, or in several processes, is one
/// socket). With `close_connections`, established TCP connections are
/// closed instead of re-established.
pub(crate) fn build(
    sockets: &[(i32, &SocketInfo)],
    close_connections: bool,
) -> Result<HashMap<u64, OwnedFd>, RestoreError> {
    let by_inode: HashMap<u64, &SocketInfo> = sockets.iter().map(|(_, s)| (s.inode, *s)).collect();
    let mut made: HashMap<u64, OwnedFd> = HashMap::new();
    for (_, s) in sockets {
        if made.contains_key(&s.inode) {
            continue;
        }
        match by_inode.get(&s.peer_inode) {
            Some(peer) if s.family == libc::AF_UNIX as u16 && s.peer_inode != 0 => {
                let (a, b) = socketpair(s).map_err(fail("socketpair"))?;
                // Each end's queue was written by the other end.
                for (to, from) in [(s, &b), (peer, &a)] {
                    for m in &to.queue {
                        send_all(from, m, libc::MSG_DONTWAIT)
                            .map_err(fail("refilling a unix socket's queue"))?;
                    }
                }
                made.insert(s.inode, a);
                made.insert(peer.inode, b);
            }
            _ => {
                made.insert(s.inode, single(s, close_connections)?);
            }
        }
    }
    Ok(made)
}
