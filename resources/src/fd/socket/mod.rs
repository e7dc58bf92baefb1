//! Sockets: addresses, options, queued data, and established TCP
//! connections, read from a duplicate of the frozen process's descriptor
//! (same socket); rebuilt once per restore in the restorer and handed to
//! every process that holds them.
//!
//! Covered: TCP (listening, established through `TCP_REPAIR` in [`tcp`],
//! unconnected), UDP (bound, connected; queued datagrams are not kept, as
//! a network may lose them), unix stream, datagram and seqpacket sockets
//! ([`unix`]: socket pairs whose both ends are checkpointed, with their
//! queued messages; named and unnamed listeners and bound sockets, with
//! their file's permissions and owner, or bound to a file since removed).
//! Directions shut down come back shut down. The restore side, which
//! makes every socket once, is `build.rs`.
//! Anything else is refused with what and where.

mod addr;
mod build;
mod connecting;
mod diag;
mod filter;
mod fin;
pub mod in_flight;
mod netlink;
mod packet;
mod raw;
pub mod tcp;
pub mod unix;
mod unlock;

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, SockOpt, SocketInfo};

use self::addr::{bind, connect, patiently, send_to};
use self::{
    build::build,
    diag::{InetDiag, UnixDiag},
    tcp::{tcp_repair, tcp_state_name, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN},
    unix::save_unix,
};
use super::{Descriptor, Prepare, RestoreCx, SaveCx, Seen, Shared};
use crate::{RestoreError, SaveError};

/// Sockets of every family covered.
pub struct Socket;

impl Descriptor for Socket {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Socket]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.file_type() != libc::S_IFSOCK {
            return None;
        }
        Some((|| {
            let (pid, fd) = (cx.pid, seen.fd);
            let dup = cx.dup(fd)?;
            let mut info = seen.info(FdKind::Socket);
            let sock = save_socket(&dup, info.inode, pid, cx.sockets).map_err(|e| match e {
                SocketError::NotSupported(what) => cx.refuse(fd, what),
                SocketError::Io(what, source) => SaveError::Proc {
                    pid,
                    path: format!("the socket on descriptor {fd} ({what})"),
                    source,
                },
            })?;
            if sock.tcp.is_some() {
                cx.tcp.push((fd, dup));
            }
            info.state = FdState::Socket(Box::new(sock));
            Ok(info)
        })())
    }

    fn check_tree(
        &self,
        procs: &[(i32, &[FdInfo])],
        scope: &crate::fd::TreeScope,
    ) -> Result<(), SaveError> {
        unix::check_pairs(procs, scope.ext_unix_sk)
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        opts: &Prepare,
        shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        // Those the restorer hands over are not made.
        let sockets: Vec<(i32, &SocketInfo)> = fds
            .iter()
            .filter_map(|f| match &f.state {
                FdState::Socket(s) => Some((f.fd, s.as_ref())),
                _ => None,
            })
            .filter(|(_, s)| !shared.has(FdKind::Socket, s.inode, 0))
            .collect();
        let (made, senders) = build(&sockets, opts)?;
        for (inode, fd) in made {
            shared.insert(FdKind::Socket, inode, 0, fd);
        }
        for (inode, fd) in senders {
            shared.insert_once(FdKind::Socket, inode, in_flight::ORPHAN_SENDER, fd);
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::Socket(sock) = &f.state else {
            return Err(RestoreError::NotSupported(format!(
                "socket {} without its state",
                f.fd
            )));
        };
        let ours = cx.shared.get(FdKind::Socket, sock.inode, 0, f.fd)?;
        cx.adopt(ours).map(Some)
    }
}

/// `SO_BUF_LOCK` (Linux 5.14+).
const SO_BUF_LOCK: i32 = 72;

