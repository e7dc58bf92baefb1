//! ptrace control of live processes: freeze every thread of a process
//! without ever leaving it stopped or killed by our failure, read and write
//! registers, and make a stopped thread execute syscalls on our behalf.
//!
//! * [`Tracee`]: one seized thread.
//! * [`Frozen`]: every thread of a process, stopped; dropping it lets the
//!   process run again. No `PTRACE_O_EXITKILL`: if cr-ebpf dies, the kernel
//!   detaches and the process keeps running.
//! * [`Tracee::inject_syscall`]: run one syscall in the tracee, through a
//!   `syscall` instruction at a known address in its memory.

mod error;
mod frozen;
mod guarded;
mod inject;
mod reaped;
pub mod regs;
mod sys;
mod thread;

pub use error::TraceError;
pub use frozen::Frozen;
pub use guarded::Step;
pub use inject::{Injector, SCRATCH_MAX};
pub use reaped::{take_reaped, Ending};
pub use regs::Regs;
pub use thread::{can_suspend_seccomp, Rseq, StopKind, Tracee};

/// Reads `len` bytes at `addr` in process `pid` into `buf`.
pub use sys::{fork_with_pid, read_memory, write_memory, Mem};
