//! Types shared by the cr-ebpf eBPF programs (`ebpf/`) and userspace (`loader/`).
//!
//! Everything here is `#[repr(C)]` with explicit integer fields and explicit
//! padding, so the kernel side and the user side agree byte for byte.
//!
//! # Event stream layout (ABI version [`EVENT_ABI_VERSION`])
//!
//! Every record in the `EVENTS` ring buffer starts with an [`EventHeader`].
//! `header.kind` says which record follows ([`EventKind`]); `header.size` is the
//! size of the whole record. Readers must reject a record whose `abi` is not
//! the version they were built for, whose kind is unknown, or whose size does not
//! match the kind: never guess.
//!
//! | kind        | record            | emitted by                                   |
//! |-------------|-------------------|----------------------------------------------|
//! | `Syscall`   | [`SyscallEvent`]  | raw tracepoint `sys_exit` (or `sys_enter` for calls that do not return) |
//! | `Fault`     | [`FaultEvent`]    | raw tracepoints `page_fault_user`, `page_fault_kernel` (write faults only) |
//! | `Fork`      | [`ForkEvent`]     | `sched/sched_process_fork`                   |
//! | `Exit`      | [`ExitEvent`]     | `sched/sched_process_exit`                   |
//! | `Exec`      | [`ExecEvent`]     | `sched/sched_process_exec`                   |
//!
//! Events of one thread reach the ring buffer in the order that thread caused
//! them. Events of different threads are ordered only by `ts_ns`.
#![no_std]

pub mod netlock;
pub mod syscalls;

/// Version of the event record layout. Bump on any change to a record.
pub const EVENT_ABI_VERSION: u16 = 1;

/// Bytes of a path argument or exec filename captured with an event
/// (including the terminating NUL). Longer paths are truncated and flagged.
pub const PATH_CAPTURE: usize = 256;

/// Number of syscall numbers the filter bitmap covers.
pub const SYSCALL_FILTER_BITS: usize = 512;
/// Number of `u64` words in the [`SYSCALL_FILTER`](crate) bitmap map.
pub const SYSCALL_FILTER_WORDS: u32 = (SYSCALL_FILTER_BITS / 64) as u32;

/// Names of the maps in the eBPF object, so both sides agree.
pub mod map_names {
    /// `HashMap<u32 tgid, TrackedProcess>`: the processes whose events are logged.
    pub const TRACKED: &str = "TRACKED";
    /// `Array<u64>` of [`super::SYSCALL_FILTER_WORDS`] words: bit `nr` set = log syscall `nr`.
    pub const SYSCALL_FILTER: &str = "SYSCALL_FILTER";
    /// `Array<Config>` with one entry.
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<u32 tid, PendingSyscall>`: syscalls entered and not yet returned.
    pub const PENDING: &str = "PENDING";
    /// Ring buffer of event records.
    pub const EVENTS: &str = "EVENTS";
    /// `HashMap<u32 tgid, LossCounter>`: events lost per process, kept after it exits.
    pub const LOSSES: &str = "LOSSES";
    /// `PerCpuArray<u64>` with one entry: losses that could not be attributed to a process.
    pub const UNATTRIBUTED_LOSSES: &str = "UNATTRIBUTED_LOSSES";
    /// `PerCpuArray<u64>` with one entry: fault records lost. Faults are a
    /// hint (the dirty tracker's scan is the truth), so losing them does not
    /// make a checkpoint re-collect anything and is counted apart.
    pub const FAULT_LOSSES: &str = "FAULT_LOSSES";
}

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A raw tracepoint: the tracepoint's C arguments, no formatted record
    /// (cheapest; used on the hot syscall and fault paths).
    Raw,
    /// A classic tracepoint: the formatted record described in tracefs.
    TracePoint,
}

/// One program of the eBPF object and the tracepoint it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct ProgramSpec {
    /// Function name in the object.
    pub name: &'static str,
    /// Tracepoint category (the tracefs directory).
    pub category: &'static str,
    /// Tracepoint name.
    pub tracepoint: &'static str,
    /// How it attaches.
    pub attach: Attach,
}

const fn spec(
    name: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    attach: Attach,
) -> ProgramSpec {
    ProgramSpec {
        name,
        category,
        tracepoint,
        attach,
    }
}

/// Every program in the eBPF object.
pub const PROGRAMS: [ProgramSpec; 7] = [
    spec("sys_enter", "raw_syscalls", "sys_enter", Attach::Raw),
    spec("sys_exit", "raw_syscalls", "sys_exit", Attach::Raw),
    spec(
        "page_fault_user",
        "exceptions",
        "page_fault_user",
        Attach::Raw,
    ),
    spec(
        "page_fault_kernel",
        "exceptions",
        "page_fault_kernel",
        Attach::Raw,
    ),
    spec(
        "sched_process_fork",
        "sched",
        "sched_process_fork",
        Attach::TracePoint,
    ),
    spec(
        "sched_process_exit",
        "sched",
        "sched_process_exit",
        Attach::TracePoint,
    ),
    spec(
        "sched_process_exec",
        "sched",
        "sched_process_exec",
        Attach::TracePoint,
    ),
];

/// Kind of an event record. `0` is never valid.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Not an event; decoding it is an error.
    Invalid = 0,
    /// A completed resource-changing syscall ([`SyscallEvent`]).
    Syscall = 1,
    /// A write fault on a user address ([`FaultEvent`]).
    Fault = 2,
    /// A new thread or process ([`ForkEvent`]).
    Fork = 3,
    /// A thread exited ([`ExitEvent`]).
    Exit = 4,
    /// A successful exec ([`ExecEvent`]).
    Exec = 5,
}

impl TryFrom<u16> for EventKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Syscall,
            2 => Self::Fault,
            3 => Self::Fork,
            4 => Self::Exit,
            5 => Self::Exec,
            other => return Err(other),
        })
    }
}

/// Common first part of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EVENT_ABI_VERSION`] of the program that wrote the record.
    pub abi: u16,
    /// An [`EventKind`] value.
    pub kind: u16,
    /// Size of the whole record in bytes.
    pub size: u32,
    /// Process (thread group) id, as seen from the initial pid namespace.
    pub tgid: u32,
    /// Thread id, as seen from the initial pid namespace.
    pub tid: u32,
    /// `CLOCK_MONOTONIC` nanoseconds when the event completed.
    pub ts_ns: u64,
}

