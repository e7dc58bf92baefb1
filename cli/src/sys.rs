//! Raw syscalls the binary makes directly (everything else goes through nix
//! or the library crates).

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: a new fd the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, targetfd, 0)`: a duplicate of another process's fd.
pub fn pidfd_getfd(pidfd: RawFd, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target_fd, 0) })?;
    // SAFETY: a new fd the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2)`: 0 when both fds are the same open file.
pub fn kcmp_file(pid1: libc::pid_t, pid2: libc::pid_t, fd1: RawFd, fd2: RawFd) -> io::Result<i64> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) })
}

/// `arch_prctl(code, addr)`.
pub fn arch_prctl(code: libc::c_int, addr: u64) -> io::Result<i64> {
    // SAFETY: the codes used here take an integer address and do not write memory.
    check(unsafe { libc::syscall(libc::SYS_arch_prctl, code, addr) })
}

/// `struct prctl_mm_map`.
#[repr(C)]
#[derive(Default, Debug)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)`: the structure size the kernel expects.
pub fn prctl_mm_map_size() -> io::Result<u32> {
    let mut size: u32 = 0;
    // SAFETY: PR_SET_MM_MAP_SIZE writes one u32 to the pointer.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32,
            0,
            0,
        )
    } as libc::c_long)?;
    Ok(size)
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP, map)`.
pub fn prctl_set_mm_map(map: &PrctlMmMap) -> io::Result<()> {
    // SAFETY: the kernel reads `size_of::<PrctlMmMap>()` bytes and, through
    // `map.auxv`, `map.auxv_size` bytes the caller keeps alive.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP,
            map as *const PrctlMmMap,
            std::mem::size_of::<PrctlMmMap>(),
            0,
        )
    } as libc::c_long)?;
    Ok(())
}

/// The current program break (`brk(0)`).
pub fn current_brk() -> u64 {
    // SAFETY: brk(0) only queries.
    unsafe { libc::syscall(libc::SYS_brk, 0) as u64 }
}

/// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, new)`.
pub fn mremap_fixed(old: u64, len: u64, new: u64) -> io::Result<()> {
    // SAFETY: moves a whole mapping the caller names; the caller makes sure
    // nothing it uses lives there while it is away.
    let r = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            len as usize,
            len as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            new as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reserves `len` bytes of address space (PROT_NONE).
pub fn reserve(len: u64) -> io::Result<u64> {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}
