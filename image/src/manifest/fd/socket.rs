//! A socket's state (descriptor kind 9, format 1.2): addresses, options,
//! queued messages and an established TCP connection's repair state;
//! since format 1.7 also the directions shut down and a bound unix
//! socket's file permissions and owner (appended: older images end
//! before them).

use crate::codec::{Dec, DecErr, Enc};

/// Largest queue of one socket stored (bytes, all messages together).
pub const SOCKET_QUEUE_CAP: usize = 64 << 20;
/// Most messages in one socket queue.
const MESSAGES_CAP: usize = 1 << 20;
/// Largest socket address.
const ADDR_CAP: usize = 128;
/// Largest socket option value.
const OPTION_CAP: usize = 256;
/// Most socket options.
const OPTIONS_CAP: usize = 64;

/// A TCP connection's state as `TCP_REPAIR` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpRepair {
    /// Sequence number of the first byte of the send queue (oldest unacknowledged).
    pub send_seq: u32,
    /// Sequence number of the first byte of the receive queue (oldest unread).
    pub recv_seq: u32,
    /// The send queue: bytes sent and not acknowledged, then bytes not sent yet.
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent.
    pub unsent: u32,
    /// The receive queue: bytes received and not read.
    pub recv_queue: Vec<u8>,
    /// Maximum segment size.
    pub mss: u32,
    /// The connection's TCP timestamp clock (`TCP_TIMESTAMP`).
    pub timestamp: u32,
    /// `tcpi_options` bits: 1 timestamps, 2 SACK, 4 window scaling.
    pub options: u8,
    /// Send window scale.
    pub snd_wscale: u8,
    /// Receive window scale.
    pub rcv_wscale: u8,
    /// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    /// The connection's state when it is half closed (format 1.8, in the
    /// high byte of the options field; 0 before): 4 `FIN_WAIT1`, 5
    /// `FIN_WAIT2`, 8 `CLOSE_WAIT`, 9 `LAST_ACK`, 11 `CLOSING`; 0 for an
    /// established one. The queues and sequence numbers leave the FINs out.
    /// Format 1.14: 2 `SYN_SENT`, a connection still being made, whose
    /// `send_seq` is its SYN's sequence number (queues empty, the rest 0).
    pub state: u8,
}

/// The half-closed TCP states a connection may be in (see
/// [`TcpRepair::state`]).
pub const TCP_HALF_CLOSED: [u8; 5] = [4, 5, 8, 9, 11];

/// A socket option to set again, as `getsockopt` returned it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SockOpt {
    /// `SOL_SOCKET`, `IPPROTO_TCP`, ...
    pub level: i32,
    /// `SO_*`, `TCP_*`, ...
    pub name: i32,
    /// The option's bytes.
    pub value: Vec<u8>,
}