/// `SyscallEvent::flags`: the syscall does not return (exit, exit_group);
/// the event was emitted at entry and `ret` is meaningless.
pub const SYSCALL_F_NO_RETURN: u32 = 1;
/// `SyscallEvent::flags`: `path` holds the syscall's path or name argument.
pub const SYSCALL_F_PATH: u32 = 2;
/// `SyscallEvent::flags`: the path did not fit in [`PATH_CAPTURE`] bytes.
pub const SYSCALL_F_PATH_TRUNCATED: u32 = 4;
/// `SyscallEvent::flags`: the path could not be read from user memory.
pub const SYSCALL_F_PATH_FAULT: u32 = 8;

/// A completed resource-changing syscall.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SyscallEvent {
    /// Common header; `kind == Syscall`.
    pub header: EventHeader,
    /// Syscall number (x86_64).
    pub nr: u32,
    /// `SYSCALL_F_*` bits.
    pub flags: u32,
    /// Raw arguments as passed at entry.
    pub args: [u64; 6],
    /// Return value (negative errno on failure).
    pub ret: i64,
    /// `CLOCK_MONOTONIC` nanoseconds at entry.
    pub enter_ns: u64,
    /// Valid bytes in `path` (without the NUL) when `SYSCALL_F_PATH` is set.
    pub path_len: u32,
    /// Padding; zero.
    pub _pad: u32,
    /// Path (open*, creat, chdir) or name (memfd_create) argument, NUL-terminated.
    pub path: [u8; PATH_CAPTURE],
}

/// `FaultEvent::flags`: the fault was taken in kernel mode (a uaccess write on
/// behalf of the process, e.g. `read()` into a fresh page).
pub const FAULT_F_KERNEL: u32 = 1;

/// A write fault on a user address of a tracked process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultEvent {
    /// Common header; `kind == Fault`.
    pub header: EventHeader,
    /// Faulting address (not page-aligned).
    pub address: u64,
    /// Instruction pointer at the fault.
    pub ip: u64,
    /// x86 page-fault error code (bit 0 present, bit 1 write, bit 2 user, ...).
    pub error_code: u64,
    /// `FAULT_F_*` bits.
    pub flags: u32,
    /// Padding; zero.
    pub _pad: u32,
}

/// `ForkEvent::flags`: the child is a thread of the parent's process.
pub const FORK_F_THREAD: u32 = 1;
/// `ForkEvent::flags`: the clone flags were not seen at syscall entry
/// (the child was created without a tracked clone syscall); `clone_flags` is 0.
pub const FORK_F_FLAGS_UNKNOWN: u32 = 2;

/// A tracked thread created a thread or process. The header names the parent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForkEvent {
    /// Common header; `kind == Fork`; `tgid`/`tid` are the parent's.
    pub header: EventHeader,
    /// Thread id of the child.
    pub child_tid: u32,
    /// Process id of the child (the parent's `tgid` for a thread).
    pub child_tgid: u32,
    /// Clone flags of the creating syscall (see `FORK_F_FLAGS_UNKNOWN`).
    pub clone_flags: u64,
    /// `FORK_F_*` bits.
    pub flags: u32,
    /// Padding; zero.
    pub _pad: u32,
}

