//! Every kind of resource cr-ebpf saves and restores, one file each: the
//! save side (what the frozen process's `/proc` entries and a duplicate of
//! its descriptor show), the restore side (syscalls in the restorer and
//! syscalls injected into the stub through [`sys::Sys`]) and a round-trip
//! unit test driven by the recording fake [`sys::fake::Recording`].
//!
//! * [`fd`]: descriptors, behind the [`fd::Descriptor`] trait and the
//!   registry [`fd::KINDS`] (files, pipes, sockets, epoll, eventfd, timerfd,
//!   signalfd, inotify, pidfd, memfd, inherited stdio).
//! * [`process`]: process-wide state behind the [`process::ProcessKind`]
//!   trait and the registry [`process::KINDS`] (mm fields, cwd/umask/limits,
//!   signal handlers, threads, pending signals, interval and POSIX timers),
//!   each declaring the logged syscalls that invalidate its saved answers.
//! * [`shmem`]: shared memory objects (shared anonymous memory, memfds,
//!   System V segments, tmpfs files mapped shared).
//! * [`ghost`]: deleted files held open or mapped, stored with their
//!   contents and made again (and removed) at restore.
//! * [`advice`]: a mapping's own settings (`madvise`, `mlock`,
//!   `MAP_DROPPABLE`), carried over between checkpoints while the log
//!   shows no change.
//! * [`proc`]: what `/proc/PID/{stat,status,maps}` say, parsed once.
//!
//! `docs/ARCHITECTURE.md` has the recipe for adding a resource kind.

pub mod advice;
pub mod error;
pub mod fd;
pub mod ghost;
pub mod ghost_link;
pub mod ipc;
pub mod proc;
pub mod process;
pub mod shmem;
pub mod sys;

pub use error::{proc_err, RestoreError, SaveError};
