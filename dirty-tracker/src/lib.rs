//! Which pages of a process changed since the last checkpoint.
//!
//! Three backends, chosen at run time (see [`detect`]) and reported by
//! `cr-ebpf check`:
//!
//! * [`Backend::UffdWp`] — userfaultfd write-protect in async mode plus the
//!   `PAGEMAP_SCAN` ioctl (kernel >= 6.7). Primary: reads and re-arms in one
//!   call, ~1 µs per first write. Implemented in [`uffd_wp`].
//! * [`Backend::SoftDirty`] — pagemap soft-dirty bits, on kernels built with
//!   `CONFIG_MEM_SOFT_DIRTY`. Only detected so far ([`soft_dirty`]).
//! * [`Backend::Hashing`] — compare page contents with the previous
//!   checkpoint; always works, slowest. Used when nothing else does.
//!
//! [`attach::attach`] gives a tracker for another process (a userfaultfd
//! created inside it by an injected syscall and taken with `pidfd_getfd`,
//! leaving its descriptor table as it was). Registering new mappings from
//! the eBPF log, and the hashing backend's scanner, come with incremental
//! checkpoints.

pub mod attach;
pub mod soft_dirty;
pub mod sys;
pub mod uffd_wp;

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
}

impl Detection {
    /// The backend to use: the first that works, in order of preference.
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

/// Probes every backend on this kernel.
pub fn detect() -> Detection {
    Detection {
        uffd_wp: uffd_wp::probe(),
        soft_dirty: soft_dirty::probe(),
    }
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
        };
        assert_eq!(d(ok(), ok()).backend(), Backend::UffdWp);
        assert_eq!(d(no(), ok()).backend(), Backend::SoftDirty);
        assert_eq!(d(no(), no()).backend(), Backend::Hashing);
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
