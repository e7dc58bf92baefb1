//! Sockets: addresses, options, queued data, and established TCP
//! connections through `TCP_REPAIR`, read from a duplicate of the frozen
//! process's descriptor (same socket).
//!
//! Covered: TCP (listening, established, unconnected), UDP, unix stream,
//! datagram and seqpacket sockets (socket pairs whose both ends the process
//! holds, with their queued messages; named and unnamed listeners and bound
//! sockets). Anything else is refused with what and where.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use cr_ebpf_image::{SockOpt, SocketInfo, TcpRepair, SOCKET_QUEUE_CAP};

use crate::diag::{self, UnixDiag};

pub(crate) const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const TCP_NO_QUEUE: i32 = 0;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// Options saved for every socket, when `getsockopt` answers: level, name.
/// Buffer sizes are saved but only set again for established TCP
/// connections (whose queues must fit).
pub(crate) const SAVED_OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_PASSCRED),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

/// Why a socket cannot be saved: a sentence for "not supported: ...".
#[derive(Debug)]
pub(crate) enum SocketError {
    NotSupported(String),
    Io(&'static str, io::Error),
}

impl From<(&'static str, io::Error)> for SocketError {
    fn from((what, e): (&'static str, io::Error)) -> Self {
        Self::Io(what, e)
    }
}

fn getsockopt(fd: &OwnedFd, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut n = len as libc::socklen_t;
    // SAFETY: the buffer and its length describe our own memory.
    let r =
        unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut n) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn getsockopt_int(fd: &OwnedFd, level: i32, name: i32) -> io::Result<i32> {
    let v = getsockopt(fd, level, name, 4)?;
    Ok(i32::from_ne_bytes(
        v.get(..4).unwrap_or(&[0; 4]).try_into().expect("4"),
    ))
}

pub(crate) fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: a 4-byte value of ours.
    let r = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&v as *const i32).cast(), 4) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockname` or `getpeername` as raw `sockaddr` bytes; empty for none.
fn address(fd: &OwnedFd, peer: bool) -> io::Result<Vec<u8>> {
    // SAFETY: zeroed sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the storage and its length are ours.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    // SAFETY: the kernel wrote `len` bytes (bounded by the storage size).
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&ss as *const libc::sockaddr_storage).cast::<u8>(),
            (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>()),
        )
    };
    Ok(bytes.to_vec())
}

/// Whether an inet address is the unbound one (any address, port 0).
fn unbound_inet(addr: &[u8]) -> bool {
    addr.len() < 4 || (addr[2] == 0 && addr[3] == 0 && addr[4..].iter().all(|b| *b == 0))
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Reads (without consuming) up to `cap` bytes of the selected queue.
fn peek(fd: &OwnedFd, cap: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; cap.max(1)];
    // SAFETY: our buffer.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The messages in a unix or UDP socket's receive queue, left in place:
/// `SO_PEEK_OFF` walks the queue (the socket's own setting is put back).
fn peek_messages(fd: &OwnedFd, stream: bool) -> Result<Vec<Vec<u8>>, SocketError> {
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

/// Socket facts shared by every socket of one checkpoint (asked once).
#[derive(Default)]
pub(crate) struct Context {
    unix: Option<HashMap<u64, UnixDiag>>,
    backlogs: HashMap<i32, HashMap<u64, u32>>,
}

impl Context {
    fn unix(&mut self, ino: u64) -> Result<UnixDiag, SocketError> {
        if self.unix.is_none() {
            self.unix = Some(diag::unix_sockets().map_err(|e| ("sock_diag (unix)", e))?);
        }
        Ok(self
            .unix
            .as_ref()
            .and_then(|m| m.get(&ino).copied())
            .unwrap_or_default())
    }

    fn backlog(&mut self, family: i32, ino: u64) -> Result<u32, SocketError> {
        let m = match self.backlogs.entry(family) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(diag::tcp_backlogs(family).map_err(|e| ("sock_diag (tcp)", e))?)
            }
        };
        Ok(m.get(&ino).copied().unwrap_or(128))
    }
}

/// Reads one TCP connection's state in repair mode; the socket is back in
/// normal mode afterwards (with `SO_REUSEADDR` as it was), whatever happens.
fn tcp_repair(fd: &OwnedFd) -> Result<TcpRepair, SocketError> {
    let reuse = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(|e| ("SO_REUSEADDR", e))?;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            SocketError::NotSupported(
                "an established TCP connection without CAP_NET_ADMIN (TCP_REPAIR)".into(),
            )
        } else {
            SocketError::Io("TCP_REPAIR", e)
        }
    })?;
    let r = read_repair(fd);
    // Leaving repair mode resets SO_REUSEADDR: put it back.
    let off = setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 0);
    let re = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
    let r = r?;
    off.map_err(|e| ("leaving TCP_REPAIR", e))?;
    re.map_err(|e| ("SO_REUSEADDR", e))?;
    Ok(r)
}

fn read_repair(fd: &OwnedFd) -> Result<TcpRepair, SocketError> {
    let int = |level, name, what: &'static str| {
        getsockopt_int(fd, level, name).map_err(|e| SocketError::Io(what, e))
    };
    let queue = |q: i32| {
        setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, q)
            .map_err(|e| SocketError::Io("TCP_REPAIR_QUEUE", e))
    };
    let check = |len: usize| {
        if len > SOCKET_QUEUE_CAP {
            Err(SocketError::NotSupported(format!(
                "a TCP queue over {} MiB",
                SOCKET_QUEUE_CAP >> 20
            )))
        } else {
            Ok(())
        }
    };
    // The peer may still deliver data (the process is frozen, the network
    // is not): the receive queue is read until its end stops moving.
    queue(TCP_RECV_QUEUE)?;
    let (recv_seq, recv_queue) = {
        let mut tries = 0;
        loop {
            let end = int(libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32;
            let inq = ioctl_int(fd, libc::FIONREAD).map_err(|e| ("SIOCINQ", e))? as usize;
            check(inq)?;
            let data = peek(fd, inq + 65536).map_err(|e| ("reading the receive queue", e))?;
            let again = int(libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32;
            tries += 1;
            if again == end || tries > 20 {
                break (end.wrapping_sub(data.len() as u32), data);
            }
        }
    };
    queue(TCP_SEND_QUEUE)?;
    let write_seq = int(libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32;
    let outq = ioctl_int(fd, libc::TIOCOUTQ).map_err(|e| ("SIOCOUTQ", e))? as usize;
    check(outq)?;
    let unsent = ioctl_int(fd, SIOCOUTQNSD).map_err(|e| ("SIOCOUTQNSD", e))? as u32;
    let send_queue = peek(fd, outq).map_err(|e| ("reading the send queue", e))?;
    queue(TCP_NO_QUEUE)?;
    let mss = int(libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")? as u32;
    let timestamp = int(libc::IPPROTO_TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP")? as u32;
    let w = getsockopt(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)
        .map_err(|e| ("TCP_REPAIR_WINDOW", e))?;
    let mut window = [0u32; 5];
    for (i, v) in window.iter_mut().enumerate() {
        *v = u32::from_ne_bytes(
            w.get(i * 4..i * 4 + 4)
                .unwrap_or(&[0; 4])
                .try_into()
                .expect("4"),
        );
    }
    let info = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 8).map_err(|e| ("TCP_INFO", e))?;
    Ok(TcpRepair {
        send_seq: write_seq.wrapping_sub(send_queue.len() as u32),
        recv_seq,
        unsent: unsent.min(send_queue.len() as u32),
        send_queue,
        recv_queue,
        mss,
        timestamp,
        options: info.get(5).copied().unwrap_or(0),
        snd_wscale: info.get(6).copied().unwrap_or(0) & 0xf,
        rcv_wscale: info.get(6).copied().unwrap_or(0) >> 4,
        window,
    })
}

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// Saves the socket `dup` (a duplicate of the process's descriptor) whose
/// `/proc` link is `socket:[inode]`.
pub(crate) fn save(
    dup: &OwnedFd,
    inode: u64,
    ctx: &mut Context,
) -> Result<SocketInfo, SocketError> {
    let int = |level, name, what: &'static str| {
        getsockopt_int(dup, level, name).map_err(|e| SocketError::Io(what, e))
    };
    let family = int(libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    let sock_type = int(libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")?;
    let protocol = int(libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    let listening = int(libc::SOL_SOCKET, libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0;
    let mut s = SocketInfo {
        family: family as u16,
        sock_type: sock_type as u16,
        protocol: protocol as u32,
        listening,
        inode,
        local: address(dup, false).map_err(|e| ("getsockname", e))?,
        peer: address(dup, true).map_err(|e| ("getpeername", e))?,
        ..SocketInfo::default()
    };
    for &(level, name) in SAVED_OPTIONS {
        if (level == libc::IPPROTO_TCP && protocol != libc::IPPROTO_TCP)
            || (level == libc::IPPROTO_IPV6 && family != libc::AF_INET6)
        {
            continue;
        }
        let len = if name == libc::SO_LINGER && level == libc::SOL_SOCKET {
            8
        } else {
            4
        };
        if let Ok(value) = getsockopt(dup, level, name, len) {
            s.options.push(SockOpt { level, name, value });
        }
    }
    match (family, sock_type) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) if protocol == libc::IPPROTO_TCP => {
            let info = getsockopt(dup, libc::IPPROTO_TCP, libc::TCP_INFO, 8)
                .map_err(|e| ("TCP_INFO", e))?;
            match info.first().copied().unwrap_or(0) {
                TCP_LISTEN => s.backlog = ctx.backlog(family, inode)?,
                TCP_ESTABLISHED => s.tcp = Some(tcp_repair(dup)?),
                TCP_CLOSE => {
                    if unbound_inet(&s.local) {
                        s.local.clear();
                    }
                }
                other => {
                    return Err(SocketError::NotSupported(format!(
                        "a TCP connection in state {}",
                        tcp_state_name(other)
                    )))
                }
            }
        }
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM) => {
            // Datagrams queued for a UDP socket are not kept (as a network
            // would, they may be lost); the socket itself is.
            if unbound_inet(&s.local) {
                s.local.clear();
            }
        }
        (libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET) => {
            let d = ctx.unix(inode)?;
            s.peer_inode = d.peer;
            if listening {
                s.backlog = d.backlog;
            } else {
                s.queue = peek_messages(dup, sock_type == libc::SOCK_STREAM)?;
            }
            // An unbound unix socket's name is just the family.
            if s.local.len() <= 2 {
                s.local.clear();
            }
            if s.peer.len() <= 2 {
                s.peer.clear();
            }
        }
        _ => {
            return Err(SocketError::NotSupported(format!(
                "a socket of family {family}, type {sock_type}, protocol {protocol}"
            )))
        }
    }
    Ok(s)
}
