//! Errors of ptrace operations.

/// A ptrace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A ptrace request failed.
    #[error("ptrace {request} on thread {tid} failed")]
    Ptrace {
        /// The request.
        request: &'static str,
        /// The thread.
        tid: i32,
        /// The kernel's answer.
        #[source]
        source: nix::Error,
    },
    /// Waiting for a thread failed or it did something unexpected.
    #[error("thread {tid}: {what}")]
    Unexpected {
        /// The thread.
        tid: i32,
        /// What happened.
        what: String,
    },
    /// A thread already has a tracer (a debugger, strace, or a process
    /// that traces another with ptrace): it cannot have a second one.
    #[error(
        "thread {tid} is traced by process {tracer} (a debugger, strace, or ptrace \
         between processes)"
    )]
    Traced {
        /// The thread.
        tid: i32,
        /// Its tracer.
        tracer: i32,
    },
    /// The process went away.
    #[error("process {pid} exited while being frozen or inspected")]
    Gone {
        /// The process.
        pid: i32,
    },
    /// The process does not exist.
    #[error("no process with pid {pid}: check the pid (`ps -p {pid}`)")]
    NoSuchProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// Reading or writing memory of the process failed.
    #[error("{op} {len} bytes at {addr:#x} in process {pid} failed")]
    Memory {
        /// `reading` or `writing`.
        op: &'static str,
        /// The process.
        pid: i32,
        /// Address.
        addr: u64,
        /// Length.
        len: usize,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Reading /proc failed.
    #[error("reading {path}")]
    Proc {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