/// A socket: address family, type, addresses, options and queued data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketInfo {
    /// `AF_UNIX`, `AF_INET`, `AF_INET6`.
    pub family: u16,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, `SOCK_SEQPACKET`.
    pub sock_type: u16,
    /// Protocol number (`IPPROTO_TCP`, ...).
    pub protocol: u32,
    /// Listening.
    pub listening: bool,
    /// The backlog of a listening socket.
    pub backlog: u32,
    /// Local address (`struct sockaddr_*` bytes); empty when not bound.
    pub local: Vec<u8>,
    /// Peer address; empty when not connected.
    pub peer: Vec<u8>,
    /// Socket options that differ from a new socket's.
    pub options: Vec<SockOpt>,
    /// Unix sockets: this socket's inode. Both ends of a socket pair held
    /// by the process are recreated together.
    pub inode: u64,
    /// Unix sockets: the peer's inode (0: none).
    pub peer_inode: u64,
    /// Messages waiting in the receive queue (unix and UDP; a stream
    /// socket's bytes as one message).
    pub queue: Vec<Vec<u8>>,
    /// An established TCP connection.
    pub tcp: Option<TcpRepair>,
    /// Directions shut down (`sk_shutdown`: 1 receiving, 2 sending), to
    /// be shut down again with `shutdown` (format 1.7; 0 before).
    pub shutdown: u8,
    /// For a datagram socket not connected to one peer, the sender of each
    /// message of [`SocketInfo::queue`] (its address; empty: unnamed), each
    /// sent again from a socket of that name (format 1.8; empty for other
    /// sockets and before).
    pub senders: Vec<Vec<u8>>,
    /// For a unix listener, the connections waiting to be accepted (format
    /// 1.8; 0 before): each must come from a client checkpointed with it,
    /// which connects again at restore (one whose client has closed is
    /// refused: what it sent cannot be read without accepting it).
    pub pending: u32,
    /// A unix socket bound to a path: its file as it was (format 1.7;
    /// `None` before, and for other sockets).
    pub file: Option<SocketFile>,
    /// Unix sockets: the descriptors in flight (`SCM_RIGHTS`) each message
    /// of [`SocketInfo::queue`] carries, as numbers of descriptors of the
    /// same process that hold them only for the restore (format 1.9;
    /// empty: none, and before). Each message is sent again with them,
    /// then they are closed.
    pub in_flight: Vec<Vec<i32>>,
    /// An attached classic BPF socket filter (`SO_ATTACH_FILTER`), as
    /// `SO_GET_FILTER` gives it: 8 bytes an instruction (format 1.9;
    /// empty: none, and before).
    pub filter: Vec<u8>,
}

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const IN_FLIGHT_CAP: usize = 253;
/// Most instructions of a classic BPF filter (the kernel's `BPF_MAXINSNS`).
pub const FILTER_CAP: usize = 4096;

/// The file of a unix socket bound to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketFile {
    /// The path leads to the socket: its file's permissions and owner, as
    /// `stat` showed them.
    Kept {
        /// Permission bits (`st_mode & 07777`).
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// The file was removed (or the path now leads to another file): the
    /// socket keeps its name, but nothing reaches it through the path.
    Removed,
}

impl SocketInfo {
    /// A socket address (`struct sockaddr_*` bytes, as in [`SocketInfo::local`])
    /// for people: `127.0.0.1:6379`, `[::1]:80`, a unix path or
    /// `@abstract`, a packet socket's interface and protocol, `-` for none.
    pub fn address_text(a: &[u8]) -> String {
        let family = a.get(..2).map(|f| u16::from_ne_bytes([f[0], f[1]]) as i32);
        let port = || u16::from_be_bytes([a[2], a[3]]);
        match family {
            Some(libc::AF_INET) if a.len() >= 8 => {
                let ip: [u8; 4] = a[4..8].try_into().expect("4 bytes");
                format!("{}:{}", std::net::Ipv4Addr::from(ip), port())
            }
            Some(libc::AF_INET6) if a.len() >= 24 => {
                let ip: [u8; 16] = a[8..24].try_into().expect("16 bytes");
                format!("[{}]:{}", std::net::Ipv6Addr::from(ip), port())
            }
            // struct sockaddr_ll; struct sockaddr_pkt (SOCK_PACKET) names
            // its device.
            Some(libc::AF_PACKET) if a.len() >= 20 => format!(
                "interface {} protocol {:#06x}",
                i32::from_ne_bytes(a[4..8].try_into().expect("4 bytes")),
                u16::from_be_bytes([a[2], a[3]])
            ),
            Some(libc::AF_PACKET) => {
                let name = &a[2.min(a.len())..16.min(a.len())];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                format!("device {}", String::from_utf8_lossy(&name[..end]))
            }
            Some(libc::AF_UNIX) => match a.get(2..) {
                Some([0, rest @ ..]) => format!("@{}", String::from_utf8_lossy(rest)),
                Some(p) => String::from_utf8_lossy(p)
                    .trim_end_matches('\0')
                    .to_string(),
                None => "unnamed".into(),
            },
            _ if a.is_empty() => "-".into(),
            _ => format!("family {family:?}"),
        }
    }

