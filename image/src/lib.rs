//! The checkpoint image format, version 1. Full description: `docs/IMAGE.md`.
//!
//! An image is a directory holding component files. Every file starts with
//! a 32-byte [header](mod@file) (magic, format major/minor independent of the
//! crate version, file kind, payload length and CRC-32, header CRC-32).
//!
//! * `manifest.img` — tagged sections: the process, its threads, its
//!   memory mappings ([`Manifest`]).
//! * `pages.img` — the page store: lz4-compressed chunks of consecutive
//!   pages, each with its address and a CRC-32 ([`pages`]).
//!
//! Readers reject a newer major version, a minor version they do not know,
//! unknown required sections and enum values, bad checksums, and sizes over
//! the caps: a damaged image is an error that names the file and offset,
//! never a guess. Images appear atomically ([`publish()`]).
//!
//! A writer writes the newest format ([`FORMAT_MINOR`]); a reader reads
//! every minor up to its own, each file as its header's minor says. Every
//! added section tag, descriptor kind, mapping kind or shared memory kind
//! bumps the minor version (see the `manifest` module and `docs/IMAGE.md`).

pub mod aligned;
pub mod chain;
mod codec;
pub mod file;
pub mod images_dir;
mod manifest;
pub mod pages;
pub mod progress;
mod publish;
pub mod tree;
pub mod trust;

pub use chain::Chain;
pub use file::{FileKind, FORMAT_MAJOR, FORMAT_MINOR};
pub use manifest::{
    Cgroup, CgroupDir, ChainInfo, CowRun, Ctty, EpollItem, Fanotify, FanotifyMark, FdInfo, FdKind,
    FdState, FileLock, FileOwner, InotifyWatch, IpcNs, IpcPerm, LineEnd, LockKind, Manifest,
    MappingInfo, MappingKind, MarkOn, Membership, Owner, PosixTimer, Prctl, ProcessInfo, PtyPair,
    QueuedInput, Sched, SeccompFilter, ShmemKind, ShmemObject, SigAction, SockOpt, SocketFile,
    SocketInfo, SysvMsq, SysvSem, SysvShm, TcpRepair, Terminal, ThreadCreds, ThreadInfo, TtyInfo,
    TtyRole, Uts, FILTER_CAP, GHOST_CAP, IN_FLIGHT_CAP, MAP_DONTDUMP, MAP_DONTFORK, MAP_DROPPABLE,
    MAP_GROWSDOWN, MAP_HUGEPAGE, MAP_INHERITS, MAP_KNOWN, MAP_LOCKED, MAP_LOCKONFAULT,
    MAP_MAYWRITE, MAP_MERGEABLE, MAP_NOHUGEPAGE, MAP_NORESERVE, MAP_RANDOM, MAP_SEQUENTIAL,
    MAP_SHARED, MAP_WIPEONFORK, MEMBARRIER_REGISTRATIONS, SCHED_RESET_ON_FORK, SECCOMP_FILTER_LOG,
    SHMEM_CAP, SHMEM_PAGES, SHMEM_PAGES_END, SHMEM_SLOT, SOCKET_QUEUE_CAP, TCP_HALF_CLOSED,
    TERMIOS_LEN, UTS_NAME_CAP,
};
pub use publish::{publish, sweep_leftovers};

/// Name of the manifest file in an image directory.
pub const MANIFEST_FILE: &str = "manifest.img";
/// Name of the page store in an image directory.
pub const PAGES_FILE: &str = "pages.img";
/// The page store's index of chunk headers (optional, see [`pages`]).
pub const PAGES_INDEX_FILE: &str = "pages.idx";

/// What is wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing a file failed.
    #[error("{path}: {what}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The content is damaged or not an image of ours.
    #[error("{path}: corrupt image at byte {offset}: {what}")]
    Corrupt {
        /// The file.
        path: String,
        /// Byte offset where the problem was found.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A file would be larger than a reader accepts.
    #[error(
        "{path}: {size} bytes, more than the {cap} a reader accepts (shared memory \
         contents are stored in the manifest: the process holds too much of it)"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The most a reader accepts.
        cap: u64,
    },
    /// Written by a format version this build cannot read.
    #[error(
        "{path}: image format {major}.{minor} is not readable by this cr-ebpf \
         (reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); use a newer cr-ebpf"
    )]
    Version {
        /// The file.
        path: String,
        /// Major version in the file.
        major: u16,
        /// Minor version in the file.
        minor: u16,
    },
    /// The destination already exists (images are never overwritten).
    #[error(
        "{path} already exists: choose a new directory; an existing image is never overwritten"
    )]
    Exists {
        /// The directory.
        path: String,
    },
    /// Another user owns or can write (part of) an image, or a directory
    /// it goes in: it is not trusted (see the `trust` module).
    #[error(
        "{path}: {why}: an image must be owned by you or root and writable by nobody else, \
         and so must every directory on the way to it (unless sticky, as /tmp); check it, \
         then fix its owner and mode, or use it as its owner"
    )]
    Untrusted {
        /// What is not trusted.
        path: String,
        /// Why.
        why: String,
    },
}
