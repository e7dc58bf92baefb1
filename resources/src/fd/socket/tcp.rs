//! Established TCP connections through `TCP_REPAIR`: saved from a
//! duplicate of the frozen process's socket (sequence numbers, both queues,
//! MSS, window scaling, SACK, timestamps, the window), and rebuilt in the
//! restorer without a handshake, or closed with a reset when asked.
//!
//! A rebuilt connection leaves repair mode only once every socket of the
//! restore exists (`release`): leaving it sends a window probe, which a
//! peer restored in the same restore but not made yet would answer with a
//! reset.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use cr_ebpf_image::{SocketInfo, TcpRepair, SOCKET_QUEUE_CAP};

use super::{
    apply_options, bind, connect, fail, getsockopt, getsockopt_int, option_int, patiently,
    send_all, set_int, set_v6only, setsockopt, setsockopt_int, socket, SocketError,
};
use crate::RestoreError;

/// `TCP_REPAIR`: the socket in repair mode (no packets; state settable).
pub(super) const TCP_REPAIR: i32 = 19;
pub(super) const TCP_REPAIR_QUEUE: i32 = 20;
pub(super) const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
pub(super) const TCP_SEND_QUEUE: i32 = 2;
pub(super) const TCP_NO_QUEUE: i32 = 0;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `TCP_INFO` states.
pub(super) const TCP_ESTABLISHED: u8 = 1;
pub(super) const TCP_SYN_SENT: u8 = 2;
pub(super) const TCP_CLOSE: u8 = 7;
pub(super) const TCP_LISTEN: u8 = 10;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// Puts a duplicate of a connection in repair mode (`on`) or out of it: a
/// socket closed in repair mode sends nothing to its peer.
pub fn repair_mode(fd: &OwnedFd, on: bool) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, i32::from(on))
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
pub(super) fn peek(fd: &OwnedFd, cap: usize) -> io::Result<Vec<u8>> {
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

/// Reads one TCP connection's state in repair mode; the socket is back in
/// normal mode afterwards (with `SO_REUSEADDR` as it was), whatever happens.
pub(super) fn tcp_repair(fd: &OwnedFd, state: u8) -> Result<TcpRepair, SocketError> {
    in_repair(fd, || {
        // Packets still arriving (the network is not frozen) can move the
        // receive side between the reads: read again until the window read
        // last agrees with the receive queue read first.
        let mut r = read_repair(fd, state);
        for _ in 0..20 {
            match &r {
                Ok(t) if !consistent(t) => r = read_repair(fd, state),
                _ => break,
            }
        }
        r
    })
}

/// `read` with the connection `fd` in repair mode; back in normal mode
/// afterwards (with `SO_REUSEADDR` as it was), whatever happens.
pub(super) fn in_repair<T>(
    fd: &OwnedFd,
    read: impl FnOnce() -> Result<T, SocketError>,
) -> Result<T, SocketError> {
    let reuse = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(|e| ("SO_REUSEADDR", e))?;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            SocketError::NotSupported("a TCP connection without CAP_NET_ADMIN (TCP_REPAIR)".into())
        } else {
            SocketError::Io("TCP_REPAIR", e)
        }
    })?;
    let r = read();
    // Leaving repair mode resets SO_REUSEADDR: put it back.
    let off = setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 0);
    let re = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, reuse);
    let r = r?;
    off.map_err(|e| ("leaving TCP_REPAIR", e))?;
    re.map_err(|e| ("SO_REUSEADDR", e))?;
    Ok(r)
}

/// Whether a connection's window fits its receive queue: the kernel
/// refuses a `rcv_wup` past the next expected byte.
fn consistent(t: &TcpRepair) -> bool {
    let rcv_nxt = t
        .recv_seq
        .wrapping_add(t.recv_queue.len() as u32)
        .wrapping_add(u32::from(super::fin::got_fin(t.state)));
    // rcv_wup <= rcv_nxt, in sequence space.
    rcv_nxt.wrapping_sub(t.window[4]) < 1 << 31
}