    /// The socket's state body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u16(self.family);
        b.u16(self.sock_type);
        b.u32(self.protocol);
        b.u16(self.listening as u16);
        b.u16(0);
        b.u32(self.backlog);
        b.bytes(&self.local);
        b.bytes(&self.peer);
        b.u32(self.options.len() as u32);
        for o in &self.options {
            b.i32(o.level);
            b.i32(o.name);
            b.bytes(&o.value);
        }
        b.u64(self.inode);
        b.u64(self.peer_inode);
        b.u32(self.queue.len() as u32);
        for m in &self.queue {
            b.bytes(m);
        }
        match &self.tcp {
            None => b.u16(0),
            Some(t) => {
                b.u16(1);
                t.encode(b);
            }
        }
        // Format 1.7.
        b.u16(self.shutdown.into());
        match self.file {
            None => b.u16(0),
            Some(SocketFile::Kept { mode, uid, gid }) => {
                b.u16(1);
                b.u32(mode);
                b.u32(uid);
                b.u32(gid);
            }
            Some(SocketFile::Removed) => b.u16(2),
        }
        // Format 1.8.
        b.u32(self.senders.len() as u32);
        for a in &self.senders {
            b.bytes(a);
        }
        b.u32(self.pending);
        // Format 1.9.
        b.u32(self.in_flight.len() as u32);
        for fds in &self.in_flight {
            b.u32(fds.len() as u32);
            for fd in fds {
                b.i32(*fd);
            }
        }
        b.bytes(&self.filter);
    }

    /// Reads a socket's state body.
    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let mut s = SocketInfo {
            family: b.u16()?,
            sock_type: b.u16()?,
            protocol: b.u32()?,
            listening: b.u16()? != 0,
            ..SocketInfo::default()
        };
        b.u16()?;
        s.backlog = b.u32()?;
        s.local = b.bytes(ADDR_CAP, "socket address")?.to_vec();
        s.peer = b.bytes(ADDR_CAP, "peer address")?.to_vec();
        let n = b.u32()? as usize;
        if n > OPTIONS_CAP {
            return Err(b.err(format!("{n} socket options (at most {OPTIONS_CAP})")));
        }
        for _ in 0..n {
            s.options.push(SockOpt {
                level: b.i32()?,
                name: b.i32()?,
                value: b.bytes(OPTION_CAP, "socket option")?.to_vec(),
            });
        }
        s.inode = b.u64()?;
        s.peer_inode = b.u64()?;
        let n = b.u32()? as usize;
        if n > MESSAGES_CAP {
            return Err(b.err(format!("{n} queued messages (at most {MESSAGES_CAP})")));
        }
        let mut total = 0;
        for _ in 0..n {
            let m = b.bytes(SOCKET_QUEUE_CAP, "queued message")?;
            total += m.len();
            if total > SOCKET_QUEUE_CAP {
                return Err(b.err(format!("socket queue over {SOCKET_QUEUE_CAP} bytes")));
            }
            s.queue.push(m.to_vec());
        }
        s.tcp = match b.u16()? {
            0 => None,
            1 => Some(TcpRepair::decode(b)?),
            other => return Err(b.err(format!("unknown TCP state marker {other}"))),
        };
        // Format 1.7 appends the shutdown state and the bound file; older
        // sockets end here.
        if b.done() {
            return Ok(s);
        }
        s.shutdown = match b.u16()? {
            v @ 0..=3 => v as u8,
            other => return Err(b.err(format!("unknown socket shutdown state {other}"))),
        };
        s.file = match b.u16()? {
            0 => None,
            1 => Some(SocketFile::Kept {
                mode: b.u32()?,
                uid: b.u32()?,
                gid: b.u32()?,
            }),
            2 => Some(SocketFile::Removed),
            other => return Err(b.err(format!("unknown socket file marker {other}"))),
        };
        // Format 1.8 appends the messages' senders; older sockets end here.
        if !b.done() {
            let n = b.u32()? as usize;
            if n != 0 && n != s.queue.len() {
                return Err(b.err(format!(
                    "{n} message senders for {} queued messages",
                    s.queue.len()
                )));
            }
            for _ in 0..n {
                s.senders
                    .push(b.bytes(ADDR_CAP, "message sender")?.to_vec());
            }
            s.pending = b.u32()?;
            if s.pending > PENDING_CAP {
                return Err(b.err(format!(
                    "{} pending connections (at most {PENDING_CAP})",
                    s.pending
                )));
            }
        }
        // Format 1.9 appends the descriptors in flight and the filter.
        if !b.done() {
            s.in_flight = decode_in_flight(b, s.queue.len())?;
            s.filter = b.bytes(FILTER_CAP * 8, "socket filter")?.to_vec();
            if !s.filter.len().is_multiple_of(8) {
                return Err(b.err(format!(
                    "a socket filter of {} bytes (8 an instruction)",
                    s.filter.len()
                )));
            }
        }
        Ok(s)
    }
}

