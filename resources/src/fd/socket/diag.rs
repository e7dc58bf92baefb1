//! What only the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) tell:
//! which unix socket is connected to which and the file it is bound to, a
//! listening socket's backlog, what a socket has sent that is still
//! queued at its peer, and which directions were shut down (`shutdown`).
//! One dump request per question, answered for every socket of the
//! network namespace, keyed by socket inode.

use cr_ebpf_common::netlock::{mapped_v4, NetLockKey};
use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_VFS: u32 = 2;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_RQLEN: u32 = 16;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;
const INET_DIAG_SHUTDOWN: u16 = 8;
const TCP_LISTEN_STATE: u32 = 10;
/// Length of `struct inet_diag_msg`, after which its attributes follow.
const INET_DIAG_MSG_LEN: usize = 72;

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one dump request (`body` after the netlink header) and calls `each`
/// with the payload of every answer message.
fn dump(body: &[u8], mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let sock = netlink()?;
    let mut req = Vec::with_capacity(16 + body.len());
    req.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    req.extend_from_slice(body);
    // SAFETY: sending our own buffer on our socket (to the kernel, address 0).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msg = &buf[..n as usize];
        while msg.len() >= 16 {
            let len = u32::from_ne_bytes(msg[0..4].try_into().expect("4")) as usize;
            let kind = u16::from_ne_bytes(msg[4..6].try_into().expect("2"));
            if len < 16 || len > msg.len() {
                return Err(io::Error::other("malformed sock_diag answer"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(msg[16..20].try_into().expect("4"));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => each(&msg[16..len]),
            }
            msg = &msg[(len + 3) & !3..];
        }
    }
}

/// Calls `each` with the kind and payload of every netlink attribute of
/// `attrs`.
fn attributes(mut attrs: &[u8], mut each: impl FnMut(u16, &[u8])) {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().expect("2")) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().expect("2"));
        if len < 4 || len > attrs.len() {
            break;
        }
        each(kind, &attrs[4..len]);
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// What sock_diag says of one unix socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// The peer's inode (0: none, or a connection not accepted yet).
    pub peer: u64,
    /// For a listener, its backlog.
    pub backlog: u32,
    /// For a listener, the connections waiting to be accepted.
    pub pending: u32,
    /// For any other socket, the bytes it sent that its peer has not read.
    pub outq: u32,
    /// `sk_shutdown`: 1 receiving shut down, 2 sending.
    pub shutdown: u8,
    /// The file it is bound to: inode and device (the kernel's `dev_t`,
    /// major << 20 | minor); `None` for an unbound or abstract socket.
    pub vfs: Option<(u32, u32)>,
    /// The connection state (`TCP_ESTABLISHED`, `TCP_LISTEN`, `TCP_CLOSE`).
    pub state: u8,
}

/// Every unix socket of the namespace, by inode.
pub fn unix_sockets() -> io::Result<HashMap<u64, UnixDiag>> {
    let mut body = Vec::new();
    body.push(libc::AF_UNIX as u8); // family
    body.push(0); // protocol
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    body.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    body.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_VFS).to_ne_bytes());
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    body.extend_from_slice(&u32::MAX.to_ne_bytes());
    let mut out = HashMap::new();
    dump(&body, |m| {
        // struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
        if m.len() < 16 {
            return;
        }
        let ino = u32::from_ne_bytes(m[4..8].try_into().expect("4")) as u64;
        let listening = m[2] == TCP_LISTEN_STATE as u8;
        let mut d = UnixDiag {
            state: m[2],
            ..UnixDiag::default()
        };
        attributes(&m[16..], |kind, a| match kind {
            UNIX_DIAG_PEER => d.peer = u32_at(a, 0).unwrap_or(0) as u64,
            // {rqueue, wqueue}: for a listener, pending connections and
            // backlog; otherwise unread bytes and bytes sent not yet read.
            UNIX_DIAG_RQLEN if listening => {
                d.pending = u32_at(a, 0).unwrap_or(0);
                d.backlog = u32_at(a, 4).unwrap_or(0);
            }
            UNIX_DIAG_RQLEN => d.outq = u32_at(a, 4).unwrap_or(0),
            UNIX_DIAG_SHUTDOWN => d.shutdown = a.first().copied().unwrap_or(0),
            UNIX_DIAG_VFS => d.vfs = u32_at(a, 0).zip(u32_at(a, 4)),
            _ => {}
        });
        out.insert(ino, d);
    })?;
    Ok(out)
}

/// What sock_diag says of one TCP or UDP socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InetDiag {
    /// For a listener, its backlog.
    pub backlog: u32,
    /// `sk_shutdown`: 1 receiving shut down, 2 sending.
    pub shutdown: u8,
    /// Its TCP state (`TCP_ESTABLISHED` 1, ... `TCP_LISTEN` 10).
    pub state: u8,
    /// Its addresses and ports, from its own side (IPv4 ones mapped).
    pub key: NetLockKey,
}