/// The state of a connection in repair mode; in a half-closed `state`,
/// the sequence numbers and queues leave its FINs out.
fn read_repair(fd: &OwnedFd, state: u8) -> Result<TcpRepair, SocketError> {
    let their_fin = u32::from(super::fin::got_fin(state));
    let our_fin = u32::from(super::fin::sent_fin(state));
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
                let end = end.wrapping_sub(their_fin);
                break (end.wrapping_sub(data.len() as u32), data);
            }
        }
    };
    queue(TCP_SEND_QUEUE)?;
    let write_seq =
        (int(libc::IPPROTO_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")? as u32).wrapping_sub(our_fin);
    let outq = ioctl_int(fd, libc::TIOCOUTQ).map_err(|e| ("SIOCOUTQ", e))? as usize;
    check(outq)?;
    let unsent = (ioctl_int(fd, SIOCOUTQNSD).map_err(|e| ("SIOCOUTQNSD", e))? as u32)
        .saturating_sub(our_fin);
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
        state,
    })
}

pub(super) fn tcp_state_name(state: u8) -> &'static str {
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

/// An established TCP connection, rebuilt without a handshake; still in
/// repair mode (see [`release`]).
pub(super) fn tcp_connection(
    s: &SocketInfo,
    t: &TcpRepair,
    plan: Refill,
) -> Result<OwnedFd, RestoreError> {
    let fd = socket(s).map_err(fail("socket (TCP connection)"))?;
    // The send queue must fit while it is refilled: the buffer as it was
    // (the kernel doubles what it is given), or larger for the moment
    // (queued again in other pieces it takes more room); set as it was once
    // the connection is let go ([`send_unsent`]). The receive buffer is
    // the saved one from the start: the connection takes its window clamp
    // and the threshold its window grows by from it when it is connected,
    // and only its queue refill gets more room ([`refill_receive_queue`]).
    let snd = option_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0) / 2;
    let room = refill_room(t.send_queue.len());
    if snd > 0 || !t.send_queue.is_empty() {
        set_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, snd.max(room))
            .map_err(fail("SO_SNDBUFFORCE"))?;
    }
    if let Some(rcv) = option_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF).filter(|v| *v > 0) {
        set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, rcv / 2)
            .map_err(fail("SO_RCVBUFFORCE"))?;
    }
    enter_repair(&fd)?;
    let tcp = |name, v: i32, what: &str| {
        set_int(&fd, libc::IPPROTO_TCP, name, v).map_err(fail(what.to_string()))
    };
    set_v6only(&fd, s)?;
    // In repair mode binding succeeds next to a listener on the same port.
    bind(&fd, &s.local).map_err(fail("bind (TCP connection)"))?;
    tcp(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    tcp(TCP_QUEUE_SEQ, t.recv_seq as i32, "TCP_QUEUE_SEQ (receive)")?;
    tcp(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    let first = t.send_seq.wrapping_add(plan.skip as u32);
    tcp(TCP_QUEUE_SEQ, first as i32, "TCP_QUEUE_SEQ (send)")?;
    tcp(TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    // No SYN: the socket becomes established as it was.
    connect_again(&fd, s)?;
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
    segment_size(&fd)?;
    // The peer checks timestamps: the connection's own clock goes on.
    tcp(TCP_TIMESTAMP, t.timestamp as i32, "TCP_TIMESTAMP")?;
    if plan.as_sent > 0 {
        let sent = &t.send_queue[plan.skip..plan.skip + plan.as_sent];
        tcp(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
        send_all(&fd, sent, 0).map_err(fail("refilling the TCP send queue"))?;
    }
    let window = in_range(super::fin::window_before_fin(t), t);
    if !t.recv_queue.is_empty() {
        tcp(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
        refill_receive_queue(&fd, s, t, &window)?;
    }
    tcp(TCP_REPAIR_QUEUE, TCP_NO_QUEUE, "TCP_REPAIR_QUEUE")?;
    let mut w = Vec::with_capacity(20);
    for v in window {
        w.extend_from_slice(&v.to_ne_bytes());
    }
    setsockopt(&fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &w).map_err(fail("TCP_REPAIR_WINDOW"))?;
    apply_options(&fd, s, true)?;
    Ok(fd)
}

/// Puts a socket being made into repair mode, which takes
/// `CAP_NET_ADMIN`.
pub(super) fn enter_repair(fd: &OwnedFd) -> Result<(), RestoreError> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1).map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            RestoreError::NotSupported(
                "re-making a TCP connection needs CAP_NET_ADMIN (TCP_REPAIR)".into(),
            )
        } else {
            fail("setsockopt(TCP_REPAIR)")(e)
        }
    })
}

