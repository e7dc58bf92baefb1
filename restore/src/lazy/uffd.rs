//! The userfaultfd ABI a lazy restore uses, and the steps around it that
//! do not serve pages: making the descriptor inside the stub, registering,
//! killing what cannot be completed.

use std::os::fd::OwnedFd;

use crate::RestoreError;

pub(super) const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub(super) const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub(super) const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub(super) const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub(super) const FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;
pub(super) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

pub(super) const EVENT_PAGEFAULT: u8 = 0x12;
pub(super) const EVENT_FORK: u8 = 0x13;
pub(super) const EVENT_REMAP: u8 = 0x14;
pub(super) const EVENT_REMOVE: u8 = 0x15;
pub(super) const EVENT_UNMAP: u8 = 0x16;

const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioCopy {
    pub(super) dst: u64,
    pub(super) src: u64,
    pub(super) len: u64,
    pub(super) mode: u64,
    pub(super) copy: i64,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct UffdioZeropage {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) mode: u64,
    pub(super) zeropage: i64,
}

pub(super) const UFFDIO_COPY: u64 = iowr(0xaa, 0x03, std::mem::size_of::<UffdioCopy>());
pub(super) const UFFDIO_ZEROPAGE: u64 = iowr(0xaa, 0x04, std::mem::size_of::<UffdioZeropage>());
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
pub(super) const UFFDIO_WAKE: u64 = (2 << 30) | (16 << 16) | (0xaa << 8) | 0x02;

/// Negotiates the API on the userfaultfd `uffd` (taken from the stub) and
/// registers `ranges` with it.
pub(crate) fn register(uffd: &OwnedFd, ranges: &[(u64, u64)]) -> Result<(), RestoreError> {
    use cr_ebpf_dirty_tracker::sys;
    let fail = |call: &str, err: std::io::Error| RestoreError::Syscall {
        call: format!("{call} (lazy restore)"),
        err,
    };
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features: FEATURES,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
    unsafe { sys::ioctl(uffd, sys::UFFDIO_API, &mut api) }.map_err(|e| fail("UFFDIO_API", e))?;
    for &(start, end) in ranges {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange {
                start,
                len: end - start,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { sys::ioctl(uffd, sys::UFFDIO_REGISTER, &mut reg) }
            .map_err(|e| fail(&format!("UFFDIO_REGISTER {start:#x}-{end:#x}"), e))?;
    }
    Ok(())
}

/// Kills `root` and its descendants: each is stopped as it is found (a
/// stopped process cannot fork one more meanwhile), then all are killed.
/// `signal_root` sends a signal to `root` itself (through a pidfd where the
/// caller has one: never another process that got its pid). Returns how
/// many processes.
pub(super) fn kill_tree(root: i32, signal_root: impl Fn(i32)) -> usize {
    signal_root(libc::SIGSTOP);
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", all[i])) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                    // SAFETY: a signal to a descendant of the process.
                    unsafe { libc::kill(c, libc::SIGSTOP) };
                    all.push(c);
                }
            }
        }
        i += 1;
    }
    signal_root(libc::SIGKILL);
    for &p in &all[1..] {
        // SAFETY: a descendant found above, stopped.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    all.len()
}

/// Makes a userfaultfd inside the stub through `call` (an injected
/// syscall) and takes it into this process (`pidfd_getfd`); the stub's
/// descriptor is closed again.
pub(crate) fn take_uffd(
    pid: i32,
    call: impl Fn(&str, i64, [u64; 6]) -> Result<i64, RestoreError>,
) -> Result<OwnedFd, RestoreError> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = call("userfaultfd", libc::SYS_userfaultfd, [flags, 0, 0, 0, 0, 0])?;
    let taken = cr_ebpf_dirty_tracker::attach::take_fd(pid, fd as i32);
    call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    taken.map_err(|err| RestoreError::Syscall {
        call: "pidfd_getfd of the stub's userfaultfd (lazy restore)".into(),
        err,
    })
}
