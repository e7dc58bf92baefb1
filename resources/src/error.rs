//! What can go wrong saving or restoring a resource.

use cr_ebpf_image::ImageError;
use cr_ebpf_tracee::TraceError;

/// Why a resource of a frozen process could not be saved. The process is
/// resumed by the caller; nothing is published.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Inspecting the process with ptrace (or a syscall injected into it)
    /// failed.
    #[error("freezing or inspecting process {pid}")]
    Trace {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// Reading /proc (or asking a duplicate of a descriptor) failed.
    #[error("reading {path} of process {pid}")]
    Proc {
        /// The process.
        pid: i32,
        /// The file, or what was asked.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The process holds something this version cannot save.
    #[error("not supported: {what} in process {pid}")]
    NotSupported {
        /// The process.
        pid: i32,
        /// What.
        what: String,
    },
    /// A descriptor of the process cannot be saved by this version.
    #[error("not supported: {what} on fd {fd} of pid {pid}")]
    NotSupportedFd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
        /// What it is.
        what: String,
    },
}

/// A [`SaveError::Proc`] maker for `map_err`.
pub fn proc_err(pid: i32, path: String) -> impl FnOnce(std::io::Error) -> SaveError {
    move |source| SaveError::Proc { pid, path, source }
}

/// Why a restore failed. Nothing half-built keeps running: the stub is
/// traced with `PTRACE_O_EXITKILL` and killed on any error.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The image cannot be read or is damaged.
    #[error("reading the image")]
    Image(#[from] ImageError),
    /// The original pid is taken.
    #[error(
        "pid {pid} is in use by another process ({comm}): the checkpointed process needs \
         its original pid; stop that process or restore in a new pid namespace"
    )]
    PidInUse {
        /// The pid.
        pid: i32,
        /// What holds it.
        comm: String,
    },
    /// The process ran under other credentials, in an image that records
    /// only its uids and gids (format before 1.9).
    #[error(
        "the process ran as uid/gid {image:?} (real, effective, saved, fs), cr-ebpf runs as \
         {ours:?}, and its image (format before 1.9) does not record the rest of its \
         credentials (groups, capabilities): restore it as that user"
    )]
    Credentials {
        /// Credentials in the image.
        image: [u32; 8],
        /// Ours.
        ours: [u32; 8],
    },
    /// A user other than root restores only images of its own uid.
    #[error(
        "thread {tid} of the image ran as uids {image:?} (real, effective, saved, fs) and \
         cr-ebpf runs as uid {ours} without being root: only root restores a process of \
         another user (it then runs exactly as recorded, never as root)"
    )]
    OtherUser {
        /// The thread.
        tid: i32,
        /// Its uids.
        image: [u32; 4],
        /// Our real uid.
        ours: u32,
    },
    /// The image needs something this version cannot restore yet.
    #[error("not supported yet: {0}")]
    NotSupported(String),
    /// The stub the process is built in did not behave as it must (a
    /// failure of the restorer or of this machine, not of the image).
    #[error("the restore stub: {what}")]
    Stub {
        /// What went wrong.
        what: String,
    },
    /// Page data of the image failed its checksum or does not decompress.
    #[error("damaged page data in the image: {what}; restore an older checkpoint (--checkpoint) or another copy")]
    PageData {
        /// What is wrong, and where.
        what: String,
    },
    /// Restoring one process of the image failed.
    #[error("restoring process {pid}")]
    Process {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: Box<RestoreError>,
    },
    /// A file the process had mapped is gone or changed.
    #[error("file {path}, mapped by the process, {what}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// Building the process failed.
    #[error("building the process: {what}")]
    Build {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// A restored process or thread could not be put into its cgroup.
    #[error(
        "putting {who} into cgroup {dir} failed: {err}; make that cgroup accept it (a v2 \
         cgroup whose controllers are enabled for its children takes no processes; a new v1 \
         cpuset cgroup needs cpuset.cpus and cpuset.mems), or restore under another cgroup \
         with --cgroup-root [CONTROLLER:]PATH"
    )]
    Cgroup {
        /// The process or thread.
        who: String,
        /// The cgroup's directory.
        dir: String,
        /// The errno.
        err: std::io::Error,
    },
    /// A cgroup made again at restore could not be given a recorded
    /// setting, owner or mode.
    #[error(
        "cgroup {dir} was gone and was made again, but setting its {what} failed: {err}; \
         make that cgroup by hand as it was, or restore under another cgroup with \
         --cgroup-root [CONTROLLER:]PATH"
    )]
    CgroupSetting {
        /// The cgroup's directory.
        dir: String,
        /// The setting (`memory.max = 1G`), or the owner or mode of a file.
        what: String,
        /// The errno.
        err: std::io::Error,
    },
    /// A TCP connection cannot be rebuilt: one with the same addresses
    /// exists on this host and did not go away.
    #[error(
        "the TCP connection {local} -> {peer} already exists on this host (the checkpointed \
         process, or another process restored from the same image, still has it): stop that \
         process and restore again"
    )]
    ConnectionExists {
        /// The connection's local address.
        local: String,
        /// Its peer.
        peer: String,
    },
    /// A socket cannot be bound again: its address is taken on this host
    /// and was not let go.
    #[error(
        "address {address}, which the process had bound, is in use on this host (by the \
         checkpointed process, another process restored from the same image, or something \
         else): stop what holds it and restore again"
    )]
    AddressInUse {
        /// The address.
        address: String,
    },
    /// An injected syscall failed.
    #[error("building the process: {call} failed: {err}")]
    Syscall {
        /// The syscall and its arguments.
        call: String,
        /// The errno.
        err: std::io::Error,
    },
}

impl RestoreError {
    /// This error, as one of restoring process `pid` (once: an error that
    /// names its process already is left as it is).
    pub fn in_process(self, pid: i32) -> Self {
        match self {
            e @ (Self::Process { .. } | Self::PidInUse { .. }) => e,
            e => Self::Process {
                pid,
                source: Box::new(e),
            },
        }
    }

    /// A [`RestoreError::Stub`].
    pub fn stub(what: impl Into<String>) -> Self {
        Self::Stub { what: what.into() }
    }
}