/// Works the connection's segment size out again from the MSS clamp
/// `TCP_REPAIR_OPTIONS` set. The size is set when the socket is connected,
/// from the clamp it has then (the default 536 bytes), and a new clamp
/// does not change it: a loopback connection would go on in 524-byte
/// segments, each of which costs its receiver more than twice its bytes
/// of memory, so that a window sized for its buffer no longer fits it.
/// Setting the IPv4 options (to none, as a restored socket has them; an
/// IPv6 socket takes them too) makes the kernel work the size out again.
fn segment_size(fd: &OwnedFd) -> Result<(), RestoreError> {
    setsockopt(fd, libc::IPPROTO_IP, libc::IP_OPTIONS, &[])
        .map_err(fail("IP_OPTIONS (segment size)"))
}

/// The window `w` (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup) within
/// what `TCP_REPAIR_WINDOW` takes for the refilled receive queue: a
/// segment still arriving while the connection was read could leave its
/// last window update, or the window's left edge, past the queue's end
/// (then the queue's end is taken).
fn in_range(mut w: [u32; 5], t: &TcpRepair) -> [u32; 5] {
    let rcv_nxt = t.recv_seq.wrapping_add(t.recv_queue.len() as u32);
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    if after(w[4], rcv_nxt) {
        w[4] = rcv_nxt;
    }
    let edge = rcv_nxt.wrapping_add(w[3]);
    if after(w[0], edge) {
        w[0] = edge;
    }
    w
}

/// How a connection's send queue is put back: the first `skip` bytes are
/// left out (the peer, restored here too, holds them already), the next
/// `as_sent` are queued in repair mode as sent (they go out again as
/// retransmissions, when the timer or the peer's acknowledgements say),
/// the rest is sent as new data once the connection leaves repair mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refill {
    skip: usize,
    as_sent: usize,
}

impl Refill {
    /// The plan for connection `t` whose peer, when it is restored too, is
    /// `peer`.
    ///
    /// Bytes sent and not acknowledged may already be in the peer's
    /// receive queue (its acknowledgement was still on its way, or dropped
    /// by the network lock); the peer then acknowledges them at once, and
    /// a connection must not be told of an acknowledgement of bytes it has
    /// not sent: it drops that as invalid and waits on its timer, backing
    /// off, for ever. So the sent bytes are queued as sent, as CRIU does;
    /// except when the peer is restored here too: then exactly what it
    /// holds is known, left out, and the rest goes out at once as new data.
    /// Behind a FIN everything is queued as sent (the FIN comes after it).
    pub(super) fn new(t: &TcpRepair, peer: Option<&TcpRepair>) -> Refill {
        let len = t.send_queue.len();
        if super::fin::sent_fin(t.state) {
            return Refill {
                skip: 0,
                as_sent: len,
            };
        }
        let sent = len - (t.unsent as usize).min(len);
        let held = peer.map(|p| {
            p.recv_seq
                .wrapping_add(p.recv_queue.len() as u32)
                .wrapping_sub(t.send_seq) as usize
        });
        match held {
            Some(skip) if skip <= sent => Refill { skip, as_sent: 0 },
            _ => Refill {
                skip: 0,
                as_sent: sent,
            },
        }
    }
}

