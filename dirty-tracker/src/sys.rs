//! Raw kernel interfaces of the dirty tracker: userfaultfd, `PAGEMAP_SCAN`
//! and pagemap entries. Debian's headers predate these features, so the
//! structures and numbers are defined here (x86_64, from the kernel UAPI).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xaa;
/// `UFFD_USER_MODE_ONLY`: only faults from user mode (no privilege needed for that).
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED`: unpopulated pages count as write-protected.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: write faults resolve themselves, only marking the page.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const fn ior(ty: u8, nr: u8, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// `UFFD_API`.
    pub api: u64,
    /// Requested, then granted features.
    pub features: u64,
    /// Available ioctls (out).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// Range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Available ioctls on the range (out).
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    /// Range.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u64 = iowr(0xaa, 0x3f, std::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = iowr(0xaa, 0x00, std::mem::size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u64 = ior(0xaa, 0x01, std::mem::size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT`.
pub const UFFDIO_WRITEPROTECT: u64 = iowr(0xaa, 0x06, std::mem::size_of::<UffdioWriteprotect>());

/// `PM_SCAN_WP_MATCHING`: write-protect the matched pages as they are reported.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the range is registered for async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` categories of the region.
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    /// Size of this structure.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// Start of the range to scan.
    pub start: u64,
    /// End of the range to scan.
    pub end: u64,
    /// Where the walk stopped (out).
    pub walk_end: u64,
    /// Output array of `PageRegion`.
    pub vec: u64,
    /// Capacity of `vec`.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// All of these categories must be set.
    pub category_mask: u64,
    /// At least one of these must be set.
    pub category_anyof_mask: u64,
    /// Categories to report.
    pub return_mask: u64,
}

/// `PAGEMAP_SCAN`.
pub const PAGEMAP_SCAN: u64 = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());

/// Calls `ioctl(fd, request, arg)`, returning the non-negative result.
///
/// # Safety
/// `arg` must point to the structure `request` expects, valid for reads and writes.
pub unsafe fn ioctl<T>(fd: &impl AsRawFd, request: u64, arg: *mut T) -> io::Result<i64> {
    // SAFETY: the caller guarantees `arg` matches `request`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

/// `userfaultfd(flags)` in the calling process.
pub fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with an integer argument.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An anonymous private read-write mapping, unmapped on drop.
pub struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

impl AnonMapping {
    /// Maps `len` bytes.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` rejects 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes one byte at `offset` (volatile, so it really happens).
    pub fn write_byte(&self, offset: usize, value: u8) {
        assert!(offset < self.len);
        // SAFETY: in bounds of a mapping we own with PROT_WRITE.
        unsafe { self.addr.add(offset).write_volatile(value) };
    }

    /// Reads one byte at `offset`.
    pub fn read_byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: in bounds of a mapping we own with PROT_READ.
        unsafe { self.addr.add(offset).read_volatile() }
    }

    /// Changes the protection of the pages `offset..offset + len` to `prot`
    /// (`PROT_*`); both must be multiples of the page size.
    ///
    /// # Safety
    /// [`write_byte`](Self::write_byte) and [`read_byte`](Self::read_byte)
    /// rely on the mapping being readable and writable: the caller must not
    /// use them on pages it made inaccessible, until it restores them.
    pub unsafe fn protect(&self, offset: usize, len: usize, prot: i32) -> io::Result<()> {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the pages are inside a mapping this value owns; the caller
        // keeps the accessors away from them while they are protected.
        let r = unsafe { libc::mprotect(self.addr.add(offset).cast(), len, prot) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// The pagemap entry (`/proc/PID/pagemap`) of the page holding `addr`.
pub fn pagemap_entry(pagemap: &File, addr: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 8];
    pagemap.read_exact_at(&mut buf, (addr / page_size()) * 8)?;
    Ok(u64::from_ne_bytes(buf))
}

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}
