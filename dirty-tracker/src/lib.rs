//! Which pages of a process changed since the last checkpoint.
//!
//! Three backends, chosen at run time (see [`detect`]) and reported by
//! `cr-ebpf check`:
//!
//! * [`Backend::UffdWp`] — userfaultfd write-protect in async mode plus the
//!   `PAGEMAP_SCAN` ioctl (kernel >= 6.7). Primary: reads and re-arms in one
//!   call, ~1 µs per first write. Implemented in [`uffd_wp`]; [`attach`]
//!   gives a tracker for another process (a userfaultfd created inside it by
//!   an injected syscall and taken with `pidfd_getfd`, leaving its
//!   descriptor table as it was).
//! * [`Backend::SoftDirty`] — pagemap soft-dirty bits, on kernels built with
//!   `CONFIG_MEM_SOFT_DIRTY` ([`soft_dirty`]). Clearing them is process-wide;
//!   the tracker keeps per-range scans exact by reading every registered
//!   range before each clear.
//! * [`Backend::Hashing`] — a 64-bit hash of every page, read with
//!   `/proc/PID/mem` and compared at each scan ([`hashing`]). Always
//!   works, slowest; it reports content *changes*, so a page rewritten with
//!   the same bytes is not reported (which a checkpoint does not need).
//!
//! All three have the same shape — `register(range)`, `unregister(range)`,
//! `scan(range, &mut out)` appending the page ranges written since the last
//! scan, adjacent pages merged — and [`Tracker`] wraps whichever one
//! [`for_process`] made. Registering new mappings from the eBPF log comes
//! with incremental checkpoints.

pub mod attach;
pub mod hashing;
mod ranges;
pub mod soft_dirty;
pub mod sys;
pub mod uffd_wp;

use std::ops::Range;

use hashing::{HashError, HashTracker};
use soft_dirty::{SoftDirtyError, SoftDirtyTracker};
use uffd_wp::{WpError, WpTracker};

/// A way of finding the pages written since the last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// userfaultfd WP_ASYNC + PAGEMAP_SCAN.
    UffdWp,
    /// pagemap soft-dirty bits.
    SoftDirty,
    /// Content hashing.
    Hashing,
}