/// The [`Refill`] of each TCP connection of `sockets` (by inode), its peer
/// found among them by address.
pub(super) fn refills(sockets: &HashMap<u64, &SocketInfo>) -> HashMap<u64, Refill> {
    let by_ends: HashMap<(&[u8], &[u8]), &TcpRepair> = sockets
        .values()
        .filter_map(|s| Some(((&s.local[..], &s.peer[..]), s.tcp.as_ref()?)))
        .collect();
    sockets
        .values()
        .filter_map(|s| {
            let t = s.tcp.as_ref()?;
            let peer = by_ends.get(&(&s.peer[..], &s.local[..])).copied();
            Some((s.inode, Refill::new(t, peer)))
        })
        .collect()
}

/// Room beyond twice its bytes a queue gets while it is refilled.
const REFILL_SLACK: usize = 1 << 20;

/// What `SO_*BUFFORCE` is given for a queue of `queued` bytes to be
/// refilled (the kernel doubles it).
fn refill_room(queued: usize) -> i32 {
    (queued.saturating_mul(2) + REFILL_SLACK).min(i32::MAX as usize) as i32
}

/// `SO_MEMINFO` (`SK_MEMINFO_RMEM_ALLOC` is its first field).
const SO_MEMINFO: i32 = 55;

/// Refills the receive queue (the socket in repair mode, that queue
/// selected) with more room than the saved buffer for the moment, then
/// sets the buffer back before the connection talks again: a window it
/// advertised on the larger buffer would let the peer send past what the
/// saved one holds, and a segment dropped for memory closes the window at
/// once: the peer's next segments, its acknowledgements with them, start
/// past the window and are dropped too, and two processes that each wait
/// for the other's data wait for ever. When the refilled queue takes more
/// memory than the saved buffer leaves for the window `w` (snd_wl1,
/// snd_wnd, max_window, rcv_wnd, rcv_wup) the peer may still fill, the
/// buffer is made that much larger ([`receive_buffer`]).
fn refill_receive_queue(
    fd: &OwnedFd,
    s: &SocketInfo,
    t: &TcpRepair,
    w: &[u32; 5],
) -> Result<(), RestoreError> {
    let saved = option_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0);
    let room = refill_room(t.recv_queue.len());
    if room > saved / 2 {
        set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, room)
            .map_err(fail("SO_RCVBUFFORCE"))?;
    }
    send_all(fd, &t.recv_queue, 0).map_err(fail("refilling the TCP receive queue"))?;
    let rmem = getsockopt(fd, libc::SOL_SOCKET, SO_MEMINFO, 4)
        .ok()
        .and_then(|v| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)))
        .unwrap_or(0);
    let rcv_nxt = t.recv_seq.wrapping_add(t.recv_queue.len() as u32);
    let open = w[4].wrapping_add(w[3]).wrapping_sub(rcv_nxt);
    let open = if open < 1 << 31 { open } else { 0 };
    let buffer = receive_buffer(saved, rmem, open);
    if buffer > 0 {
        set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, buffer / 2)
            .map_err(fail("SO_RCVBUFFORCE"))?;
    }
    Ok(())
}

/// The receive buffer (as `SO_RCVBUF` reads it) of a connection whose
/// refilled queue takes `rmem` bytes of memory and whose peer may still
/// send `open` bytes: the `saved` one, or larger when that one could not
/// take what the window lets in (each byte counted twice, for what the
/// segments it arrives in cost beyond it). 0: no buffer to set.
fn receive_buffer(saved: i32, rmem: u32, open: u32) -> i32 {
    let needed = u64::from(rmem) + 2 * u64::from(open);
    let needed = needed.min(i32::MAX as u64 & !1) as i32;
    if saved <= 0 {
        return 0;
    }
    saved.max(needed + (needed & 1))
}

