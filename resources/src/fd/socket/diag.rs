//! What only the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`) tell:
//! which unix socket is connected to which, and a listening TCP socket's
//! backlog. One dump request per question, answered for every socket of
//! the network namespace, keyed by socket inode.

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
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_RQLEN: u32 = 16;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const TCP_LISTEN_STATE: u32 = 10;

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

/// What sock_diag says of one unix socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnixDiag {
    /// The peer's inode (0: none).
    pub peer: u64,
    /// For a listener, its backlog.
    pub backlog: u32,
}

/// Every unix socket of the namespace, by inode.
pub fn unix_sockets() -> io::Result<HashMap<u64, UnixDiag>> {
    let mut body = Vec::new();
    body.push(libc::AF_UNIX as u8); // family
    body.push(0); // protocol
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    body.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    body.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes());
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    body.extend_from_slice(&u32::MAX.to_ne_bytes());
    let mut out = HashMap::new();
    dump(&body, |m| {
        // struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
        if m.len() < 16 {
            return;
        }
        let ino = u32::from_ne_bytes(m[4..8].try_into().expect("4")) as u64;
        let mut d = UnixDiag::default();
        let mut attrs = &m[16..];
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes(attrs[0..2].try_into().expect("2")) as usize;
            let kind = u16::from_ne_bytes(attrs[2..4].try_into().expect("2"));
            if len < 4 || len > attrs.len() {
                break;
            }
            if kind == UNIX_DIAG_PEER && len >= 8 {
                d.peer = u32::from_ne_bytes(attrs[4..8].try_into().expect("4")) as u64;
            }
            if kind == UNIX_DIAG_RQLEN && len >= 12 {
                // {rqueue, wqueue}: for a listener, pending connections and backlog.
                d.backlog = u32::from_ne_bytes(attrs[8..12].try_into().expect("4"));
            }
            attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
        }
        out.insert(ino, d);
    })?;
    Ok(out)
}

/// Listening TCP sockets of `family` (`AF_INET`/`AF_INET6`): inode -> backlog.
pub fn tcp_backlogs(family: i32) -> io::Result<HashMap<u64, u32>> {
    let mut body = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
    body.extend_from_slice(&(1u32 << TCP_LISTEN_STATE).to_ne_bytes());
    body.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: any
    let mut out = HashMap::new();
    dump(&body, |m| {
        // struct inet_diag_msg: family, state, timer, retrans, id (48 bytes),
        // expires, rqueue, wqueue (the backlog for a listener), uid, inode.
        if m.len() < 72 {
            return;
        }
        let backlog = u32::from_ne_bytes(m[60..64].try_into().expect("4"));
        let ino = u32::from_ne_bytes(m[68..72].try_into().expect("4")) as u64;
        out.insert(ino, backlog);
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
    fn a_listener_reports_its_backlog() {
        // std's listen() uses a fixed backlog; set our own through libc.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen again on our own socket with another backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 77) }, 0);
        let backlogs = tcp_backlogs(libc::AF_INET).expect("sock_diag for TCP");
        assert_eq!(backlogs.get(&inode(&l)), Some(&77));
    }
}