impl Backend {
    /// Stable lower-case name, as `cr-ebpf check` reports it.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::UffdWp => "uffd-wp",
            Backend::SoftDirty => "soft-dirty",
            Backend::Hashing => "hashing",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What each backend's probe found on this machine.
#[derive(Debug, Clone)]
pub struct Detection {
    /// Result of the uffd-wp probe (summary or why not).
    pub uffd_wp: Result<String, String>,
    /// Result of the soft-dirty probe.
    pub soft_dirty: Result<String, String>,
    /// Result of the hashing probe.
    pub hashing: Result<String, String>,
}

impl Detection {
    /// The backend to use: the first that works, in order of preference;
    /// hashing when nothing else does (even if its probe failed, as there is
    /// nothing left to fall back to).
    pub fn backend(&self) -> Backend {
        if self.uffd_wp.is_ok() {
            Backend::UffdWp
        } else if self.soft_dirty.is_ok() {
            Backend::SoftDirty
        } else {
            Backend::Hashing
        }
    }
}

/// Probes every backend on this kernel, each by tracking a mapping of this
/// process, writing known pages and requiring exactly those back. The
/// soft-dirty probe clears this process's soft-dirty bits.
pub fn detect() -> Detection {
    Detection {
        uffd_wp: uffd_wp::probe(),
        soft_dirty: soft_dirty::probe(),
        hashing: hashing::probe(),
    }
}

/// Why making or using a [`Tracker`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The backend does not work on this machine.
    #[error("the {backend} backend is unavailable here: {reason}")]
    Unavailable {
        /// The backend asked for.
        backend: Backend,
        /// What its probe found.
        reason: String,
    },
    /// Attaching the uffd-wp backend to another process failed.
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    /// A uffd-wp operation failed.
    #[error(transparent)]
    Wp(#[from] WpError),
    /// A soft-dirty operation failed.
    #[error(transparent)]
    SoftDirty(#[from] SoftDirtyError),
    /// A hashing operation failed.
    #[error(transparent)]
    Hashing(#[from] HashError),
}

/// A dirty-page tracker of one process, whichever its backend.
pub enum Tracker {
    /// userfaultfd write-protect + `PAGEMAP_SCAN`.
    Wp(WpTracker),
    /// Soft-dirty bits.
    SoftDirty(SoftDirtyTracker),
    /// Content hashing.
    Hashing(HashTracker),
}

impl Tracker {
    /// The backend behind this tracker.
    pub fn backend(&self) -> Backend {
        match self {
            Tracker::Wp(_) => Backend::UffdWp,
            Tracker::SoftDirty(_) => Backend::SoftDirty,
            Tracker::Hashing(_) => Backend::Hashing,
        }
    }

    /// Starts tracking `range` (page-aligned): the next scan reports only
    /// pages written from now on.
    pub fn register(&mut self, range: Range<u64>) -> Result<(), TrackerError> {
        match self {
            Tracker::Wp(t) => t.register(range)?,
            Tracker::SoftDirty(t) => t.register(range)?,
            Tracker::Hashing(t) => t.register(range)?,
        }
        Ok(())
    }

    /// Stops tracking `range`.
    pub fn unregister(&mut self, range: Range<u64>) -> Result<(), TrackerError> {
        match self {
            Tracker::Wp(t) => t.unregister(range)?,
            Tracker::SoftDirty(t) => t.unregister(range)?,
            Tracker::Hashing(t) => t.unregister(range)?,
        }
        Ok(())
    }

    /// Appends to `out` the page ranges in `range` written (for hashing:
    /// changed) since the last scan or registration, in address order with
    /// adjacent pages merged, and re-arms them.
    pub fn scan(
        &mut self,
        range: Range<u64>,
        out: &mut Vec<Range<u64>>,
    ) -> Result<(), TrackerError> {
        match self {
            Tracker::Wp(t) => t.scan(range, out)?,
            Tracker::SoftDirty(t) => t.scan(range, out)?,
            Tracker::Hashing(t) => t.scan(range, out)?,
        }
        Ok(())
    }
}

/// Makes a tracker of process `pid` (this process included) with `backend`,
/// nothing registered yet. uffd-wp attaches to another process with
/// [`attach::attach`] (freezing it for a moment); soft-dirty first runs
/// [`soft_dirty::probe`] and refuses when the kernel lacks the bits.
pub fn for_process(pid: i32, backend: Backend) -> Result<Tracker, TrackerError> {
    Ok(match backend {
        Backend::UffdWp if pid == std::process::id() as i32 => Tracker::Wp(WpTracker::for_self()?),
        Backend::UffdWp => Tracker::Wp(attach::attach(pid)?),
        Backend::SoftDirty => {
            soft_dirty::probe().map_err(|reason| TrackerError::Unavailable { backend, reason })?;
            Tracker::SoftDirty(SoftDirtyTracker::for_process(pid)?)
        }
        Backend::Hashing => Tracker::Hashing(HashTracker::for_process(pid)?),
    })
}

/// An error and its causes on one line (for probe summaries).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_order() {
        let ok = || Ok::<String, String>(String::new());
        let no = || Err::<String, String>(String::new());
        let d = |u, s| Detection {
            uffd_wp: u,
            soft_dirty: s,
            hashing: ok(),
        };
        assert_eq!(d(ok(), ok()).backend(), Backend::UffdWp);
        assert_eq!(d(no(), ok()).backend(), Backend::SoftDirty);
        assert_eq!(d(no(), no()).backend(), Backend::Hashing);
    }

    /// The common interface on this process: every backend that works here
    /// reports the same pages; soft-dirty is refused where the kernel lacks it.
    #[test]
    fn tracker_interface_on_this_process() {
        let p = sys::page_size();
        let map = sys::AnonMapping::new(8 * p as usize).unwrap();
        let range = map.addr()..map.addr() + 8 * p;
        let pid = std::process::id() as i32;
        let mut trackers = Vec::new();
        for backend in [Backend::UffdWp, Backend::SoftDirty, Backend::Hashing] {
            match for_process(pid, backend) {
                Ok(t) => trackers.push(t),
                Err(TrackerError::Unavailable { .. }) if backend == Backend::SoftDirty => {
                    assert!(soft_dirty::probe().is_err());
                }
                Err(e) if backend == Backend::UffdWp && std::env::var_os("CI").is_none() => {
                    eprintln!("uffd-wp unavailable here: {e}");
                }
                Err(e) => panic!("{backend}: {e}"),
            }
        }
        assert!(trackers.iter().any(|t| t.backend() == Backend::Hashing));
        for t in &mut trackers {
            t.register(range.clone()).unwrap();
        }
        for i in [1usize, 2, 6] {
            map.write_byte(i * p as usize + 3, 9);
        }
        let a = map.addr();
        for t in &mut trackers {
            let mut found = Vec::new();
            t.scan(range.clone(), &mut found).unwrap();
            assert_eq!(
                found,
                vec![a + p..a + 3 * p, a + 6 * p..a + 7 * p],
                "{}",
                t.backend()
            );
            t.unregister(range.clone()).unwrap();
        }
    }

    /// Runs the real uffd-wp probe: needs only a kernel >= 6.7 with
    /// userfaultfd (user-mode-only faults need no privilege).
    #[test]
    fn uffd_wp_finds_exactly_the_written_pages() {
        match uffd_wp::probe() {
            Ok(summary) => assert!(summary.starts_with("3 of 3")),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: uffd-wp unavailable here: {e}");
            }
            Err(e) => panic!("uffd-wp probe failed in CI: {e}"),
        }
    }
}