/// `ExitEvent::flags`: this was the last thread; the process is gone from the tracked set.
pub const EXIT_F_GROUP_DEAD: u32 = 1;
/// `ExitEvent::flags`: the kernel does not say whether the group is dead
/// (older `sched_process_exit` layout); userspace must check.
pub const EXIT_F_GROUP_UNKNOWN: u32 = 2;

/// A tracked thread exited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    /// Common header; `kind == Exit`.
    pub header: EventHeader,
    /// `EXIT_F_*` bits.
    pub flags: u32,
    /// Padding; zero.
    pub _pad: u32,
}

/// `ExecEvent::flags`: the filename did not fit in [`PATH_CAPTURE`] bytes.
pub const EXEC_F_TRUNCATED: u32 = 1;

/// A tracked process executed a new program. `header.tid` is the thread that
/// now leads the process; `old_tid` is the thread that called exec.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    /// Common header; `kind == Exec`.
    pub header: EventHeader,
    /// Thread id that called exec (differs from `header.tid` when a non-leader thread execs).
    pub old_tid: u32,
    /// `EXEC_F_*` bits.
    pub flags: u32,
    /// Valid bytes in `filename` (without the NUL).
    pub filename_len: u32,
    /// Padding; zero.
    pub _pad: u32,
    /// Path of the new program, NUL-terminated.
    pub filename: [u8; PATH_CAPTURE],
}

/// Value of the `TRACKED` map: one per tracked process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedProcess {
    /// The tgid whose tracking brought this process in (itself for a root).
    pub root_tgid: u32,
    /// Reserved; zero.
    pub flags: u32,
}

/// Value of the `LOSSES` map: events of one process that did not fit in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounter {
    /// Records that could not be reserved.
    pub dropped: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the first loss not yet acknowledged.
    pub first_ns: u64,
}

/// Value of the `PENDING` map: a syscall between entry and exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyscall {
    /// Syscall number.
    pub nr: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at entry.
    pub enter_ns: u64,
    /// Raw arguments.
    pub args: [u64; 6],
    /// For clone3: the `flags` word of `struct clone_args`, read at entry.
    pub clone_flags: u64,
}

/// `Config::flags`: log write faults taken in user mode.
pub const CONFIG_F_USER_FAULTS: u32 = 1;
/// `Config::flags`: log write faults taken in kernel mode on user addresses.
pub const CONFIG_F_KERNEL_FAULTS: u32 = 2;

/// Offset value meaning "this field does not exist on this kernel".
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Value of the `CONFIG` map (one entry), written by the loader before attaching.
///
/// The `sched_*` tracepoint layouts changed across kernel versions, so their
/// field offsets are read from tracefs by the loader, not compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Offset of `child_pid` in `sched_process_fork`.
    pub fork_child_pid: u32,
    /// Offset of `group_dead` in `sched_process_exit`, or [`FIELD_ABSENT`].
    pub exit_group_dead: u32,
    /// Offset of `old_pid` in `sched_process_exec`.
    pub exec_old_pid: u32,
    /// Offset of the `__data_loc` word of `filename` in `sched_process_exec`.
    pub exec_filename: u32,
    /// Padding; zero.
    pub _pad: u32,
}

impl Default for Config {
    /// The layout of kernel 6.18 with user and kernel write faults logged.
    fn default() -> Self {
        Self {
            flags: CONFIG_F_USER_FAULTS | CONFIG_F_KERNEL_FAULTS,
            fork_child_pid: 20,
            exit_group_dead: 32,
            exec_old_pid: 16,
            exec_filename: 8,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and arrays of
    // integers, have explicit padding fields, and every bit pattern is valid.
    unsafe impl aya::Pod for super::TrackedProcess {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LossCounter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingSyscall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: #[repr(C)], byte arrays and two u16s (36 bytes, no padding).
    unsafe impl aya::Pod for super::netlock::NetLockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn record_sizes_are_stable() {
        // Changing any of these is an ABI change: bump EVENT_ABI_VERSION.
        assert_eq!(size_of::<EventHeader>(), 24);
        assert_eq!(
            size_of::<SyscallEvent>(),
            24 + 8 + 48 + 8 + 8 + 8 + PATH_CAPTURE
        );
        assert_eq!(size_of::<FaultEvent>(), 24 + 32);
        assert_eq!(size_of::<ForkEvent>(), 24 + 24);
        assert_eq!(size_of::<ExitEvent>(), 24 + 8);
        assert_eq!(size_of::<ExecEvent>(), 24 + 16 + PATH_CAPTURE);
        assert_eq!(size_of::<PendingSyscall>(), 8 * 9);
        assert_eq!(size_of::<Config>(), 24);
    }

    #[test]
    fn unknown_kinds_are_errors() {
        assert_eq!(EventKind::try_from(0), Err(0));
        assert_eq!(EventKind::try_from(6), Err(6));
        assert_eq!(EventKind::try_from(3), Ok(EventKind::Fork));
    }
}
