//! Half-closed TCP connections (`FIN_WAIT1`, `FIN_WAIT2`, `CLOSE_WAIT`,
//! `LAST_ACK`, `CLOSING`): rebuilt as established in repair mode from
//! queues that leave the FINs out, then brought to their state. A FIN the
//! connection sent goes back into its send queue with `shutdown` (counted
//! as sent when its peer had acknowledged it); a FIN or an acknowledgement
//! its peer sent is made again as a packet from the peer's address to the
//! connection, through a raw socket, while every connection of the
//! restore is still in repair mode.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use cr_ebpf_image::{SocketInfo, TcpRepair};

use super::{fail, set_int};
use crate::RestoreError;

const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_SEND_QUEUE: i32 = 2;
const TCP_NO_QUEUE: i32 = 0;
const FIN: u8 = 0x01;
const ACK: u8 = 0x10;

/// `TCP_INFO` states of a half-closed connection.
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// Whether the connection in `state` had sent its FIN.
pub(super) fn sent_fin(state: u8) -> bool {
    matches!(state, FIN_WAIT1 | FIN_WAIT2 | LAST_ACK | CLOSING)
}

/// Whether the connection in `state` had received its peer's FIN.
pub(super) fn got_fin(state: u8) -> bool {
    matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING)
}

/// The window of a connection that had received a FIN, as
/// `TCP_REPAIR_WINDOW` takes it before that FIN is made again (it counts
/// the FIN's sequence number).
pub(super) fn window_before_fin(t: &TcpRepair) -> [u32; 5] {
    let mut w = t.window;
    if got_fin(t.state) {
        w[4] = w[4].wrapping_sub(1);
        w[3] = w[3].wrapping_add(1);
    }
    w
}

/// Brings the connection `fd` (still in repair mode, its queues refilled)
/// to the half-closed state `t.state`.
pub(super) fn half_close(fd: &OwnedFd, s: &SocketInfo, t: &TcpRepair) -> Result<(), RestoreError> {
    let st = t.state;
    let data_end = t.send_seq.wrapping_add(t.send_queue.len() as u32);
    let their_fin = t.recv_seq.wrapping_add(t.recv_queue.len() as u32);
    if matches!(st, FIN_WAIT1 | FIN_WAIT2 | CLOSING) {
        fin_in_send_queue(fd, st == FIN_WAIT2)?;
    }
    if got_fin(st) {
        from_peer(s, t, their_fin, t.send_seq, FIN | ACK)
            .map_err(fail("sending the peer's FIN again (raw socket)"))?;
    }
    if st == LAST_ACK {
        fin_in_send_queue(fd, false)?;
    }
    if st == FIN_WAIT2 {
        from_peer(s, t, their_fin, data_end.wrapping_add(1), ACK).map_err(fail(
            "acknowledging the connection's FIN again (raw socket)",
        ))?;
    }
    Ok(())
}

/// Queues the connection's FIN with `shutdown`: as sent when `sent` (the
/// peer acknowledges it next), otherwise to be sent.
fn fin_in_send_queue(fd: &OwnedFd, sent: bool) -> Result<(), RestoreError> {
    let queue = |q: i32| {
        set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, q).map_err(fail("TCP_REPAIR_QUEUE"))
    };
    if sent {
        queue(TCP_SEND_QUEUE)?;
    }
    // SAFETY: plain syscall on our socket.
    let r = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
    let err = io::Error::last_os_error();
    if sent {
        queue(TCP_NO_QUEUE)?;
    }
    if r != 0 {
        return Err(fail("shutdown (the connection's FIN)")(err));
    }
    Ok(())
}

