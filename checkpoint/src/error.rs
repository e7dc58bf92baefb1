//! Why a checkpoint failed.

use cr_ebpf_image::ImageError;
use cr_ebpf_tracee::TraceError;

/// Why a dump failed. The process is running again (never left stopped or
/// killed by a failure), and no image was published.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Freezing or inspecting with ptrace failed.
    #[error("freezing or inspecting process {pid}")]
    Trace {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// Reading /proc failed.
    #[error("reading {path} of process {pid}")]
    Proc {
        /// The process.
        pid: i32,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("writing the image")]
    Image(#[from] ImageError),
    /// The process cannot be checkpointed by this version.
    #[error("not supported: {what} in process {pid}")]
    NotSupported {
        /// The process.
        pid: i32,
        /// What.
        what: String,
    },
    /// A descriptor of the process cannot be checkpointed by this version.
    #[error("not supported: {what} on fd {fd} of pid {pid}")]
    NotSupportedFd {
        /// The process.
        pid: i32,
        /// The descriptor.
        fd: i32,
        /// What it is.
        what: String,
    },
    /// The network lock could not be made (the process runs on).
    #[error("locking the TCP connections of process {pid} (a network lock keeps their peers from getting a reset while it is down; `dump --leave-running` needs none, `--network-lock skip` takes none): {what}")]
    NetworkLock {
        /// The process.
        pid: i32,
        /// What went wrong.
        what: String,
    },
}

impl From<cr_ebpf_resources::SaveError> for DumpError {
    fn from(e: cr_ebpf_resources::SaveError) -> Self {
        use cr_ebpf_resources::SaveError as S;
        match e {
            S::Trace { pid, source } => Self::Trace { pid, source },
            S::Proc { pid, path, source } => Self::Proc { pid, path, source },
            S::NotSupported { pid, what } => Self::NotSupported { pid, what },
            S::NotSupportedFd { pid, fd, what } => Self::NotSupportedFd { pid, fd, what },
        }
    }
}

/// A freezing failure as a dump error: a thread that already has a
/// tracer is a refusal (the process runs on, untouched).
pub(crate) fn trace_err(pid: i32, source: TraceError) -> DumpError {
    match source {
        TraceError::Traced { tid, tracer } => DumpError::NotSupported {
            pid,
            what: format!(
                "a traced thread ({tid}, traced by process {tracer}: a debugger, strace, \
                 or ptrace between processes): a thread has only one tracer; detach it first"
            ),
        },
        source => DumpError::Trace { pid, source },
    }
}

/// A failure to list the pages of a mapping: what the image cannot carry
/// (guard pages) is a refusal.
pub(crate) fn runs_err(pid: i32) -> impl FnOnce(std::io::Error) -> DumpError {
    move |source| {
        if source.kind() == std::io::ErrorKind::Unsupported {
            DumpError::NotSupported {
                pid,
                what: source.to_string(),
            }
        } else {
            DumpError::Proc {
                pid,
                path: format!("/proc/{pid}/pagemap"),
                source,
            }
        }
    }
}

pub(crate) fn proc_err(pid: i32, path: String) -> impl FnOnce(std::io::Error) -> DumpError {
    move |source| DumpError::Proc { pid, path, source }
}