/// The sockets of `family` (`AF_INET`/`AF_INET6`) and `protocol`
/// (`IPPROTO_TCP`/`IPPROTO_UDP`) in every state, by inode; none for a
/// protocol sock_diag has no handler for (`ENOENT`, ping sockets).
pub fn inet_sockets(family: i32, protocol: i32) -> io::Result<HashMap<u64, InetDiag>> {
    let mut body = vec![family as u8, protocol as u8, 0, 0];
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    body.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: any
    let mut out = HashMap::new();
    let r = dump(&body, |m| {
        // struct inet_diag_msg: family, state, timer, retrans, id (48 bytes),
        // expires, rqueue, wqueue (the backlog for a listener), uid, inode.
        if m.len() < INET_DIAG_MSG_LEN {
            return;
        }
        let mut d = InetDiag {
            state: m[1],
            key: key_of(m),
            ..InetDiag::default()
        };
        if u32::from(m[1]) == TCP_LISTEN_STATE {
            d.backlog = u32_at(m, 60).unwrap_or(0);
        }
        let ino = u32_at(m, 68).unwrap_or(0) as u64;
        attributes(&m[INET_DIAG_MSG_LEN..], |kind, a| {
            if kind == INET_DIAG_SHUTDOWN {
                d.shutdown = a.first().copied().unwrap_or(0);
            }
        });
        out.insert(ino, d);
    });
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(HashMap::new()),
        other => other.map(|()| out),
    }
}

/// The addresses and ports of a `struct inet_diag_msg`'s socket id:
/// sport, dport (network byte order), src, dst (16 bytes each).
fn key_of(m: &[u8]) -> NetLockKey {
    let addr = |at: usize| -> [u8; 16] {
        let mut a = [0u8; 16];
        if m[0] == libc::AF_INET as u8 {
            a = mapped_v4([m[at], m[at + 1], m[at + 2], m[at + 3]]);
        } else {
            a.copy_from_slice(&m[at..at + 16]);
        }
        a
    };
    NetLockKey {
        local: addr(8),
        remote: addr(24),
        local_port: u16::from_ne_bytes([m[4], m[5]]),
        remote_port: u16::from_ne_bytes([m[6], m[7]]),
    }
}

/// What sock_diag says of one packet socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketDiag {
    /// The protocol it receives, as `socket` and `bind` take it (network
    /// byte order; `SO_PROTOCOL` answers 0 for packet sockets).
    pub protocol: u16,
    /// `PACKET_COPY_THRESH` (no `getsockopt` reads it).
    pub copy_thresh: u32,
    /// The receive ring's `struct tpacket_req3` fields (block size and
    /// count, frame size and count, retire timeout, private size,
    /// features), if it has one.
    pub rx_ring: Option<[u32; 7]>,
    /// The transmit ring's, likewise.
    pub tx_ring: Option<[u32; 7]>,
    /// Its memberships.
    pub memberships: Vec<PacketMembership>,
    /// Its fanout group as `PACKET_FANOUT` takes it (id, kind << 16, flags
    /// << 24); 0 for none.
    pub fanout: u32,
}

/// A membership of a packet socket (`PACKET_ADD_MEMBERSHIP`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketMembership {
    /// `struct packet_mreq`: interface index, kind, address length,
    /// address (8 bytes).
    pub mreq: Vec<u8>,
    /// How many times it was added.
    pub count: u32,
}

const PACKET_SHOW_INFO: u32 = 1;
const PACKET_SHOW_MCLIST: u32 = 2;
const PACKET_SHOW_RING_CFG: u32 = 4;
const PACKET_SHOW_FANOUT: u32 = 8;
const PACKET_DIAG_INFO: u16 = 0;
const PACKET_DIAG_MCLIST: u16 = 1;
const PACKET_DIAG_RX_RING: u16 = 2;
const PACKET_DIAG_TX_RING: u16 = 3;
const PACKET_DIAG_FANOUT: u16 = 4;
/// Length of `struct packet_diag_msg`, after which its attributes follow.
const PACKET_DIAG_MSG_LEN: usize = 16;
/// Length of `struct packet_diag_mclist`.
const PACKET_MCLIST_LEN: usize = 44;

