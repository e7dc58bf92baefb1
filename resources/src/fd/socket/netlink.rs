//! Netlink sockets: their protocol, their port id (bound, or given by the
//! kernel on first use, bound to the same at restore), their multicast
//! groups (the first 32 by `bind`, the others with
//! `NETLINK_ADD_MEMBERSHIP`), the port and group they are connected to,
//! and their flags. Messages waiting to be read are refused: they came
//! from the kernel or from other ports and cannot be queued again.

use std::os::fd::{AsRawFd as _, OwnedFd};

use cr_ebpf_image::{SockOpt, SocketInfo};

use super::{getsockopt, getsockopt_int, SocketError};

/// `SOL_NETLINK`.
const SOL_NETLINK: i32 = 270;
/// `NETLINK_ADD_MEMBERSHIP`.
const NETLINK_ADD_MEMBERSHIP: i32 = 1;
/// `NETLINK_LIST_MEMBERSHIPS`.
const NETLINK_LIST_MEMBERSHIPS: i32 = 9;
/// Flags read with `getsockopt` and set again: `NETLINK_PKTINFO`,
/// `NETLINK_BROADCAST_ERROR`, `NETLINK_NO_ENOBUFS`,
/// `NETLINK_LISTEN_ALL_NSID`, `NETLINK_CAP_ACK`, `NETLINK_EXT_ACK`,
/// `NETLINK_GET_STRICT_CHK`.
const FLAGS: &[i32] = &[3, 4, 5, 8, 10, 11, 12];
/// Most groups read (bits of `NETLINK_LIST_MEMBERSHIPS`).
const GROUPS_CAP: usize = 8192;

/// The port id and groups of a `sockaddr_nl`.
fn port_and_groups(addr: &[u8]) -> (u32, u32) {
    let word = |i: usize| {
        addr.get(i..i + 4)
            .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
    };
    (word(4), word(8))
}

/// What only a netlink socket has; `s` holds its family, type, protocol,
/// addresses and common options already.
pub(super) fn save_netlink(dup: &OwnedFd, s: &mut SocketInfo) -> Result<(), SocketError> {
    let mut b = 0u8;
    // SAFETY: a 1-byte peek into our buffer.
    let n = unsafe {
        libc::recv(
            dup.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if n > 0 {
        return Err(SocketError::NotSupported(format!(
            "a netlink socket (protocol {}) with messages waiting to be read: they cannot be \
             queued again",
            s.protocol
        )));
    }
    // Port 0 and no group: never bound (a bind at restore would take a
    // port now); no peer: not connected.
    if port_and_groups(&s.local) == (0, 0) {
        s.local.clear();
    }
    if port_and_groups(&s.peer) == (0, 0) {
        s.peer.clear();
    }
    for &name in FLAGS {
        if let Ok(v) = getsockopt_int(dup, SOL_NETLINK, name) {
            if v != 0 {
                s.options.push(SockOpt {
                    level: SOL_NETLINK,
                    name,
                    value: v.to_ne_bytes().to_vec(),
                });
            }
        }
    }
    let words = getsockopt(dup, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, GROUPS_CAP / 8)
        .map_err(|e| SocketError::Io("NETLINK_LIST_MEMBERSHIPS", e))?;
    for group in groups(&words).into_iter().filter(|&g| g > 32) {
        s.options.push(SockOpt {
            level: SOL_NETLINK,
            name: NETLINK_ADD_MEMBERSHIP,
            value: group.to_ne_bytes().to_vec(),
        });
    }
    Ok(())
}

/// The groups (from 1) whose bits are set in a membership bitmap.
fn groups(bitmap: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    for (i, byte) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                out.push((i * 8 + bit) as u32 + 1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd as _;

    use super::*;

    fn netlink(protocol: i32) -> OwnedFd {
        // SAFETY: plain syscall; checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn membership_bits_are_groups_from_one() {
        assert_eq!(groups(&[0b101, 0, 0, 0x80, 1]), [1, 3, 32, 33]);
        assert_eq!(
            port_and_groups(&[16, 0, 0, 0, 7, 0, 0, 0, 2, 0, 0, 0]),
            (7, 2)
        );
    }

    #[test]
    fn an_unbound_socket_has_no_address_and_a_bound_one_keeps_its_port_and_groups() {
        let s = netlink(libc::NETLINK_ROUTE);
        let mut info = SocketInfo {
            family: libc::AF_NETLINK as u16,
            protocol: libc::NETLINK_ROUTE as u32,
            local: super::super::address(&s, false).unwrap(),
            peer: super::super::address(&s, true).unwrap(),
            ..SocketInfo::default()
        };
        save_netlink(&s, &mut info).unwrap();
        assert!(info.local.is_empty() && info.peer.is_empty(), "{info:?}");
        // Bound to a port of its own with the link group (1): kept.
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        a.nl_family = libc::AF_NETLINK as u16;
        a.nl_groups = 1;
        // SAFETY: binding our socket with our address.
        let r = unsafe {
            libc::bind(
                s.as_raw_fd(),
                (&a as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        let mut info = SocketInfo {
            family: libc::AF_NETLINK as u16,
            local: super::super::address(&s, false).unwrap(),
            ..SocketInfo::default()
        };
        save_netlink(&s, &mut info).unwrap();
        let (port, groups) = port_and_groups(&info.local);
        assert_ne!(port, 0);
        assert_eq!(groups, 1);
    }
}
