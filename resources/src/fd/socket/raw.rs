//! Raw IP sockets (`SOCK_RAW`, IPv4 and IPv6, any protocol): made again
//! with their protocol, bound to their address and connected to their
//! peer as they were, with the options only raw sockets have
//! (`IP_HDRINCL`, `IPV6_HDRINCL`, `IPV6_CHECKSUM`, the ICMP and ICMPv6
//! type filters). Packets queued for them are not kept, as for UDP (a
//! network may lose them); a receiving side shut down comes back so (a
//! sending side shut down alone is not visible).

use std::os::fd::OwnedFd;

use cr_ebpf_image::{SockOpt, SocketInfo};

use super::{getsockopt, poll_shutdown, SocketError};

/// `ICMP_FILTER` (level `SOL_RAW`) and `ICMPV6_FILTER` (level
/// `SOL_ICMPV6`): the ICMP types a socket does not receive.
const ICMP_FILTER: i32 = 1;

/// The options of raw sockets, for the family, protocol: level, name,
/// value length.
fn options(family: i32, protocol: i32) -> Vec<(i32, i32, usize)> {
    if family == libc::AF_INET {
        let mut o = vec![(libc::IPPROTO_IP, libc::IP_HDRINCL, 4)];
        if protocol == libc::IPPROTO_ICMP {
            o.push((libc::SOL_RAW, ICMP_FILTER, 4));
        }
        o
    } else {
        // ICMPv6 always has its checksum computed (the option is refused).
        if protocol == libc::IPPROTO_ICMPV6 {
            vec![
                (libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 4),
                (libc::SOL_ICMPV6, ICMP_FILTER, 32),
            ]
        } else {
            vec![
                (libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 4),
                (libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 4),
            ]
        }
    }
}

/// The raw part of a socket's state: its own options, its address (none
/// when bound to no address: the kernel names it after its protocol
/// anyway), its receiving side shut down.
pub(super) fn save_raw(dup: &OwnedFd, s: &mut SocketInfo) -> Result<(), SocketError> {
    let (family, protocol) = (i32::from(s.family), s.protocol as i32);
    for (level, name, len) in options(family, protocol) {
        let value = getsockopt(dup, level, name, len).map_err(|e| ("a raw socket's option", e))?;
        s.options.push(SockOpt { level, name, value });
    }
    if any_address(&s.local) {
        s.local.clear();
    }
    s.shutdown = poll_shutdown(dup).map_err(|e| ("poll", e))?;
    Ok(())
}

/// Whether the inet address `addr` (a `sockaddr_in` or `sockaddr_in6`)
/// is the any address, whatever its port.
fn any_address(addr: &[u8]) -> bool {
    let ip = match u16::from_ne_bytes([
        addr.first().copied().unwrap_or(0),
        addr.get(1).copied().unwrap_or(0),
    ]) as i32
    {
        libc::AF_INET => addr.get(4..8),
        libc::AF_INET6 => addr.get(8..24),
        _ => None,
    };
    ip.is_none_or(|ip| ip.iter().all(|b| *b == 0))
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};

    use cr_ebpf_image::{FdKind, FdState};

    use super::super::{getsockopt_int, setsockopt, setsockopt_int};
    use super::*;
    use crate::fd::testing;

    fn raw(family: i32, protocol: i32) -> Option<OwnedFd> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW, protocol) };
        if fd < 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root"
            );
            eprintln!("skipped: raw sockets need CAP_NET_RAW");
            return None;
        }
        // SAFETY: a new descriptor we own.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[test]
    fn raw_sockets_come_back_with_their_protocol_address_and_options() {
        let Some(udp) = raw(libc::AF_INET, libc::IPPROTO_UDP) else {
            return;
        };
        let Some(icmp) = raw(libc::AF_INET, libc::IPPROTO_ICMP) else {
            return;
        };
        let Some(icmp6) = raw(libc::AF_INET6, libc::IPPROTO_ICMPV6) else {
            return;
        };
        setsockopt_int(&udp, libc::IPPROTO_IP, libc::IP_HDRINCL, 1).unwrap();
        setsockopt_int(&udp, libc::IPPROTO_IP, libc::IP_TTL, 32).unwrap();
        let mut addr = vec![0u8; 16];
        addr[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        addr[4..8].copy_from_slice(&[127, 0, 0, 12]);
        super::super::bind(&udp, &addr).unwrap();
        setsockopt(
            &icmp,
            libc::SOL_RAW,
            ICMP_FILTER,
            &(1u32 << 13).to_ne_bytes(),
        )
        .unwrap();
        let mut f6 = [0u8; 32];
        f6[0] = 0x20;
        setsockopt(&icmp6, libc::SOL_ICMPV6, ICMP_FILTER, &f6).unwrap();
        let saved = testing::save_own_many(&[udp.as_raw_fd(), icmp.as_raw_fd(), icmp6.as_raw_fd()]);
        let sockets: Vec<SocketInfo> = saved
            .iter()
            .map(|f| match &f.state {
                FdState::Socket(s) => (**s).clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sockets[0].local[4..8], [127, 0, 0, 12]);
        assert!(sockets[1].local.is_empty(), "not bound");
        drop((udp, icmp, icmp6));
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        let made: Vec<&OwnedFd> = sockets
            .iter()
            .map(|s| shared.get(FdKind::Socket, s.inode, 0, 0).unwrap())
            .collect();
        let int = |fd: &OwnedFd, level, name| getsockopt_int(fd, level, name).unwrap();
        assert_eq!(
            int(made[0], libc::SOL_SOCKET, libc::SO_TYPE),
            libc::SOCK_RAW
        );
        assert_eq!(
            int(made[0], libc::SOL_SOCKET, libc::SO_PROTOCOL),
            libc::IPPROTO_UDP
        );
        assert_eq!(int(made[0], libc::IPPROTO_IP, libc::IP_HDRINCL), 1);
        assert_eq!(int(made[0], libc::IPPROTO_IP, libc::IP_TTL), 32);
        assert_eq!(
            super::super::address(made[0], false).unwrap()[4..8],
            [127, 0, 0, 12]
        );
        assert_eq!(int(made[1], libc::SOL_RAW, ICMP_FILTER), 1 << 13);
        assert_eq!(
            getsockopt(made[2], libc::SOL_ICMPV6, ICMP_FILTER, 32).unwrap(),
            f6
        );
    }
}
