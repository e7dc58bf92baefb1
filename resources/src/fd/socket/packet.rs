//! Packet sockets (`AF_PACKET`: `SOCK_RAW`, `SOCK_DGRAM` and the old
//! `SOCK_PACKET`): made again with their protocol (as sock_diag tells it:
//! `SO_PROTOCOL` answers 0, and a bind may change it), bound to their
//! interface, with their `SOL_PACKET` settings (ring version, reserve,
//! auxiliary data, original device, virtual network header, loss,
//! timestamps, qdisc bypass, outgoing packets ignored, copy threshold),
//! their memberships (promiscuous, multicast, unicast, all-multicast, as
//! many times as they were added), their receive and transmit rings (as
//! sized; a ring mapped into memory is refused: the mapping would have to
//! be made again at its address over the new ring) and their fanout group.
//! Packets queued for them are not kept, as for UDP (a network may lose
//! them).
//!
//! All of it is carried as socket options, each set again with
//! `setsockopt` in the order saved (the version before the rings); the
//! fanout group is joined once the socket is bound ([`join_fanout`]).

use std::os::fd::OwnedFd;

use cr_ebpf_image::{SockOpt, SocketInfo};

use super::{diag, getsockopt, poll_shutdown, setsockopt, SocketError};
use crate::RestoreError;

/// `SOCK_PACKET`: the old packet socket type, addressed by device name.
pub(super) const SOCK_PACKET: i32 = 10;
/// `sizeof(struct sockaddr_ll)`.
const SOCKADDR_LL_LEN: usize = 20;
/// `SOL_PACKET`.
pub(super) const SOL_PACKET: i32 = 263;
const PACKET_ADD_MEMBERSHIP: i32 = 1;
const PACKET_RX_RING: i32 = 5;
const PACKET_COPY_THRESH: i32 = 7;
const PACKET_TX_RING: i32 = 13;
/// `PACKET_FANOUT`: joined after the bind.
pub(super) const PACKET_FANOUT: i32 = 18;
/// Fanout kinds steered by a BPF program (`PACKET_FANOUT_CBPF`,
/// `PACKET_FANOUT_EBPF`).
const FANOUT_CBPF: u32 = 6;
const FANOUT_EBPF: u32 = 7;
/// `PACKET_FANOUT_FLAG_UNIQUEID` where `PACKET_FANOUT` has its flags.
const FANOUT_UNIQUEID: u32 = 0x20 << 24;
/// Settings `getsockopt` reads as an int and `setsockopt` takes back, in
/// the order they are set: `PACKET_VERSION`, `PACKET_RESERVE`,
/// `PACKET_AUXDATA`, `PACKET_ORIGDEV`, `PACKET_VNET_HDR` then its size
/// `PACKET_VNET_HDR_SZ`, `PACKET_TX_HAS_OFF`, `PACKET_LOSS`,
/// `PACKET_TIMESTAMP`, `PACKET_QDISC_BYPASS`, `PACKET_IGNORE_OUTGOING`
/// (all before the rings, which fix the version, reserve and header).
const INT_SETTINGS: &[i32] = &[10, 12, 8, 9, 15, 24, 19, 14, 17, 20, 23];

/// What only a packet socket has; `s` holds its family, type, protocol,
/// address and common options already.
pub(super) fn save(
    dup: &OwnedFd,
    s: &mut SocketInfo,
    pid: i32,
    inode: u64,
    d: Option<diag::PacketDiag>,
) -> Result<(), SocketError> {
    let d = d.ok_or_else(|| {
        SocketError::NotSupported("a packet socket that sock_diag does not list".into())
    })?;
    // Made again receiving what it received (a bind may have changed it).
    s.protocol = u32::from(d.protocol);
    let rings = d.rx_ring.is_some() || d.tx_ring.is_some();
    if rings && mapped(pid, inode) {
        return Err(SocketError::NotSupported(
            "a packet socket whose ring is mapped into memory".into(),
        ));
    }
    let mut opt = |name: i32, value: Vec<u8>| {
        s.options.push(SockOpt {
            level: SOL_PACKET,
            name,
            value,
        })
    };
    for &name in INT_SETTINGS {
        // Each is 0 on a new socket, and left so (some are refused on some
        // types); one an older kernel lacks was never set either.
        if let Ok(value) = getsockopt(dup, SOL_PACKET, name, 4) {
            if value.iter().any(|b| *b != 0) {
                opt(name, value);
            }
        }
    }
    if d.copy_thresh != 0 {
        opt(PACKET_COPY_THRESH, d.copy_thresh.to_ne_bytes().to_vec());
    }
    for (name, ring) in [(PACKET_RX_RING, d.rx_ring), (PACKET_TX_RING, d.tx_ring)] {
        if let Some(r) = ring {
            opt(name, r.iter().flat_map(|v| v.to_ne_bytes()).collect());
        }
    }
    for m in &d.memberships {
        for _ in 0..m.count {
            opt(PACKET_ADD_MEMBERSHIP, m.mreq.clone());
        }
    }
    if d.fanout != 0 {
        let kind = (d.fanout >> 16) & 0xff;
        if matches!(kind, FANOUT_CBPF | FANOUT_EBPF) {
            return Err(SocketError::NotSupported(
                "a packet socket in a fanout group that a BPF program steers (its program \
                 cannot be read back)"
                    .into(),
            ));
        }
        // A group id the kernel chose is asked for by that id again.
        opt(
            PACKET_FANOUT,
            (d.fanout & !FANOUT_UNIQUEID).to_ne_bytes().to_vec(),
        );
    }
    // Not bound to an interface: made again as it was (receiving its
    // protocol on every interface, or nothing).
    if !bound(s) {
        s.local.clear();
    } else if s.sock_type != SOCK_PACKET as u16 && s.local.len() < SOCKADDR_LL_LEN {
        // getsockname gives the hardware address's bytes only; bind wants
        // the whole structure.
        s.local.resize(SOCKADDR_LL_LEN, 0);
    }
    s.shutdown = poll_shutdown(dup).map_err(|e| ("poll", e))?;
    Ok(())
}