/// Connects a connection being rebuilt: in repair mode (no packet is
/// sent), or one being made again (in `SYN-SENT`, not waiting: `EINPROGRESS`
/// is then its SYN on its way). The kernel refuses while a connection with
/// the same addresses exists, which the checkpointed one may do for a
/// moment.
pub(super) fn connect_again(fd: &OwnedFd, s: &SocketInfo) -> Result<(), RestoreError> {
    match patiently(libc::EADDRNOTAVAIL, || connect(fd, &s.peer)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            Err(RestoreError::ConnectionExists {
                local: SocketInfo::address_text(&s.local),
                peer: SocketInfo::address_text(&s.peer),
            })
        }
        Err(e) => Err(fail("connect (TCP repair)")(e)),
    }
}

/// Takes a connection made by [`tcp_connection`] out of repair mode: it
/// talks to its peer again (then [`send_unsent`], once every connection
/// of the restore is out of repair mode: a peer still in it would answer
/// with a reset).
pub(super) fn release(fd: &OwnedFd, s: &SocketInfo) -> Result<(), RestoreError> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 0).map_err(fail("leaving TCP_REPAIR"))?;
    // Leaving repair mode cleared SO_REUSEADDR.
    if let Some(v) = option_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR) {
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, v).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// What [`Refill`] leaves to be sent as new data (what the process wrote
/// and the kernel had not sent yet; with a peer restored here, also what
/// was sent and the peer does not hold), queued again (never waiting: it
/// fits in the room [`tcp_connection`] made), then the send buffer size
/// as saved (the receive buffer has it already).
pub(super) fn send_unsent(
    fd: &OwnedFd,
    s: &SocketInfo,
    t: &TcpRepair,
    plan: Refill,
) -> Result<(), RestoreError> {
    let rest = &t.send_queue[plan.skip + plan.as_sent..];
    if !rest.is_empty() {
        send_all(fd, rest, libc::MSG_DONTWAIT).map_err(fail("sending the unsent TCP bytes"))?;
    }
    if let Some(v) = option_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF) {
        set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v / 2)
            .map_err(fail("SO_SNDBUFFORCE"))?;
    }
    Ok(())
}

/// An established TCP connection closed instead of restored: the peer
/// gets a reset (through the connection rebuilt for a moment, when that is
/// possible), the process a closed socket in its place (both directions
/// shut down): reads find the end of the stream, writes fail with `EPIPE`,
/// poll reports a hang-up.
pub(super) fn closed_connection(s: &SocketInfo, t: &TcpRepair) -> Result<OwnedFd, RestoreError> {
    // A connection still being made has no peer to reset.
    let reset = (t.state != TCP_SYN_SENT).then(|| {
        tcp_connection(s, t, Refill::new(t, None)).and_then(|fd| release(&fd, s).map(|()| fd))
    });
    if let Some(Ok(fd)) = reset {
        // SO_LINGER {on, 0 s}: close sends RST.
        let _ = setsockopt(
            &fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &[1, 0, 0, 0, 0, 0, 0, 0],
        );
        drop(fd);
    }
    let fd = socket(s).map_err(fail("socket (closed TCP connection)"))?;
    // On a socket that is not connected this answers ENOTCONN, but shuts down.
    // SAFETY: plain syscall on our socket.
    let _ = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
    Ok(fd)
}

