//! The network lock: a TC classifier (tcx, ingress and egress of every
//! interface of the checkpointed process's network namespace) that drops
//! every packet of the TCP connections in `NETLOCK_CONNECTIONS`, in either
//! direction. A dump locks its connections before it reads them and keeps
//! the lock (pinned in bpffs) after the process is gone, so a peer that
//! sends meanwhile is not answered with a reset by a kernel that has no
//! socket for it: its packets vanish, and TCP sends them again to the
//! restored socket once the restore removes the lock.
//!
//! Packets are read relative to the network header
//! (`bpf_skb_load_bytes_relative`), so devices with and without a link
//! header (loopback, ethernet, tun) look the same. A non-first IP
//! fragment has no ports and passes; IPv6 extension headers (hop-by-hop,
//! routing, destination options, fragment) are skipped, up to four.
// For the BPF target. A host build of the workspace (`cargo build
// --workspace`, `cargo test --workspace`) compiles the programs as a plain
// binary that does nothing; the real objects are built by loader/build.rs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference, as the BPF helpers take them: the code the verifier accepts stays as it is"
)]
#![allow(
    clippy::unnecessary_cast,
    reason = "the binding constants' types differ between the BPF target and a host build"
)]

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_skb_load_bytes_relative,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
    EbpfContext,
};
use cr_ebpf_common::netlock::{mapped_v4, NetLockKey, CAPACITY};

/// The locked connections (value unused), seen from the checkpointed end.
#[map]
static NETLOCK_CONNECTIONS: HashMap<NetLockKey, u32> = HashMap::with_max_entries(CAPACITY, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// Drops the packet (`TCX_DROP`) when it belongs to a locked connection,
/// else hands it on (`TCX_NEXT`: other programs and the stack decide).
#[classifier]
pub fn netlock(ctx: TcContext) -> i32 {
    match locked(&ctx) {
        Some(true) => TC_ACT_SHOT as i32,
        _ => TC_ACT_UNSPEC,
    }
}

/// `len` bytes at `offset` from the network header into `buf`.
#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, offset: u32) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // SAFETY: the helper writes at most N bytes into our buffer.
    let r = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            buf.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    (r == 0).then_some(buf)
}

#[inline(always)]
fn locked(ctx: &TcContext) -> Option<bool> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let (src, dst, l4) = if proto == ETH_P_IP {
        let h: [u8; 20] = load(ctx, 0)?;
        // A non-first fragment carries no ports.
        if h[9] != IPPROTO_TCP || (u16::from_be_bytes([h[6], h[7]]) & 0x1fff) != 0 {
            return None;
        }
        let src = mapped_v4([h[12], h[13], h[14], h[15]]);
        let dst = mapped_v4([h[16], h[17], h[18], h[19]]);
        (src, dst, u32::from(h[0] & 0x0f) * 4)
    } else if proto == ETH_P_IPV6 {
        let h: [u8; 40] = load(ctx, 0)?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        let mut next = h[6];
        let mut off: u32 = 40;
        for _ in 0..4 {
            if next == IPPROTO_TCP {
                break;
            }
            let e: [u8; 4] = load(ctx, off)?;
            match next {
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => off += (u32::from(e[1]) + 1) * 8,
                IPV6_FRAGMENT => {
                    if (u16::from_be_bytes([e[2], e[3]]) & 0xfff8) != 0 {
                        return None;
                    }
                    off += 8;
                }
                _ => return None,
            }
            next = e[0];
        }
        if next != IPPROTO_TCP {
            return None;
        }
        (src, dst, off)
    } else {
        return None;
    };
    let p: [u8; 4] = load(ctx, l4)?;
    // Ports as on the wire: the bytes read as a native u16 keep their order.
    let sport = u16::from_ne_bytes([p[0], p[1]]);
    let dport = u16::from_ne_bytes([p[2], p[3]]);
    let key = NetLockKey::of_packet(src, sport, dst, dport);
    // SAFETY: lookups only read the map values, which we do not use.
    let hit = unsafe {
        NETLOCK_CONNECTIONS.get(&key).is_some()
            || NETLOCK_CONNECTIONS.get(&key.reversed()).is_some()
    };
    Some(hit)
}

#[cfg(not(test))]
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// A host build's entry point: the programs only run in the kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