/// Every packet socket of the namespace, by inode.
pub fn packet_sockets() -> io::Result<HashMap<u64, PacketDiag>> {
    let mut body = vec![libc::AF_PACKET as u8, 0, 0, 0];
    body.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    let show = PACKET_SHOW_INFO | PACKET_SHOW_MCLIST | PACKET_SHOW_RING_CFG | PACKET_SHOW_FANOUT;
    body.extend_from_slice(&show.to_ne_bytes());
    body.extend_from_slice(&[0u8; 8]); // cookie
    let mut out = HashMap::new();
    dump(&body, |m| {
        if m.len() < PACKET_DIAG_MSG_LEN {
            return;
        }
        let ino = u32_at(m, 4).unwrap_or(0) as u64;
        let mut d = PacketDiag {
            // struct packet_diag_msg: family, type, num (the protocol, in
            // host byte order here), inode
            protocol: u16::from_ne_bytes([m[2], m[3]]).to_be(),
            ..PacketDiag::default()
        };
        let ring = |a: &[u8]| {
            let mut r = [0u32; 7];
            for (i, v) in r.iter_mut().enumerate() {
                *v = u32_at(a, i * 4).unwrap_or(0);
            }
            r
        };
        attributes(&m[PACKET_DIAG_MSG_LEN..], |kind, a| match kind {
            // struct packet_diag_info: index, version, reserve, copy_thresh, ...
            PACKET_DIAG_INFO => d.copy_thresh = u32_at(a, 12).unwrap_or(0),
            PACKET_DIAG_MCLIST => {
                for e in a.chunks_exact(PACKET_MCLIST_LEN) {
                    // index, count, type (u16), alen (u16), addr[32]
                    let alen = u16::from_ne_bytes([e[10], e[11]]) as usize;
                    let mut mreq = e[0..4].to_vec();
                    mreq.extend_from_slice(&e[8..12]);
                    mreq.extend_from_slice(&e[12..12 + alen.clamp(8, 32)]);
                    d.memberships.push(PacketMembership {
                        mreq,
                        count: u32_at(e, 4).unwrap_or(1),
                    });
                }
            }
            PACKET_DIAG_RX_RING => d.rx_ring = Some(ring(a)),
            PACKET_DIAG_TX_RING => d.tx_ring = Some(ring(a)),
            PACKET_DIAG_FANOUT => d.fanout = u32_at(a, 0).unwrap_or(0),
            _ => {}
        });
        out.insert(ino, d);
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(fd: &impl AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let s = link.to_string_lossy();
        s.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn a_socket_pair_is_found_as_two_peers() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let all = unix_sockets().expect("sock_diag for unix sockets");
        assert_eq!(all[&inode(&a)].peer, inode(&b));
        assert_eq!(all[&inode(&b)].peer, inode(&a));
    }

    #[test]
    fn a_closed_socket_is_found_only_while_it_holds_its_port() {
        // SAFETY: a new socket of ours.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(raw >= 0);
        // SAFETY: we own it.
        let bound = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a sockaddr_in of ours.
        let r = unsafe {
            libc::bind(
                bound.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of_val(&addr) as u32,
            )
        };
        assert_eq!(r, 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        drop(l);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let all = inet_sockets(libc::AF_INET, libc::IPPROTO_TCP).expect("sock_diag for TCP");
        assert!(all.contains_key(&inode(&bound)), "bound, never connected");
        assert!(!all.contains_key(&inode(&a)), "its connection closed");
        assert!(!all.contains_key(&inode(&c)), "its connection closed");
    }

    #[test]
    fn a_connection_reports_its_state_addresses_and_ports() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        let all = inet_sockets(libc::AF_INET, libc::IPPROTO_TCP).expect("sock_diag for TCP");
        let k = all[&inode(&c)].key;
        assert_eq!(k.local, mapped_v4([127, 0, 0, 1]));
        assert_eq!(k.local_port, c.local_addr().unwrap().port().to_be());
        assert_eq!(k.remote_port, l.local_addr().unwrap().port().to_be());
        assert_eq!(all[&inode(&a)].key, k.reversed());
        assert_eq!(all[&inode(&c)].state, 1);
        assert_eq!(all[&inode(&l)].state, TCP_LISTEN_STATE as u8);
    }

    #[test]
    fn a_listener_reports_its_backlog() {
        // std's listen() uses a fixed backlog; set our own through libc.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen again on our own socket with another backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 77) }, 0);
        let all = inet_sockets(libc::AF_INET, libc::IPPROTO_TCP).expect("sock_diag for TCP");
        assert_eq!(all[&inode(&l)].backlog, 77);
    }

    #[test]
    fn shutdown_and_bound_files_are_reported() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.shutdown(std::net::Shutdown::Read).unwrap();
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.connect(u.local_addr().unwrap()).unwrap();
        // SAFETY: plain syscall on our socket.
        assert_eq!(unsafe { libc::shutdown(u.as_raw_fd(), libc::SHUT_WR) }, 0);
        let dir = std::env::temp_dir().join(format!("diag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let all = unix_sockets().expect("sock_diag for unix sockets");
        // Shutting down one end shuts the other's opposite direction.
        assert_eq!((all[&inode(&a)].shutdown, all[&inode(&b)].shutdown), (1, 2));
        let st = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(all[&inode(&l)].vfs.map(|v| v.0 as u64), Some(st.ino()));
        assert_eq!(all[&inode(&a)].vfs, None);
        let udp = inet_sockets(libc::AF_INET, libc::IPPROTO_UDP).expect("sock_diag for UDP");
        assert_eq!(udp[&inode(&u)].shutdown, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
