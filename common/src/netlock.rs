//! The network lock: one TCP connection whose packets the `netlock`
//! classifier drops while its process is between a dump and a restore.

/// Name of the `HashMap<NetLockKey, u32>` of locked connections in the
/// `cr-ebpf-netlock` object.
pub const CONNECTIONS_MAP: &str = "NETLOCK_CONNECTIONS";

/// Name of the classifier program in the `cr-ebpf-netlock` object.
pub const PROGRAM: &str = "netlock";

/// The directory of every lock in bpffs, one subdirectory each (named in
/// the image); removing a lock's directory removes the lock.
pub const PIN_ROOT: &str = "/sys/fs/bpf/cr-ebpf";

/// Most connections one lock holds.
pub const CAPACITY: u32 = 65536;

/// One TCP connection as the network sees it, from the checkpointed
/// side: addresses are IPv6, an IPv4 one mapped (`::ffff:a.b.c.d`), so a
/// connection of an IPv6 socket to an IPv4-mapped peer (carried as IPv4
/// packets) has the key of the same IPv4 connection. Ports are as on the
/// wire (network byte order). 36 bytes, no padding.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NetLockKey {
    /// The checkpointed end's address.
    pub local: [u8; 16],
    /// The peer's address.
    pub remote: [u8; 16],
    /// The checkpointed end's port, network byte order.
    pub local_port: u16,
    /// The peer's port, network byte order.
    pub remote_port: u16,
}

impl NetLockKey {
    /// The key of a packet seen from its sender: `local` is its source.
    pub fn of_packet(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Self {
        Self {
            local: src,
            remote: dst,
            local_port: sport,
            remote_port: dport,
        }
    }

    /// The same connection seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// An IPv4 address (4 bytes as on the wire) as an IPv4-mapped IPv6 one.
pub fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_has_no_padding_and_reverses() {
        assert_eq!(core::mem::size_of::<NetLockKey>(), 36);
        let k = NetLockKey::of_packet(mapped_v4([127, 0, 0, 1]), 80, mapped_v4([10, 0, 0, 2]), 9);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().local_port, 9);
        assert_eq!(k.reversed().remote, mapped_v4([127, 0, 0, 1]));
    }
}