/// Options saved for every socket, when `getsockopt` answers: level, name.
/// Buffer sizes are saved but only set again for established TCP
/// connections (whose queues must fit).
pub const SAVED_OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_PASSCRED),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_SNDBUF),
    (libc::SOL_SOCKET, libc::SO_RCVBUF),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE),
    (libc::SOL_SOCKET, SO_BUF_LOCK),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_MARK),
    (libc::SOL_SOCKET, libc::SO_PASSSEC),
    (libc::SOL_SOCKET, libc::SO_DONTROUTE),
    (libc::SOL_SOCKET, libc::SO_NO_CHECK),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::SOL_SOCKET, libc::SO_PEEK_OFF),
    (libc::SOL_SOCKET, libc::SO_LOCK_FILTER),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_PKTINFO),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_QUICKACK),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
];

/// Why a socket cannot be saved: a sentence for "not supported: ...".
#[derive(Debug)]
pub(super) enum SocketError {
    NotSupported(String),
    Io(&'static str, io::Error),
}

impl From<(&'static str, io::Error)> for SocketError {
    fn from((what, e): (&'static str, io::Error)) -> Self {
        Self::Io(what, e)
    }
}

pub(super) fn getsockopt(fd: &OwnedFd, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
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

pub(super) fn getsockopt_int(fd: &OwnedFd, level: i32, name: i32) -> io::Result<i32> {
    let v = getsockopt(fd, level, name, 4)?;
    Ok(i32::from_ne_bytes(
        v.get(..4).unwrap_or(&[0; 4]).try_into().expect("4"),
    ))
}

pub(super) fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> io::Result<()> {
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
        // A packet socket has no peer to ask for (EOPNOTSUPP).
        let none = e.raw_os_error() == Some(libc::ENOTCONN)
            || (peer && e.raw_os_error() == Some(libc::EOPNOTSUPP));
        if none {
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

/// The directions of `fd` poll shows shut down: receiving (1), or both (3,
/// a hang-up); sending alone is not visible.
fn poll_shutdown(fd: &OwnedFd) -> io::Result<u8> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd of ours, no waiting.
    check(unsafe { libc::poll(&mut p, 1, 0) })?;
    Ok(if p.revents & libc::POLLHUP != 0 {
        3
    } else {
        u8::from(p.revents & libc::POLLRDHUP != 0)
    })
}

/// The TTL an IPv4 socket that never set one reads (`IP_TTL`), as
/// `getsockopt` gives it.
fn default_ttl() -> Option<Vec<u8>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_default_ttl").ok()?;
    Some(text.trim().parse::<i32>().ok()?.to_ne_bytes().to_vec())
}

/// Whether an inet address is the unbound one (any address, port 0).
fn unbound_inet(addr: &[u8]) -> bool {
    addr.len() < 4 || (addr[2] == 0 && addr[3] == 0 && addr[4..].iter().all(|b| *b == 0))
}

/// Socket facts shared by every socket of one checkpoint (asked once).
#[derive(Default)]
pub struct Context {
    unix: Option<HashMap<u64, UnixDiag>>,
    inet: HashMap<(i32, i32), HashMap<u64, InetDiag>>,
    packet: Option<HashMap<u64, diag::PacketDiag>>,
    /// The process's numbers of the descriptors in flight on each unix
    /// socket's queue (by inode), message by message.
    in_flight: HashMap<u64, Vec<Vec<i32>>>,
    /// Each unix socket's queue as read for its descriptors in flight (by
    /// inode), for its save: read once.
    walked: HashMap<u64, unix::Walked>,
    /// Unix sockets whose queue held an empty message at the checkpoint before.
    pub(crate) read_before: std::collections::HashSet<u64>,
}

impl Context {
    /// The descriptors in flight on the queue of the socket `dup` (whose
    /// inode is `inode`), message by message, received here; empty for
    /// any socket that carries none (and every other than unix).
    pub fn peek_in_flight(
        &mut self,
        dup: &OwnedFd,
        inode: u64,
    ) -> Result<Vec<Vec<OwnedFd>>, (&'static str, io::Error)> {
        let int = |name, what| getsockopt_int(dup, libc::SOL_SOCKET, name).map_err(|e| (what, e));
        if int(libc::SO_DOMAIN, "SO_DOMAIN")? != libc::AF_UNIX {
            return Ok(Vec::new());
        }
        let ty = int(libc::SO_TYPE, "SO_TYPE")?;
        let listening = int(libc::SO_ACCEPTCONN, "SO_ACCEPTCONN")? != 0;
        let d = match self.unix(inode) {
            Ok(d) => d,
            Err(SocketError::Io(what, e)) => return Err((what, e)),
            Err(SocketError::NotSupported(_)) => return Ok(Vec::new()),
        };
        match unix::peek_in_flight(dup, ty, &d, listening) {
            Ok((fds, walked)) => {
                self.walked.extend(walked.map(|w| (inode, w)));
                Ok(fds)
            }
            Err(SocketError::Io(what, e)) => Err((what, e)),
            // Refused when the socket itself is saved.
            Err(SocketError::NotSupported(_)) => Ok(Vec::new()),
        }
    }

    /// Records the process's numbers of the descriptors in flight on the
    /// socket `inode`, message by message.
    pub fn carry(&mut self, inode: u64, numbers: Vec<Vec<i32>>) {
        self.in_flight.insert(inode, numbers);
    }

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

    /// What sock_diag says of a TCP or UDP socket; `None` when it does not
    /// list it.
    fn inet(
        &mut self,
        family: i32,
        protocol: i32,
        ino: u64,
    ) -> Result<Option<InetDiag>, SocketError> {
        let m = match self.inet.entry((family, protocol)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(diag::inet_sockets(family, protocol).map_err(|e| ("sock_diag (inet)", e))?)
            }
        };
        Ok(m.get(&ino).copied())
    }

    /// What sock_diag says of a packet socket; `None` when it does not
    /// list it.
    fn packet(&mut self, ino: u64) -> Result<Option<diag::PacketDiag>, SocketError> {
        if self.packet.is_none() {
            self.packet = Some(diag::packet_sockets().map_err(|e| ("sock_diag (packet)", e))?);
        }
        Ok(self.packet.as_ref().and_then(|m| m.get(&ino).cloned()))
    }
}

/// Saves the socket `dup` (a duplicate of the process's descriptor) whose
/// `/proc` link is `socket:[inode]`.
fn save_socket(
    dup: &OwnedFd,
    inode: u64,
    pid: i32,
    ctx: &mut Context,
) -> Result<SocketInfo, SocketError> {
    let int = |level, name, what: &'static str| {
        getsockopt_int(dup, level, name).map_err(|e| SocketError::Io(what, e))
    };
    let family = int(libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    let sock_type = int(libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")?;
    let protocol = int(libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    if !matches!(
        family,
        libc::AF_UNIX | libc::AF_INET | libc::AF_INET6 | libc::AF_NETLINK | libc::AF_PACKET
    ) {
        return Err(SocketError::NotSupported(format!(
            "a socket of family {family}, type {sock_type}, protocol {protocol}"
        )));
    }
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
    s.filter = filter::save(dup)?;
    for &(level, name) in SAVED_OPTIONS {
        let inet = matches!(family, libc::AF_INET | libc::AF_INET6);
        // A raw socket's IPV6_V6ONLY is fixed when it is made.
        let fixed = sock_type == libc::SOCK_RAW && name == libc::IPV6_V6ONLY;
        if (level == libc::IPPROTO_TCP && protocol != libc::IPPROTO_TCP)
            || (level == libc::IPPROTO_IPV6 && (family != libc::AF_INET6 || fixed))
            || (level == libc::IPPROTO_IP && !inet)
        {
            continue;
        }
        let len = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_LINGER) => 8,
            (libc::SOL_SOCKET, libc::SO_BINDTODEVICE) => libc::IFNAMSIZ,
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) => 16,
            _ => 4,
        };
        if let Ok(value) = getsockopt(dup, level, name, len) {
            // A TTL never set reads as the namespace's default: left unset.
            if (level, name) == (libc::IPPROTO_IP, libc::IP_TTL)
                && Some(&value[..]) == default_ttl().as_deref()
            {
                continue;
            }
            s.options.push(SockOpt { level, name, value });
        }
    }
    match (family, sock_type) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) if protocol == libc::IPPROTO_TCP => {
            let info = getsockopt(dup, libc::IPPROTO_TCP, libc::TCP_INFO, 8)
                .map_err(|e| ("TCP_INFO", e))?;
            let d = ctx.inet(family, protocol, inode)?;
            s.shutdown = d.map_or(0, |d| d.shutdown);
            match info.first().copied().unwrap_or(0) {
                TCP_LISTEN => s.backlog = d.map_or(128, |d| d.backlog),
                TCP_ESTABLISHED => s.tcp = Some(tcp_repair(dup, 0)?),
                tcp::TCP_SYN_SENT => {
                    // getpeername answers ENOTCONN until the connection is made.
                    let d = d.ok_or_else(|| {
                        SocketError::NotSupported(
                            "a TCP connection being made that sock_diag does not show".into(),
                        )
                    })?;
                    s.peer = connecting::peer(family, &d.key);
                    s.tcp = Some(connecting::save(dup)?);
                }
                half if cr_ebpf_image::TCP_HALF_CLOSED.contains(&half) => {
                    s.tcp = Some(tcp_repair(dup, half)?)
                }
                TCP_CLOSE => {
                    // sock_diag shows a closed socket only while it holds
                    // its port (bound, not yet connected); one whose
                    // connection ended gave its port back and keeps only
                    // the name.
                    if unbound_inet(&s.local) || d.is_none() {
                        s.local.clear();
                    }
                    if tcp::closed_at_end(dup)? {
                        s.shutdown = 3;
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
            s.shutdown = match ctx.inet(family, protocol, inode)? {
                Some(d) => d.shutdown,
                None if protocol == libc::IPPROTO_UDP && !s.local.is_empty() => {
                    return Err(SocketError::NotSupported(
                        "a UDP socket that sock_diag does not list (its shutdown state is unknown)"
                            .into(),
                    ))
                }
                // Unbound UDP sockets (sock_diag lists bound ones) and ping
                // sockets (no sock_diag handler): poll shows a shut down
                // receiving side; a sending side shut down alone is not
                // visible (such sockets are rarely shut down).
                None => poll_shutdown(dup).map_err(|e| ("poll", e))?,
            };
        }
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_RAW) => raw::save_raw(dup, &mut s)?,
        (libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_DGRAM) => {
            netlink::save_netlink(dup, &mut s)?
        }
        (libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_DGRAM | packet::SOCK_PACKET) => {
            let d = ctx.packet(inode)?;
            packet::save(dup, &mut s, pid, inode, d)?
        }
        (libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET) => {
            let d = ctx.unix(inode)?;
            let carried = ctx.in_flight.get(&inode).cloned();
            let walked = (
                ctx.walked.get(&inode).cloned(),
                ctx.read_before.contains(&inode),
            );
            save_unix(dup, &mut s, &d, pid, carried.as_ref(), walked)?;
        }
        _ => {
            return Err(SocketError::NotSupported(format!(
                "a socket of family {family}, type {sock_type}, protocol {protocol}"
            )))
        }
    }
    Ok(s)
}

pub(super) fn fail(call: impl Into<String>) -> impl FnOnce(io::Error) -> RestoreError {
    let call = call.into();
    move |err| RestoreError::Syscall { call, err }
}

pub(super) fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(super) fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
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

pub(super) fn set_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    setsockopt(fd, level, name, &v.to_ne_bytes())
}

