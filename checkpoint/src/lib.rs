//! The checkpoint side: freeze a process, collect what it can see of
//! itself, read its memory on all cores, and publish an image atomically.
//!
//! * [`dump`]: a full checkpoint into a new image directory.
//! * [`Session`]: incremental checkpoints into an images directory, with a
//!   dirty tracker attached between them (pages copied while the process
//!   runs; the freeze only copies what was written since).
//! * [`compact`] and [`retain`]: keeping chains short, crash-safely.
//!
//! What is saved: threads (registers, FPU state, signal masks, rseq, robust
//! lists, pending signals), memory (pages that differ from their backing),
//! mm fields, auxv, exe, descriptors (files, devices, pipes), signal
//! handlers, itimers, cwd, umask, rlimits, credentials. `docs/IMAGE.md`
//! describes the format.

mod compact;
mod dump;
mod error;
mod freeze;
mod incremental;
mod netlock;
mod pages;
mod precopy;
mod shm_pages;
mod state;
mod streamed;
mod tree_check;
mod watchdog;

// Each resource kind's save side lives in the resources crate.
use cr_ebpf_resources::{fd as fds, proc, proc::maps, shmem};

pub use compact::{clean_leftovers, compact, retain, CompactReport, RetainReport};
pub use cr_ebpf_resources::proc::{clock_ns, monotonic_ns, parse_maps, MapEntry};
pub use dump::{dump, DumpOptions, DumpReport};
pub use error::DumpError;
pub use freeze::checkable;
pub use incremental::{
    page_hash, CheckpointReport, Followed, Method, Phases, PrecopyReport, Session, SessionOptions,
    TreeChanges,
};
pub use netlock::{ConnectionLock, NetLockKey};
pub use state::{Changes, Queries};
pub use watchdog::STALL_ENV;
