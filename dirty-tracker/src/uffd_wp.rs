//! Backend: userfaultfd write-protect in async mode + `PAGEMAP_SCAN`.
//!
//! Registered ranges are write-protected; the first write to a page after
//! that is resolved by the kernel on its own (about 1 µs) and marks the page
//! written. `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` returns the written pages
//! and protects them again in one call, so each scan yields exactly the pages
//! written since the previous one. The userfaultfd may belong to another
//! process (created inside it and taken with `pidfd_getfd`): the scan reads
//! that process's `/proc/PID/pagemap`.

use std::{fs::File, io, ops::Range, os::fd::OwnedFd};

use crate::sys::{self, PageRegion, PmScanArg, UffdioApi, UffdioRange, UffdioRegister};

/// Why a uffd-wp operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// `userfaultfd()` failed.
    #[error("userfaultfd() failed (is CONFIG_USERFAULTFD set, and are we root?)")]
    Create(#[source] io::Error),
    /// The kernel lacks the async write-protect features.
    #[error(
        "userfaultfd lacks WP_ASYNC/WP_UNPOPULATED (granted features {granted:#x}); \
         a kernel >= 6.7 is needed for this backend"
    )]
    Features {
        /// Features the kernel granted.
        granted: u64,
    },
    /// An ioctl failed.
    #[error("{call} failed on range {start:#x}..{end:#x}")]
    Ioctl {
        /// Which ioctl.
        call: &'static str,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Opening the pagemap failed.
    #[error("opening /proc/{pid}/pagemap")]
    Pagemap {
        /// The process.
        pid: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A userfaultfd in async write-protect mode and the pagemap to scan.
pub struct WpTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// The process, when it is not us (its pagemap is reopened on demand).
    pid: Option<u32>,
}

impl WpTracker {
    /// Creates a userfaultfd in this process and tracks this process's memory.
    pub fn for_self() -> Result<Self, WpError> {
        let uffd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY)
            .map_err(WpError::Create)?;
        Self::enable(&uffd)?;
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| WpError::Pagemap {
            pid: "self".into(),
            source,
        })?;
        Ok(Self {
            uffd,
            pagemap,
            pid: None,
        })
    }

    /// Uses a userfaultfd that belongs to process `pid` (already created there,
    /// fetched with `pidfd_getfd`, and not yet through `UFFDIO_API`).
    pub fn for_process(uffd: OwnedFd, pid: u32) -> Result<Self, WpError> {
        Self::enable(&uffd)?;
        let pagemap =
            File::open(format!("/proc/{pid}/pagemap")).map_err(|source| WpError::Pagemap {
                pid: pid.to_string(),
                source,
            })?;
        Ok(Self {
            uffd,
            pagemap,
            pid: Some(pid),
        })
    }

    /// Opens the process's pagemap again. An open pagemap stays bound to the
    /// address space it was opened on: after an `execve` it would describe
    /// the old, empty one. Reopened, a scan sees the new address space,
    /// where nothing is registered, and says so (`EPERM`) instead of
    /// reporting no writes.
    pub fn reopen_pagemap(&mut self) -> Result<(), WpError> {
        if let Some(pid) = self.pid {
            self.pagemap =
                File::open(format!("/proc/{pid}/pagemap")).map_err(|source| WpError::Pagemap {
                    pid: pid.to_string(),
                    source,
                })?;
        }
        Ok(())
    }

    fn enable(uffd: &OwnedFd) -> Result<(), WpError> {
        let wanted = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: sys::UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        unsafe { sys::ioctl(uffd, sys::UFFDIO_API, &mut api) }.map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                WpError::Features { granted: 0 }
            } else {
                WpError::Ioctl {
                    call: "UFFDIO_API",
                    start: 0,
                    end: 0,
                    source,
                }
            }
        })?;
        if api.features & wanted != wanted {
            return Err(WpError::Features {
                granted: api.features,
            });
        }
        Ok(())
    }

    /// Registers `range` for write-protect tracking and protects it, so that
    /// the next scan reports only pages written from now on.
    pub fn register(&self, range: Range<u64>) -> Result<(), WpError> {
        let err = |call, source| WpError::Ioctl {
            call,
            start: range.start,
            end: range.end,
            source,
        };
        let r = UffdioRange {
            start: range.start,
            len: range.end - range.start,
        };
        let mut reg = UffdioRegister {
            range: r,
            mode: sys::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { sys::ioctl(&self.uffd, sys::UFFDIO_REGISTER, &mut reg) }
            .map_err(|e| err("UFFDIO_REGISTER", e))?;
        let mut wp = sys::UffdioWriteprotect {
            range: r,
            mode: sys::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
        unsafe { sys::ioctl(&self.uffd, sys::UFFDIO_WRITEPROTECT, &mut wp) }
            .map_err(|e| err("UFFDIO_WRITEPROTECT", e))?;
        Ok(())
    }

    /// Stops tracking `range`.
    pub fn unregister(&self, range: Range<u64>) -> Result<(), WpError> {
        let mut r = UffdioRange {
            start: range.start,
            len: range.end - range.start,
        };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { sys::ioctl(&self.uffd, sys::UFFDIO_UNREGISTER, &mut r) }.map_err(|source| {
            WpError::Ioctl {
                call: "UFFDIO_UNREGISTER",
                start: range.start,
                end: range.end,
                source,
            }
        })?;
        Ok(())
    }

    /// Appends to `out` the page ranges in `range` written since the last
    /// scan (or registration), and write-protects them again atomically.
    pub fn scan(&self, range: Range<u64>, out: &mut Vec<Range<u64>>) -> Result<(), WpError> {
        let mut regions = vec![PageRegion::default(); 256];
        let mut start = range.start;
        while start < range.end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start,
                end: range.end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` whose `vec`
            // points to `vec_len` writable `struct page_region`s.
            let n = unsafe { sys::ioctl(&self.pagemap, sys::PAGEMAP_SCAN, &mut arg) }.map_err(
                |source| WpError::Ioctl {
                    call: "PAGEMAP_SCAN",
                    start,
                    end: range.end,
                    source,
                },
            )?;
            for r in &regions[..n as usize] {
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r.start..r.end),
                }
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(())
    }
}

/// Proves the backend on this kernel: tracks a private mapping of this
/// process, writes known pages, and requires a scan to return exactly those
/// and a second scan nothing. Returns a one-line summary.
pub fn probe() -> Result<String, String> {
    let page = sys::page_size();
    let map = sys::AnonMapping::new(16 * page as usize).map_err(|e| format!("mmap: {e}"))?;
    let range = map.addr()..map.addr() + map.len() as u64;
    // Populate a few pages first, so both populated and unpopulated pages are covered.
    map.write_byte(0, 1);
    map.write_byte(7 * page as usize, 1);
    let tracker = WpTracker::for_self().map_err(|e| crate::error_chain(&e))?;
    tracker
        .register(range.clone())
        .map_err(|e| crate::error_chain(&e))?;
    let written = [2usize, 7, 11];
    for &p in &written {
        map.write_byte(p * page as usize + 5, 0xab);
    }
    let mut found = Vec::new();
    tracker
        .scan(range.clone(), &mut found)
        .map_err(|e| crate::error_chain(&e))?;
    let expected: Vec<Range<u64>> = written
        .iter()
        .map(|&p| {
            let a = range.start + p as u64 * page;
            a..a + page
        })
        .collect();
    if found != expected {
        return Err(format!(
            "scan after writing pages {written:?} returned {found:x?}, expected {expected:x?}"
        ));
    }
    let mut again = Vec::new();
    tracker
        .scan(range.clone(), &mut again)
        .map_err(|e| crate::error_chain(&e))?;
    if !again.is_empty() {
        return Err(format!("a rescan with no writes returned {again:x?}"));
    }
    let _ = tracker.unregister(range);
    Ok(format!(
        "{} of {} written pages found, rescan clean",
        found.len(),
        written.len()
    ))
}