/// The descriptors in flight of each of `messages` queued messages: none,
/// or a list per message, each of at most [`IN_FLIGHT_CAP`] descriptor
/// numbers (not negative).
fn decode_in_flight(b: &mut Dec<'_>, messages: usize) -> Result<Vec<Vec<i32>>, DecErr> {
    let n = b.u32()? as usize;
    if n != 0 && n != messages {
        return Err(b.err(format!(
            "descriptors in flight for {n} messages of {messages} queued"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let k = b.u32()? as usize;
        if k > IN_FLIGHT_CAP {
            return Err(b.err(format!(
                "{k} descriptors in flight in one message (at most {IN_FLIGHT_CAP})"
            )));
        }
        let mut fds = Vec::with_capacity(k);
        for _ in 0..k {
            let fd = b.i32()?;
            if fd < 0 {
                return Err(b.err(format!("descriptor in flight {fd}")));
            }
            fds.push(fd);
        }
        out.push(fds);
    }
    Ok(out)
}

/// Most connections waiting on a listener (the kernel's `somaxconn` cap).
const PENDING_CAP: u32 = 1 << 16;

impl TcpRepair {
    fn encode(&self, b: &mut Enc) {
        b.u32(self.send_seq);
        b.u32(self.recv_seq);
        b.bytes(&self.send_queue);
        b.u32(self.unsent);
        b.bytes(&self.recv_queue);
        b.u32(self.mss);
        b.u32(self.timestamp);
        b.u16(self.options as u16 | (self.state as u16) << 8);
        b.u16(self.snd_wscale as u16 | (self.rcv_wscale as u16) << 8);
        for w in self.window {
            b.u32(w);
        }
    }

    /// Reads a TCP connection's state: no more unsent bytes than queued.
    fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let mut t = TcpRepair {
            send_seq: b.u32()?,
            recv_seq: b.u32()?,
            send_queue: b.bytes(SOCKET_QUEUE_CAP, "TCP send queue")?.to_vec(),
            unsent: b.u32()?,
            recv_queue: b.bytes(SOCKET_QUEUE_CAP, "TCP receive queue")?.to_vec(),
            mss: b.u32()?,
            timestamp: b.u32()?,
            ..TcpRepair::default()
        };
        let at = b.offset();
        let options = b.u16()?;
        t.options = options as u8;
        t.state = (options >> 8) as u8;
        if t.state != 0 && t.state != 2 && !TCP_HALF_CLOSED.contains(&t.state) {
            return Err(DecErr {
                offset: at,
                what: format!("TCP connection state {} (0, 2, 4, 5, 8, 9 or 11)", t.state),
            });
        }
        let made =
            t.state != 2 || (t.send_queue.is_empty() && t.recv_queue.is_empty() && t.unsent == 0);
        if !made {
            return Err(b.err("a TCP connection being made (state 2) with bytes queued"));
        }
        let scales = b.u16()?;
        t.snd_wscale = scales as u8;
        t.rcv_wscale = (scales >> 8) as u8;
        for w in t.window.iter_mut() {
            *w = b.u32()?;
        }
        if t.unsent as usize > t.send_queue.len() {
            return Err(b.err(format!(
                "{} unsent bytes in a send queue of {}",
                t.unsent,
                t.send_queue.len()
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(s: &SocketInfo) -> Vec<u8> {
        let mut e = Enc::default();
        s.encode(&mut e);
        e.buf
    }

    fn decoded(buf: &[u8]) -> Result<SocketInfo, DecErr> {
        let mut d = Dec::new(buf, 0);
        let s = SocketInfo::decode(&mut d)?;
        assert!(d.done());
        Ok(s)
    }

    #[test]
    fn sockets_round_trip() {
        let pair_end = SocketInfo {
            family: 1,
            sock_type: 5,
            inode: 77,
            peer_inode: 78,
            queue: vec![b"hello".to_vec(), Vec::new(), b"again".to_vec()],
            shutdown: 3,
            file: Some(SocketFile::Kept {
                mode: 0o640,
                uid: 18943,
                gid: 58467,
            }),
            in_flight: vec![vec![9, 10], Vec::new(), vec![11]],
            filter: vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
            ..SocketInfo::default()
        };
        let ghost = SocketInfo {
            family: 1,
            sock_type: 2,
            local: b"\x01\x00/tmp/gone".to_vec(),
            file: Some(SocketFile::Removed),
            shutdown: 1,
            ..SocketInfo::default()
        };
        let listener = SocketInfo {
            family: 10,
            sock_type: 1,
            protocol: 6,
            listening: true,
            backlog: 128,
            local: vec![10, 0, 0x1f, 0x90],
            options: vec![
                SockOpt {
                    level: 1,
                    name: 2,
                    value: 1i32.to_le_bytes().to_vec(),
                },
                SockOpt {
                    level: 41,
                    name: 26,
                    value: 0i32.to_le_bytes().to_vec(),
                },
            ],
            ..SocketInfo::default()
        };
        let connection = SocketInfo {
            family: 2,
            sock_type: 1,
            protocol: 6,
            tcp: Some(TcpRepair {
                send_seq: 7,
                recv_seq: 9,
                send_queue: b"pending".to_vec(),
                unsent: 7,
                recv_queue: b"unread".to_vec(),
                mss: 1460,
                timestamp: 99,
                options: 5,
                snd_wscale: 14,
                rcv_wscale: 7,
                window: [10, 20, 30, 40, 50],
                state: 9,
            }),
            ..SocketInfo::default()
        };
        let being_made = SocketInfo {
            family: 2,
            sock_type: 1,
            protocol: 6,
            tcp: Some(TcpRepair {
                send_seq: 4_000_000_000,
                state: 2,
                ..TcpRepair::default()
            }),
            ..SocketInfo::default()
        };
        for s in [pair_end, ghost, listener, connection, being_made] {
            assert_eq!(decoded(&encoded(&s)).unwrap(), s);
        }
    }

    #[test]
    fn a_connection_being_made_with_bytes_queued_is_an_error() {
        for (queue, state) in [(b"x".to_vec(), 2), (Vec::new(), 3)] {
            let s = SocketInfo {
                family: 2,
                sock_type: 1,
                protocol: 6,
                tcp: Some(TcpRepair {
                    send_queue: queue,
                    state,
                    ..TcpRepair::default()
                }),
                ..SocketInfo::default()
            };
            let err = decoded(&encoded(&s)).unwrap_err();
            assert!(err.what.contains("TCP connection"), "{}", err.what);
        }
    }

    #[test]
    fn a_socket_of_format_1_6_ends_before_the_shutdown_state() {
        let s = SocketInfo {
            family: 1,
            sock_type: 1,
            local: b"\x01\x00/tmp/x".to_vec(),
            ..SocketInfo::default()
        };
        let mut old = encoded(&s);
        old.truncate(old.len() - 20);
        assert_eq!(decoded(&old).unwrap(), s);
    }

    #[test]
    fn a_socket_of_format_1_8_ends_before_the_descriptors_in_flight() {
        let s = SocketInfo {
            family: 1,
            sock_type: 2,
            queue: vec![b"x".to_vec()],
            pending: 3,
            ..SocketInfo::default()
        };
        let mut old = encoded(&s);
        old.truncate(old.len() - 8);
        assert_eq!(decoded(&old).unwrap(), s);
    }

    #[test]
    fn damaged_descriptors_in_flight_and_filters_are_refused() {
        let base = SocketInfo {
            queue: vec![b"a".to_vec(), b"b".to_vec()],
            ..SocketInfo::default()
        };
        let wrong_count = SocketInfo {
            in_flight: vec![vec![3]],
            ..base.clone()
        };
        let e = decoded(&encoded(&wrong_count)).unwrap_err();
        assert!(e.what.contains("for 1 messages of 2"), "{}", e.what);
        let negative = SocketInfo {
            in_flight: vec![vec![-1], Vec::new()],
            ..base.clone()
        };
        let e = decoded(&encoded(&negative)).unwrap_err();
        assert!(e.what.contains("descriptor in flight -1"), "{}", e.what);
        let too_many = SocketInfo {
            in_flight: vec![vec![3; IN_FLIGHT_CAP + 1], Vec::new()],
            ..base.clone()
        };
        let e = decoded(&encoded(&too_many)).unwrap_err();
        assert!(e.what.contains("at most 253"), "{}", e.what);
        let odd = SocketInfo {
            filter: vec![0; 7],
            ..base
        };
        let e = decoded(&encoded(&odd)).unwrap_err();
        assert!(e.what.contains("8 an instruction"), "{}", e.what);
    }

    #[test]
    fn damaged_sockets_are_refused() {
        let long = SocketInfo {
            local: vec![0; ADDR_CAP + 1],
            ..SocketInfo::default()
        };
        let e = decoded(&encoded(&long)).unwrap_err();
        assert!(e.what.contains("socket address"), "{}", e.what);
        let many = SocketInfo {
            options: vec![SockOpt::default(); OPTIONS_CAP + 1],
            ..SocketInfo::default()
        };
        let e = decoded(&encoded(&many)).unwrap_err();
        assert!(e.what.contains("socket options"), "{}", e.what);
        let mut bad = encoded(&SocketInfo::default());
        let at = bad.len() - 22;
        bad[at] = 2;
        let e = decoded(&bad).unwrap_err();
        assert!(e.what.contains("unknown TCP state marker 2"), "{}", e.what);
        let mut bad = encoded(&SocketInfo::default());
        let at = bad.len() - 20;
        bad[at] = 4;
        let e = decoded(&bad).unwrap_err();
        assert!(e.what.contains("shutdown state 4"), "{}", e.what);
        let mut bad = encoded(&SocketInfo::default());
        let at = bad.len() - 18;
        bad[at] = 3;
        let e = decoded(&bad).unwrap_err();
        assert!(e.what.contains("socket file marker 3"), "{}", e.what);
        // Every message under the cap, together over it.
        let mut e = Enc::default();
        SocketInfo::default().encode(&mut e);
        let mut buf = e.buf[..e.buf.len() - 26].to_vec();
        let half = vec![0u8; SOCKET_QUEUE_CAP / 2 + 1];
        let mut q = Enc::default();
        q.u32(2);
        q.bytes(&half);
        q.bytes(&half);
        buf.extend_from_slice(&q.buf);
        let e = decoded(&buf).unwrap_err();
        assert!(e.what.contains("socket queue over"), "{}", e.what);
    }
}