/// An address of a socket state: IPv4 (also an IPv4-mapped IPv6 one) or
/// IPv6, and the port.
enum Addr {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

fn addr(raw: &[u8]) -> io::Result<Addr> {
    let bad = || io::Error::other("not an IPv4 or IPv6 address");
    let family = u16::from_ne_bytes(raw.get(..2).ok_or_else(bad)?.try_into().expect("2"));
    let port = u16::from_be_bytes(raw.get(2..4).ok_or_else(bad)?.try_into().expect("2"));
    match family as i32 {
        libc::AF_INET => Ok(Addr::V4(
            raw.get(4..8).ok_or_else(bad)?.try_into().expect("4"),
            port,
        )),
        libc::AF_INET6 => {
            let a: [u8; 16] = raw.get(8..24).ok_or_else(bad)?.try_into().expect("16");
            if a[..10] == [0; 10] && a[10..12] == [0xff, 0xff] {
                return Ok(Addr::V4(a[12..].try_into().expect("4"), port));
            }
            Ok(Addr::V6(a, port))
        }
        _ => Err(bad()),
    }
}

/// The ones' complement sum of `parts`, folded.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP header from `sport` to `dport` with `seq`, `ack`, `flags` and
/// `window`, its checksum over `pseudo` (the IP pseudo-header).
fn tcp_header(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&window.to_be_bytes());
    h
}

/// Sends, from the connection's peer to the connection, a segment with
/// sequence number `seq`, acknowledging `ack`, with `flags`.
fn from_peer(s: &SocketInfo, t: &TcpRepair, seq: u32, ack: u32, flags: u8) -> io::Result<()> {
    let window = (t.window[1] >> t.snd_wscale).min(0xffff) as u16;
    let (ours, theirs) = (addr(&s.local)?, addr(&s.peer)?);
    let (packet, family, dest) = match (ours, theirs) {
        (Addr::V4(dst, dport), Addr::V4(src, sport)) => {
            let mut tcp = tcp_header(sport, dport, seq, ack, flags, window);
            let pseudo = [&src[..], &dst[..], &[0, libc::IPPROTO_TCP as u8, 0, 20]].concat();
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = libc::IPPROTO_TCP as u8;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            let sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut dest = vec![0u8; std::mem::size_of::<libc::sockaddr_in>()];
            dest[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            dest[4..8].copy_from_slice(&dst);
            ([&ip[..], &tcp[..]].concat(), libc::AF_INET, dest)
        }
        (Addr::V6(dst, dport), Addr::V6(src, sport)) => {
            let mut tcp = tcp_header(sport, dport, seq, ack, flags, window);
            let pseudo = [
                &src[..],
                &dst[..],
                &20u32.to_be_bytes(),
                &[0, 0, 0, libc::IPPROTO_TCP as u8],
            ]
            .concat();
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = libc::IPPROTO_TCP as u8;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src);
            ip[24..40].copy_from_slice(&dst);
            let mut dest = vec![0u8; std::mem::size_of::<libc::sockaddr_in6>()];
            dest[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            dest[8..24].copy_from_slice(&dst);
            ([&ip[..], &tcp[..]].concat(), libc::AF_INET6, dest)
        }
        _ => {
            return Err(io::Error::other(
                "a connection between IPv4 and IPv6 addresses",
            ))
        }
    };
    // SAFETY: a new raw socket (IPPROTO_RAW: we write the IP header).
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let raw = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: our packet and a sockaddr of ours of the right length.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            dest.as_ptr().cast(),
            dest.len() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checksum_folds_to_the_internet_sum() {
        // RFC 1071's example: 0x0001 0xf203 0xf4f5 0xf6f7 sums to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // An odd byte is padded with zero.
        assert_eq!(checksum(&[&[0x12]]), !0x1200);
    }

    #[test]
    fn states_say_which_fins_there_were() {
        assert!(sent_fin(FIN_WAIT1) && !got_fin(FIN_WAIT1));
        assert!(sent_fin(LAST_ACK) && got_fin(LAST_ACK));
        assert!(!sent_fin(CLOSE_WAIT) && got_fin(CLOSE_WAIT));
        assert!(sent_fin(CLOSING) && got_fin(CLOSING));
        let t = TcpRepair {
            state: CLOSE_WAIT,
            window: [1, 2, 3, 10, 100],
            ..TcpRepair::default()
        };
        assert_eq!(window_before_fin(&t), [1, 2, 3, 11, 99]);
    }

    #[test]
    fn mapped_ipv4_addresses_are_ipv4() {
        let mut raw = vec![0u8; 28];
        raw[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        raw[2..4].copy_from_slice(&8080u16.to_be_bytes());
        raw[18..20].copy_from_slice(&[0xff, 0xff]);
        raw[20..24].copy_from_slice(&[127, 0, 0, 1]);
        assert!(matches!(
            addr(&raw).unwrap(),
            Addr::V4([127, 0, 0, 1], 8080)
        ));
    }
}
