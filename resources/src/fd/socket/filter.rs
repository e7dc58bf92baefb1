//! A socket's classic BPF filter (`SO_ATTACH_FILTER`): read back with
//! `SO_GET_FILTER` (the program as it was attached) and attached again
//! to the restored socket, before `SO_LOCK_FILTER` locks it again. An
//! eBPF program (`SO_ATTACH_BPF`), which the kernel cannot give back, is
//! refused.

use std::os::fd::{AsRawFd as _, OwnedFd};

use cr_ebpf_image::FILTER_CAP;

use super::{check, SocketError};

/// `SO_GET_FILTER` (the same number as `SO_ATTACH_FILTER`).
const SO_GET_FILTER: i32 = libc::SO_ATTACH_FILTER;
/// Size of one `struct sock_filter`.
const INSN: usize = 8;

/// The classic BPF filter attached to `dup` (8 bytes an instruction);
/// empty for none.
pub(super) fn save(dup: &OwnedFd) -> Result<Vec<u8>, SocketError> {
    // With no room, the kernel answers the number of instructions.
    let mut n: libc::socklen_t = 0;
    // SAFETY: a zero-length query; the kernel writes only `n`.
    let r = unsafe {
        libc::getsockopt(
            dup.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut n,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EACCES) => SocketError::NotSupported(
                "an eBPF socket filter (SO_ATTACH_BPF), which cannot be read back".into(),
            ),
            _ => SocketError::Io("SO_GET_FILTER", e),
        });
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if n as usize > FILTER_CAP {
        return Err(SocketError::NotSupported(format!(
            "a socket filter of {n} instructions (at most {FILTER_CAP})"
        )));
    }
    let mut prog = vec![0u8; n as usize * INSN];
    // The length is counted in instructions, both ways.
    let mut len = n;
    // SAFETY: room for `n` instructions.
    check(unsafe {
        libc::getsockopt(
            dup.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_GET_FILTER,
            prog.as_mut_ptr().cast(),
            &mut len,
        )
    })
    .map_err(|e| SocketError::Io("SO_GET_FILTER", e))?;
    prog.truncate(len as usize * INSN);
    Ok(prog)
}

/// Attaches the classic BPF program `prog` (as [`save`] read it) to `fd`.
pub(super) fn attach(fd: &OwnedFd, prog: &[u8]) -> std::io::Result<()> {
    // Copied into properly aligned instructions.
    let insns: Vec<libc::sock_filter> = prog
        .chunks_exact(INSN)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: insns.len() as u16,
        filter: insns.as_ptr().cast_mut(),
    };
    // SAFETY: the program points at our instructions, alive for the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    fn udp() -> OwnedFd {
        OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    #[test]
    fn a_filter_is_read_back_and_attached_again_and_still_filters() {
        let a = udp();
        assert_eq!(save(&a).unwrap(), Vec::<u8>::new(), "no filter");
        // "drop everything": one BPF_RET #0 instruction, then accept (unused).
        let mut prog = Vec::new();
        for (code, k) in [(0x06u16, 0u32), (0x06, u32::MAX)] {
            prog.extend_from_slice(&code.to_ne_bytes());
            prog.extend_from_slice(&[0, 0]);
            prog.extend_from_slice(&k.to_ne_bytes());
        }
        attach(&a, &prog).unwrap();
        assert_eq!(save(&a).unwrap(), prog);
        let b = udp();
        attach(&b, &save(&a).unwrap()).unwrap();
        assert_eq!(save(&b).unwrap(), prog);
        let to = std::net::UdpSocket::from(b.try_clone().unwrap());
        to.set_nonblocking(true).unwrap();
        let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        from.send_to(b"dropped", to.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        let e = to.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert!(b.as_raw_fd() >= 0);
    }
}
