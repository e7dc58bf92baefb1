//! Errors of the loader, each naming what is missing and what to do.

use std::io;

/// Why loading, attaching or tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel refused to load or attach for lack of privilege.
    #[error(
        "the kernel refused to {action}: it needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); \
         run cr-ebpf as root"
    )]
    NotPermitted {
        /// What was being done.
        action: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// tracefs is not mounted, so tracepoints cannot be attached.
    #[error(
        "tracefs is not mounted (looked in /proc/mounts, /sys/kernel/tracing and \
         /sys/kernel/debug/tracing): run `mount -t tracefs nodev /sys/kernel/tracing` \
         or `cargo xtask setup`"
    )]
    TracefsMissing,
    /// A tracepoint this tool needs does not exist on this kernel.
    #[error(
        "tracepoint {category}/{name} does not exist on this kernel ({path}); \
         cr-ebpf needs CONFIG_FTRACE_SYSCALLS and the exceptions/sched tracepoints"
    )]
    TracepointMissing {
        /// Tracepoint category.
        category: String,
        /// Tracepoint name.
        name: String,
        /// Where its format file was expected.
        path: String,
    },
    /// A tracepoint's format lacks a field the programs read.
    #[error("tracepoint {event} has no field `{field}` on this kernel; this kernel's layout is not supported yet")]
    TracepointField {
        /// `category/name`.
        event: String,
        /// The missing field.
        field: String,
    },
    /// Loading the object into the kernel failed for another reason.
    #[error(
        "loading the eBPF object failed (is BPF enabled in this kernel? `cr-ebpf check` tells)"
    )]
    Load(#[source] Box<aya::EbpfError>),
    /// Loading or attaching one program failed.
    #[error("eBPF program `{program}` could not be {action} ({category}/{name})")]
    Program {
        /// Program name in the object.
        program: String,
        /// `loaded` or `attached`.
        action: &'static str,
        /// Tracepoint category.
        category: String,
        /// Tracepoint name.
        name: String,
        /// The underlying error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("eBPF map `{map}`: {what}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A map the object must contain is not in it.
    #[error(
        "the embedded eBPF object has no map `{0}`: the build is inconsistent, rebuild cr-ebpf"
    )]
    MissingMap(&'static str),
    /// The process to track does not exist.
    #[error("no process with pid {pid}: check the pid (`ps -p {pid}`)")]
    NoSuchProcess {
        /// The pid that was asked for.
        pid: u32,
    },
    /// The tracked-process map is full.
    #[error("cannot track pid {pid}: the tracked-process map is full ({capacity} processes)")]
    TrackedMapFull {
        /// The pid that was asked for.
        pid: u32,
        /// Map capacity.
        capacity: u32,
    },
    /// Making, finding or removing a network lock failed.
    #[error("network lock: {what}")]
    NetLock {
        /// What was being done, and on what.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading tracefs or /proc failed.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Maps an aya error that wraps a syscall error to `NotPermitted` when the
/// kernel said EPERM/EACCES.
pub(crate) fn io_error_of<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

pub(crate) fn is_permission(err: &(dyn std::error::Error + 'static)) -> bool {
    io_error_of(err)
        .and_then(io::Error::raw_os_error)
        .is_some_and(|e| e == libc::EPERM || e == libc::EACCES)
}