/// Whether reads of the closed TCP socket `dup` find the end of the stream
/// (a connection that ended, or a socket shut down for reading) rather
/// than `ENOTCONN`. What the process has not read of a connection that
/// ended is refused: a reset's error (poll shows it without taking it; a
/// read would take it from the process) and bytes that came before it.
pub(super) fn closed_at_end(dup: &OwnedFd) -> Result<bool, SocketError> {
    let mut p = libc::pollfd {
        fd: dup.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd of ours, no wait.
    let polled = unsafe { libc::poll(&mut p, 1, 0) };
    if polled > 0 && p.revents & libc::POLLERR != 0 {
        return Err(SocketError::NotSupported(
            "a TCP connection that ended with an error the process has not read yet (reset by \
             its peer)"
                .into(),
        ));
    }
    let mut b = 0u8;
    // SAFETY: a 1-byte peek into our buffer.
    let n = unsafe {
        libc::recv(
            dup.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return Err(SocketError::NotSupported(
            "a closed TCP connection holding bytes the process has not read".into(),
        ));
    }
    Ok(n == 0)
}

/// The TCP connections held by processes `pids` (through any descriptor),
/// as the network lock wants them: every socket with a peer (established
/// or half closed), listeners and closed sockets left out. Read from
/// `/proc/PID/fd` and `sock_diag`, without touching the sockets.
pub fn connections_of(pids: &[i32]) -> io::Result<Vec<cr_ebpf_common::netlock::NetLockKey>> {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            let l = link.to_string_lossy();
            if let Some(n) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.extend(n.parse::<u64>().ok());
            }
        }
    }
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for (ino, d) in super::diag::inet_sockets(family, libc::IPPROTO_TCP)? {
            let peer = d.key.remote_port != 0 && d.state != TCP_LISTEN && d.state != TCP_CLOSE;
            if peer && inodes.contains(&ino) && !out.contains(&d.key) {
                out.push(d.key);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_past_the_queue_end_is_brought_back_to_it() {
        let t = TcpRepair {
            recv_seq: 1000,
            recv_queue: vec![0; 100],
            ..TcpRepair::default()
        };
        // rcv_wup past rcv_nxt (1100), snd_wl1 past rcv_nxt + rcv_wnd.
        assert_eq!(in_range([1200, 5, 6, 50, 1150], &t), [1150, 5, 6, 50, 1100]);
        // Already in range: unchanged, across the sequence wrap too.
        let w = [1090, 5, 6, 50, 1090];
        assert_eq!(in_range(w, &t), w);
        let t = TcpRepair {
            recv_seq: u32::MAX - 10,
            recv_queue: vec![0; 20],
            ..TcpRepair::default()
        };
        let w = [3, 1, 1, 10, 5];
        assert_eq!(in_range(w, &t), w);
    }

    #[test]
    fn the_receive_buffer_is_the_saved_one_unless_the_window_needs_more() {
        // A full queue and a closed window: the saved buffer.
        assert_eq!(receive_buffer(8 << 20, 8_300_000, 0), 8 << 20);
        // Room for the open window twice over: the saved buffer.
        assert_eq!(receive_buffer(8 << 20, 8_000_000, 100_000), 8 << 20);
        // Not enough: larger (an even size, as the kernel keeps them).
        assert_eq!(receive_buffer(8 << 20, 8_300_000, 100_001), 8_500_002);
        // Nothing saved: nothing set.
        assert_eq!(receive_buffer(0, 1000, 1000), 0);
    }

    #[test]
    fn bytes_the_peer_may_hold_are_never_sent_as_new() {
        // 300 bytes queued from 5000: 200 sent, 100 never sent.
        let t = TcpRepair {
            send_seq: 5000,
            send_queue: vec![0; 300],
            unsent: 100,
            ..TcpRepair::default()
        };
        let plan = |skip, as_sent| Refill { skip, as_sent };
        // Peer elsewhere: what was sent is queued as sent.
        assert_eq!(Refill::new(&t, None), plan(0, 200));
        // Peer restored here holding 120 of the sent bytes: left out, the
        // other 80 sent again as new with the unsent ones.
        let peer = |end: u32| TcpRepair {
            recv_seq: end - 10,
            recv_queue: vec![0; 10],
            ..TcpRepair::default()
        };
        assert_eq!(Refill::new(&t, Some(&peer(5120))), plan(120, 0));
        assert_eq!(Refill::new(&t, Some(&peer(5000))), plan(0, 0));
        assert_eq!(Refill::new(&t, Some(&peer(5200))), plan(200, 0));
        // A peer that claims more than was sent, or less than was
        // acknowledged, is not believed.
        assert_eq!(Refill::new(&t, Some(&peer(5201))), plan(0, 200));
        assert_eq!(Refill::new(&t, Some(&peer(4999))), plan(0, 200));
        // Behind a FIN everything is queued as sent.
        let fin = TcpRepair {
            state: 4,
            ..t.clone()
        };
        assert_eq!(Refill::new(&fin, Some(&peer(5120))), plan(0, 300));
    }
}
