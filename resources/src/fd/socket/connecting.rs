//! TCP connections still being made (`SYN-SENT`: the process called
//! `connect` and no answer came yet, as when a firewall drops its SYNs).
//!
//! Saved: the connection's first sequence number (that of its SYN), read
//! in repair mode; one that queued bytes to go with its SYN (TCP Fast
//! Open) is refused. Rebuilt: bound to its address in repair mode, given
//! that sequence number, and once every socket of the restore exists and
//! the network lock is gone, connected again without waiting. Its SYN goes
//! out again with the same sequence number, as a retransmission of the
//! first would, and the process finds the connection being made, or made,
//! as it would have: a `connect` it was blocked in waits again, and the
//! descriptor becomes writable once the peer answers.

use std::os::fd::{AsRawFd as _, OwnedFd};

use cr_ebpf_image::{SocketInfo, TcpRepair};

use super::{
    bind, check, fail, getsockopt_int, option_int, set_int, set_v6only, setsockopt_int, socket,
    tcp::{
        connect_again, enter_repair, in_repair, peek, TCP_NO_QUEUE, TCP_QUEUE_SEQ,
        TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, TCP_SYN_SENT,
    },
    SocketError,
};
use crate::RestoreError;

/// The address a connection being made goes to, as sock_diag gives it
/// (`key`, IPv4 addresses mapped), for a socket of `family`: `struct
/// sockaddr_in` or `sockaddr_in6` bytes.
pub(super) fn peer(family: i32, key: &cr_ebpf_common::netlock::NetLockKey) -> Vec<u8> {
    let mut a = (family as u16).to_ne_bytes().to_vec();
    a.extend(key.remote_port.to_ne_bytes());
    if family == libc::AF_INET {
        a.extend(&key.remote[12..]);
        a.extend([0; 8]);
    } else {
        a.extend([0; 4]);
        a.extend(key.remote);
        a.extend([0; 4]);
    }
    a
}

/// Reads a connection in `SYN-SENT`: the sequence number of its SYN.
pub(super) fn save(fd: &OwnedFd) -> Result<TcpRepair, SocketError> {
    let (write_seq, queued) = in_repair(fd, || {
        setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            .map_err(|e| ("TCP_REPAIR_QUEUE", e))?;
        let seq = getsockopt_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)
            .map_err(|e| ("TCP_QUEUE_SEQ", e))?;
        // The kernel counts no bytes queued before the connection is made:
        // look for them.
        let queued = peek(fd, 1 << 16).map_err(|e| ("reading the send queue", e))?;
        setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
            .map_err(|e| ("TCP_REPAIR_QUEUE", e))?;
        Ok((seq as u32, queued))
    })?;
    if !queued.is_empty() {
        return Err(SocketError::NotSupported(format!(
            "a TCP connection being made with {} bytes to go with its SYN (TCP Fast Open)",
            queued.len()
        )));
    }
    Ok(TcpRepair {
        // The SYN took one sequence number.
        send_seq: write_seq.wrapping_sub(1),
        state: TCP_SYN_SENT,
        ..TcpRepair::default()
    })
}

/// A connection in `SYN-SENT`, bound to its address with its first
/// sequence number; still in repair mode and not connected ([`connect_now`]
/// does that once every socket exists).
pub(super) fn rebuild(s: &SocketInfo, t: &TcpRepair) -> Result<OwnedFd, RestoreError> {
    let fd = socket(s).map_err(fail("socket (TCP connection being made)"))?;
    // The window its SYN offers comes from the receive buffer.
    for (name, force) in [
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
    ] {
        if let Some(v) = option_int(s, libc::SOL_SOCKET, name).filter(|v| *v > 0) {
            set_int(&fd, libc::SOL_SOCKET, force, v / 2).map_err(fail("SO_*BUFFORCE"))?;
        }
    }
    enter_repair(&fd)?;
    set_v6only(&fd, s)?;
    // In repair mode binding succeeds next to a listener on the same port.
    bind(&fd, &s.local).map_err(fail("bind (TCP connection being made)"))?;
    let tcp = |name, v: i32, what: &str| {
        set_int(&fd, libc::IPPROTO_TCP, name, v).map_err(fail(what.to_string()))
    };
    tcp(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(TCP_QUEUE_SEQ, t.send_seq as i32, "TCP_QUEUE_SEQ (send)")?;
    tcp(TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    super::apply_options(&fd, s, true)?;
    Ok(fd)
}

/// Connects a connection [`rebuild`] made, out of repair mode now, without
/// waiting for the peer: its SYN goes out.
pub(super) fn connect_now(fd: &OwnedFd, s: &SocketInfo) -> Result<(), RestoreError> {
    // SAFETY: plain fcntl on our socket.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    check(flags).map_err(fail("fcntl (TCP connection being made)"))?;
    let set = |f: i32| {
        // SAFETY: plain fcntl on our socket.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, f) })
            .map_err(fail("fcntl (TCP connection being made)"))
    };
    set(flags | libc::O_NONBLOCK)?;
    let r = connect_again(fd, s);
    set(flags)?;
    r
}