pub(super) fn socket(s: &SocketInfo) -> io::Result<OwnedFd> {
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

/// Sends all of `data` (one message), retrying short writes of a stream.
pub(super) fn send_all(fd: &OwnedFd, data: &[u8], flags: i32) -> io::Result<()> {
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

/// Options as saved, before binding; buffer sizes only where the process
/// set them (for TCP connections they are set with the queues). On a
/// TCP connection rebuilt in repair mode (`repaired`) they come after
/// `connect`: then `SO_REUSEADDR` waits for the end of repair mode, which
/// clears it, and `IPV6_V6ONLY`, which the kernel takes only before `bind`,
/// was set already ([`set_v6only`]).
pub(super) fn apply_options(
    fd: &OwnedFd,
    s: &SocketInfo,
    repaired: bool,
) -> Result<(), RestoreError> {
    for o in &s.options {
        let buffer =
            o.level == libc::SOL_SOCKET && matches!(o.name, libc::SO_SNDBUF | libc::SO_RCVBUF);
        let reuse = o.level == libc::SOL_SOCKET && o.name == libc::SO_REUSEADDR;
        let v6only = o.level == libc::IPPROTO_IPV6 && o.name == libc::IPV6_V6ONLY;
        if buffer || lock_filter(o) || packet::after_bind(o) || (repaired && (reuse || v6only)) {
            continue;
        }
        setsockopt(fd, o.level, o.name, &o.value).map_err(fail(format!(
            "setsockopt({}, {}) on a restored socket",
            o.level, o.name
        )))?;
    }
    // A buffer size the process set (the kernel says so in SO_BUF_LOCK)
    // is set again: the kernel doubles what it is given, as it did.
    // Sizes it never set are the kernel's to choose again. (A TCP
    // connection gets its sizes when its queues are back.)
    if s.tcp.is_none() {
        let locked = option_int(s, libc::SOL_SOCKET, SO_BUF_LOCK).unwrap_or(0);
        for (bit, name, force) in [
            (1, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
            (2, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        ] {
            if let (true, Some(v)) = (locked & bit != 0, option_int(s, libc::SOL_SOCKET, name)) {
                set_int(fd, libc::SOL_SOCKET, force, v / 2)
                    .or_else(|_| set_int(fd, libc::SOL_SOCKET, name, v / 2))
                    .map_err(fail("SO_SNDBUF/SO_RCVBUF on a restored socket"))?;
            }
        }
    }
    if !s.filter.is_empty() {
        filter::attach(fd, &s.filter).map_err(fail("SO_ATTACH_FILTER on a restored socket"))?;
    }
    // Locked once the filter is there (a locked filter cannot change).
    for o in s.options.iter().filter(|o| lock_filter(o)) {
        setsockopt(fd, o.level, o.name, &o.value).map_err(fail("SO_LOCK_FILTER"))?;
    }
    Ok(())
}

fn lock_filter(o: &SockOpt) -> bool {
    o.level == libc::SOL_SOCKET && o.name == libc::SO_LOCK_FILTER
}

/// `IPV6_V6ONLY` as saved, on a socket not bound yet.
pub(super) fn set_v6only(fd: &OwnedFd, s: &SocketInfo) -> Result<(), RestoreError> {
    match option_int(s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) {
        Some(v) => set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v)
            .map_err(fail("setsockopt(IPV6_V6ONLY) on a restored socket")),
        None => Ok(()),
    }
}

pub(super) fn option_int(s: &SocketInfo, level: i32, name: i32) -> Option<i32> {
    s.options
        .iter()
        .find(|o| o.level == level && o.name == name)
        .and_then(|o| Some(i32::from_ne_bytes(o.value.get(..4)?.try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::{fd::AsRawFd as _, unix::net::UnixStream},
    };

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_unix_socket_pair_comes_back_with_its_queued_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"to b").unwrap();
        (&b).write_all(b"to a").unwrap();
        let saved = testing::save_own_many(&[a.as_raw_fd(), b.as_raw_fd()]);
        let (sa, sb) = match (&saved[0].state, &saved[1].state) {
            (FdState::Socket(x), FdState::Socket(y)) => (x.clone(), y.clone()),
            other => panic!("{other:?}"),
        };
        assert_eq!((sa.peer_inode, sb.peer_inode), (sb.inode, sa.inode));
        assert_eq!(
            (sa.queue.clone(), sb.queue.clone()),
            (vec![b"to a".to_vec()], vec![b"to b".to_vec()])
        );
        // Left in place for the process.
        let mut buf = [0u8; 4];
        (&a).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to a");

        let (rec, shared) = testing::restore_keeping(&testing::manifest(saved.clone()));
        assert_eq!(rec.names().iter().filter(|n| *n == "adopt").count(), 2);
        let na = UnixStream::from(
            shared
                .get(FdKind::Socket, sa.inode, 0, 0)
                .unwrap()
                .try_clone()
                .unwrap(),
        );
        let nb = UnixStream::from(
            shared
                .get(FdKind::Socket, sb.inode, 0, 0)
                .unwrap()
                .try_clone()
                .unwrap(),
        );
        (&na).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to a");
        (&nb).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to b");
        (&na).write_all(b"ping").unwrap();
        (&nb).read_exact(&mut buf).unwrap();
        assert_eq!(
            &buf, b"ping",
            "the rebuilt ends are connected to each other"
        );
    }

    #[test]
    fn one_end_of_a_pair_alone_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut owner = testing::SaveOwner::new();
        let info = Socket
            .save(&mut owner.cx(), &testing::seen(a.as_raw_fd()))
            .unwrap()
            .unwrap();
        let err = Socket
            .check_tree(&[(1, &[info][..])], &Default::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("connected to a socket outside"),
            "{err}"
        );
    }

    #[test]
    fn a_datagram_socket_connected_to_a_named_one_outside_connects_to_it_again() {
        use std::os::unix::net::{UnixDatagram, UnixListener};
        let dir = testing::scratch("sk-outside");
        let log = dir.join("log");
        let outside = UnixDatagram::bind(&log).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.connect(&log).unwrap();
        let saved = testing::save_own_many(&[client.as_raw_fd()]);
        Socket
            .check_tree(&[(1, &saved[..])], &Default::default())
            .expect("a datagram socket connected to a name outside is kept");
        let inode = match &saved[0].state {
            FdState::Socket(x) => x.inode,
            other => panic!("{other:?}"),
        };
        drop(client);
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        let again = UnixDatagram::from(
            shared
                .get(FdKind::Socket, inode, 0, 0)
                .unwrap()
                .try_clone()
                .unwrap(),
        );
        again.send(b"line").unwrap();
        let mut buf = [0u8; 8];
        let n = outside.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"line");
        // A stream connection to a listener outside: refused, naming it.
        let l = dir.join("stream");
        let listener = UnixListener::bind(&l).unwrap();
        let stream = std::os::unix::net::UnixStream::connect(&l).unwrap();
        let _accepted = listener.accept().unwrap();
        let saved = testing::save_own_many(&[stream.as_raw_fd()]);
        let err = Socket
            .check_tree(&[(1, &saved[..])], &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&l.display().to_string()) && err.contains("new client"),
            "{err}"
        );
    }

    #[test]
    fn buffer_sizes_the_process_set_come_back_and_the_others_stay_the_kernels() {
        let set = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let unset = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_int(
            &std::os::fd::AsFd::as_fd(&set).try_clone_to_owned().unwrap(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            150_000,
        )
        .unwrap();
        let size = |fd: &OwnedFd, name| getsockopt_int(fd, libc::SOL_SOCKET, name).unwrap();
        let owned =
            |u: &std::net::UdpSocket| std::os::fd::AsFd::as_fd(u).try_clone_to_owned().unwrap();
        let want = (
            size(&owned(&set), libc::SO_RCVBUF),
            size(&owned(&unset), libc::SO_RCVBUF),
        );
        let saved = testing::save_own_many(&[set.as_raw_fd(), unset.as_raw_fd()]);
        let inodes: Vec<u64> = saved
            .iter()
            .map(|f| match &f.state {
                FdState::Socket(x) => x.inode,
                other => panic!("{other:?}"),
            })
            .collect();
        drop((set, unset));
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        let again = |i: usize| {
            shared
                .get(FdKind::Socket, inodes[i], 0, 0)
                .unwrap()
                .try_clone()
                .unwrap()
        };
        assert_eq!(size(&again(0), libc::SO_RCVBUF), want.0, "the size it set");
        assert_eq!(size(&again(1), libc::SO_RCVBUF), want.1, "the kernel's");
        assert_eq!(
            getsockopt_int(&again(1), libc::SOL_SOCKET, SO_BUF_LOCK).unwrap(),
            0,
            "not locked"
        );
    }

    #[test]
    fn a_tcp_listener_and_a_udp_socket_are_bound_again() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.connect(l.local_addr().unwrap()).unwrap();
        let saved = testing::save_own_many(&[l.as_raw_fd(), u.as_raw_fd()]);
        let (sl, su) = match (&saved[0].state, &saved[1].state) {
            (FdState::Socket(x), FdState::Socket(y)) => (x.clone(), y.clone()),
            other => panic!("{other:?}"),
        };
        assert!(sl.listening && sl.backlog > 0);
        assert_eq!(su.sock_type as i32, libc::SOCK_DGRAM);
        let (l_addr, u_addr) = (l.local_addr().unwrap(), u.local_addr().unwrap());
        drop((l, u)); // the process is gone: its addresses are free again
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        let nl = std::net::TcpListener::from(
            shared
                .get(FdKind::Socket, sl.inode, 0, 0)
                .unwrap()
                .try_clone()
                .unwrap(),
        );
        let nu = std::net::UdpSocket::from(
            shared
                .get(FdKind::Socket, su.inode, 0, 0)
                .unwrap()
                .try_clone()
                .unwrap(),
        );
        assert_eq!(nl.local_addr().unwrap(), l_addr);
        assert_eq!(nu.local_addr().unwrap(), u_addr);
        assert_eq!(nu.peer_addr().unwrap(), l_addr);
        let c = std::net::TcpStream::connect(l_addr).unwrap();
        let (s, _) = nl.accept().unwrap();
        assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
    }

    #[test]
    fn a_socket_filter_and_options_are_saved_and_set_again() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // SAFETY: setsockopt on our socket with a value of ours.
        let set = |name: i32, v: i32| unsafe {
            libc::setsockopt(
                u.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&v as *const i32).cast(),
                4,
            )
        };
        assert_eq!(set(libc::SO_PRIORITY, 5), 0);
        let saved = testing::save_own(u.as_raw_fd());
        let FdState::Socket(sock) = &saved.state else {
            panic!("{saved:?}")
        };
        assert!(sock
            .options
            .iter()
            .any(|o| o.name == libc::SO_PRIORITY && o.value == 5i32.to_ne_bytes()));
        // "accept everything": one BPF_RET instruction.
        let insn = [libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: insn.as_ptr().cast_mut(),
        };
        // SAFETY: attaching our filter program to our socket.
        let r = unsafe {
            libc::setsockopt(
                u.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(set(libc::SO_LOCK_FILTER, 1), 0);
        let saved = testing::save_own(u.as_raw_fd());
        let FdState::Socket(sock) = &saved.state else {
            panic!("{saved:?}")
        };
        assert_eq!(sock.filter, [6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        let addr = u.local_addr().unwrap();
        drop(u);
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(vec![saved.clone()]));
        let made = shared.get(FdKind::Socket, sock.inode, 0, 0).unwrap();
        assert_eq!(filter::save(made).unwrap(), sock.filter, "attached again");
        assert_eq!(
            getsockopt_int(made, libc::SOL_SOCKET, libc::SO_LOCK_FILTER).unwrap(),
            1,
            "and locked again"
        );
        assert_eq!(
            getsockopt_int(made, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap(),
            5
        );
        assert_eq!(
            std::net::UdpSocket::from(made.try_clone().unwrap())
                .local_addr()
                .unwrap(),
            addr
        );
    }
}