/// Whether the packet socket's address names an interface: a
/// `sockaddr_ll` with an interface index, or a `sockaddr_pkt` with a
/// device name.
fn bound(s: &SocketInfo) -> bool {
    let ll = || s.local.get(4..8).is_some_and(|i| i != [0; 4]);
    let pkt = || s.local.get(2).is_some_and(|b| *b != 0);
    if s.sock_type == SOCK_PACKET as u16 {
        pkt()
    } else {
        ll()
    }
}

/// Whether process `pid` maps the socket `inode` (its ring).
fn mapped(pid: i32, inode: u64) -> bool {
    let name = format!("socket:[{inode}]");
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .is_ok_and(|maps| maps.lines().any(|l| l.ends_with(&name)))
}

/// Whether the option `o` waits for [`join_fanout`].
pub(super) fn after_bind(o: &SockOpt) -> bool {
    (o.level, o.name) == (SOL_PACKET, PACKET_FANOUT)
}

/// Joins the fanout group the packet socket `s` was in, once it is bound.
pub(super) fn join_fanout(fd: &OwnedFd, s: &SocketInfo) -> Result<(), RestoreError> {
    for o in s.options.iter().filter(|o| after_bind(o)) {
        setsockopt(fd, o.level, o.name, &o.value).map_err(|err| RestoreError::Syscall {
            call: "setsockopt(PACKET_FANOUT)".into(),
            err,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};

    use cr_ebpf_image::{FdKind, FdState};

    use super::super::{address, bind, getsockopt_int, setsockopt_int};
    use super::*;
    use crate::fd::{testing, Descriptor as _};

    const PACKET_DROP_MEMBERSHIP: i32 = 2;
    const PACKET_VERSION: i32 = 10;
    const PACKET_RESERVE: i32 = 12;
    const PACKET_AUXDATA: i32 = 8;
    const PACKET_ORIGDEV: i32 = 9;
    const PACKET_VNET_HDR_SZ: i32 = 24;
    const PACKET_MR_PROMISC: u16 = 1;
    const PACKET_MR_UNICAST: u16 = 3;
    const ETH_P_IP: u16 = 0x0800;

    fn packet(kind: i32, protocol: u16) -> Option<OwnedFd> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, kind, i32::from(protocol.to_be())) };
        if fd < 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root"
            );
            eprintln!("skipped: packet sockets need CAP_NET_RAW");
            return None;
        }
        // SAFETY: a new descriptor we own.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// `struct packet_mreq` on the loopback interface (index 1).
    fn mreq(kind: u16, alen: u16) -> Vec<u8> {
        let mut m = 1i32.to_ne_bytes().to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend(alen.to_ne_bytes());
        m.extend([0u8; 8]);
        m
    }

    /// A ring of one page of four frames (`struct tpacket_req3`).
    fn ring() -> Vec<u8> {
        [4096u32, 1, 1024, 4, 0, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect()
    }

    /// As ZDTM's packet_sock: one socket of every protocol with ring
    /// version 2, auxiliary data, a receive ring and a promiscuous
    /// membership; one of IP bound to the loopback interface with a
    /// reserve, the original device, a fanout group, a unicast membership
    /// and a transmit ring. Each comes back with all of it.
    #[test]
    fn packet_sockets_come_back_bound_with_their_settings_memberships_rings_and_fanout() {
        let Some(sk1) = packet(libc::SOCK_RAW, 0) else {
            return;
        };
        let Some(sk2) = packet(libc::SOCK_DGRAM, ETH_P_IP) else {
            return;
        };
        let mut ll = (libc::AF_PACKET as u16).to_ne_bytes().to_vec();
        ll.extend([0, 0]);
        ll.extend(1i32.to_ne_bytes());
        ll.extend([0u8; 12]);
        bind(&sk2, &ll).unwrap();
        setsockopt_int(&sk1, SOL_PACKET, PACKET_VERSION, 1).unwrap();
        setsockopt_int(&sk1, SOL_PACKET, PACKET_VNET_HDR_SZ, 12).unwrap();
        setsockopt_int(&sk1, SOL_PACKET, PACKET_AUXDATA, 1).unwrap();
        setsockopt(&sk1, SOL_PACKET, PACKET_RX_RING, &ring()).unwrap();
        setsockopt_int(&sk2, SOL_PACKET, PACKET_RESERVE, 8).unwrap();
        setsockopt_int(&sk2, SOL_PACKET, PACKET_ORIGDEV, 1).unwrap();
        setsockopt_int(&sk2, SOL_PACKET, PACKET_FANOUT, 13).unwrap();
        setsockopt(
            &sk1,
            SOL_PACKET,
            PACKET_ADD_MEMBERSHIP,
            &mreq(PACKET_MR_PROMISC, 0),
        )
        .unwrap();
        setsockopt(
            &sk2,
            SOL_PACKET,
            PACKET_ADD_MEMBERSHIP,
            &mreq(PACKET_MR_UNICAST, 6),
        )
        .unwrap();
        setsockopt(&sk2, SOL_PACKET, PACKET_TX_RING, &ring()).unwrap();
        // Unbound, receiving IP on every interface (SO_PROTOCOL says 0).
        let Some(sk3) = packet(libc::SOCK_DGRAM, ETH_P_IP) else {
            return;
        };
        let names = [
            address(&sk1, false).unwrap(),
            address(&sk2, false).unwrap(),
            address(&sk3, false).unwrap(),
        ];
        assert_eq!(names[2][2..4], ETH_P_IP.to_be_bytes());
        let saved = testing::save_own_many(&[sk1.as_raw_fd(), sk2.as_raw_fd(), sk3.as_raw_fd()]);
        let inodes: Vec<u64> = saved
            .iter()
            .map(|f| match &f.state {
                FdState::Socket(s) => s.inode,
                other => panic!("{other:?}"),
            })
            .collect();
        drop((sk1, sk2, sk3));
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        let made: Vec<&OwnedFd> = inodes
            .iter()
            .map(|i| shared.get(FdKind::Socket, *i, 0, 0).unwrap())
            .collect();
        let int = |fd: &OwnedFd, name| getsockopt_int(fd, SOL_PACKET, name).unwrap();
        for (fd, name) in made.iter().zip(&names) {
            let back = address(fd, false).unwrap();
            // Family, protocol and interface index as they were.
            assert_eq!(back[..8], name[..8], "{back:?}");
        }
        assert_eq!(int(made[0], PACKET_VERSION), 1);
        assert_eq!(int(made[0], PACKET_VNET_HDR_SZ), 12);
        assert_eq!(int(made[0], PACKET_AUXDATA), 1);
        assert_eq!(int(made[0], PACKET_FANOUT), 0);
        assert_eq!(int(made[1], PACKET_RESERVE), 8);
        assert_eq!(int(made[1], PACKET_ORIGDEV), 1);
        assert_eq!(int(made[1], PACKET_FANOUT), 13);
        let now = diag::packet_sockets().unwrap();
        let info = |fd: &OwnedFd| {
            let ino = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            let ino = ino.to_string_lossy();
            let ino: u64 = ino[8..ino.len() - 1].parse().unwrap();
            now[&ino].clone()
        };
        let ring4 = Some([4096, 1, 1024, 4, 0, 0, 0]);
        assert_eq!(
            (info(made[0]).rx_ring, info(made[0]).tx_ring),
            (ring4, None)
        );
        assert_eq!(
            (info(made[1]).rx_ring, info(made[1]).tx_ring),
            (None, ring4)
        );
        // The memberships are there to be dropped.
        for (fd, m) in [
            (made[0], mreq(PACKET_MR_PROMISC, 0)),
            (made[1], mreq(PACKET_MR_UNICAST, 6)),
        ] {
            setsockopt(fd, SOL_PACKET, PACKET_DROP_MEMBERSHIP, &m).unwrap();
        }
    }

    /// A packet socket whose ring the process maps is refused.
    #[test]
    fn a_mapped_ring_is_refused() {
        let Some(sk) = packet(libc::SOCK_RAW, 0) else {
            return;
        };
        setsockopt(&sk, SOL_PACKET, PACKET_RX_RING, &ring()).unwrap();
        // SAFETY: mapping the socket's ring (one page), unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                sk.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let mut owner = testing::SaveOwner::new();
        let err = super::super::Socket
            .save(&mut owner.cx(), &testing::seen(sk.as_raw_fd()))
            .expect("claimed")
            .unwrap_err()
            .to_string();
        // SAFETY: our mapping.
        unsafe { libc::munmap(at, 4096) };
        assert!(err.contains("ring is mapped"), "{err}");
    }
}
