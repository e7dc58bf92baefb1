//! x86_64 syscall numbers of the resource-changing syscalls cr-ebpf logs.
//!
//! [`RESOURCE_SYSCALLS`] is the default filter the loader writes into the
//! `SYSCALL_FILTER` bitmap: every syscall that changes something a checkpoint
//! records (memory layout, file descriptors, process tree, signal disposition,
//! per-thread kernel state).

macro_rules! syscalls {
    ($($name:ident = $nr:literal => $text:literal),* $(,)?) => {
        $(
            #[doc = concat!("`", $text, "` (x86_64).")]
            pub const $name: u32 = $nr;
        )*
        /// `(number, name)` of every syscall in this module.
        pub const NAMES: &[(u32, &str)] = &[$(($nr, $text)),*];
    };
}

syscalls! {
    OPEN = 2 => "open",
    CLOSE = 3 => "close",
    LSEEK = 8 => "lseek",
    MMAP = 9 => "mmap",
    MPROTECT = 10 => "mprotect",
    MUNMAP = 11 => "munmap",
    BRK = 12 => "brk",
    RT_SIGACTION = 13 => "rt_sigaction",
    MREMAP = 25 => "mremap",
    MADVISE = 28 => "madvise",
    SHMAT = 30 => "shmat",
    DUP = 32 => "dup",
    DUP2 = 33 => "dup2",
    ALARM = 37 => "alarm",
    SETITIMER = 38 => "setitimer",
    TIMER_CREATE = 222 => "timer_create",
    TIMER_SETTIME = 223 => "timer_settime",
    TIMER_DELETE = 226 => "timer_delete",
    SOCKET = 41 => "socket",
    CONNECT = 42 => "connect",
    ACCEPT = 43 => "accept",
    BIND = 49 => "bind",
    LISTEN = 50 => "listen",
    SOCKETPAIR = 53 => "socketpair",
    CLONE = 56 => "clone",
    FORK = 57 => "fork",
    VFORK = 58 => "vfork",
    EXECVE = 59 => "execve",
    EXIT = 60 => "exit",
    SHMDT = 67 => "shmdt",
    FCNTL = 72 => "fcntl",
    CHDIR = 80 => "chdir",
    FCHDIR = 81 => "fchdir",
    CREAT = 85 => "creat",
    UMASK = 95 => "umask",
    SETPGID = 109 => "setpgid",
    SETSID = 112 => "setsid",
    SIGALTSTACK = 131 => "sigaltstack",
    PERSONALITY = 135 => "personality",
    PRCTL = 157 => "prctl",
    ARCH_PRCTL = 158 => "arch_prctl",
    SETRLIMIT = 160 => "setrlimit",
    SET_TID_ADDRESS = 218 => "set_tid_address",
    EXIT_GROUP = 231 => "exit_group",
    OPENAT = 257 => "openat",
    SIGNALFD4 = 289 => "signalfd4",
    TIMERFD_CREATE = 283 => "timerfd_create",
    EVENTFD2 = 290 => "eventfd2",
    EPOLL_CREATE1 = 291 => "epoll_create1",
    DUP3 = 292 => "dup3",
    PIPE2 = 293 => "pipe2",
    ACCEPT4 = 288 => "accept4",
    SET_ROBUST_LIST = 273 => "set_robust_list",
    PRLIMIT64 = 302 => "prlimit64",
    EXECVEAT = 322 => "execveat",
    USERFAULTFD = 323 => "userfaultfd",
    MEMBARRIER = 324 => "membarrier",
    MEMFD_CREATE = 319 => "memfd_create",
    RSEQ = 334 => "rseq",
    CLONE3 = 435 => "clone3",
    CLOSE_RANGE = 436 => "close_range",
    OPENAT2 = 437 => "openat2",
    PIPE = 22 => "pipe",
    MLOCK = 149 => "mlock",
    MUNLOCK = 150 => "munlock",
    MLOCKALL = 151 => "mlockall",
    MUNLOCKALL = 152 => "munlockall",
    MLOCK2 = 325 => "mlock2",
    MSEAL = 462 => "mseal",
}

/// The syscalls logged by default.
pub const RESOURCE_SYSCALLS: &[u32] = &[
    MMAP,
    MUNMAP,
    MREMAP,
    MPROTECT,
    BRK,
    MADVISE,
    MLOCK,
    MUNLOCK,
    MLOCKALL,
    MUNLOCKALL,
    MLOCK2,
    MSEAL,
    SHMAT,
    SHMDT,
    OPEN,
    OPENAT,
    OPENAT2,
    CREAT,
    CLOSE,
    CLOSE_RANGE,
    DUP,
    DUP2,
    DUP3,
    FCNTL,
    LSEEK,
    PIPE,
    PIPE2,
    SOCKET,
    SOCKETPAIR,
    ACCEPT,
    ACCEPT4,
    BIND,
    LISTEN,
    CONNECT,
    EVENTFD2,
    EPOLL_CREATE1,
    TIMERFD_CREATE,
    SIGNALFD4,
    MEMFD_CREATE,
    USERFAULTFD,
    CLONE,
    CLONE3,
    FORK,
    VFORK,
    EXECVE,
    EXECVEAT,
    EXIT,
    EXIT_GROUP,
    RT_SIGACTION,
    SIGALTSTACK,
    ALARM,
    SETITIMER,
    TIMER_CREATE,
    TIMER_SETTIME,
    TIMER_DELETE,
    SETSID,
    SETPGID,
    CHDIR,
    FCHDIR,
    UMASK,
    PRCTL,
    MEMBARRIER,
    SETRLIMIT,
    PRLIMIT64,
    SET_TID_ADDRESS,
    SET_ROBUST_LIST,
    RSEQ,
    ARCH_PRCTL,
    PERSONALITY,
];

/// Name of syscall `nr`, if it is one of those this module knows.
pub fn name(nr: u32) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// Which argument (0-based) of syscall `nr` is a user path or name string
/// that the eBPF side captures.
pub const fn path_arg(nr: u32) -> Option<usize> {
    match nr {
        OPEN | CREAT | CHDIR | MEMFD_CREATE => Some(0),
        OPENAT | OPENAT2 => Some(1),
        _ => None,
    }
}

/// True for syscalls that do not return to the caller when they succeed;
/// their event is emitted at entry.
pub const fn no_return(nr: u32) -> bool {
    matches!(nr, EXIT | EXIT_GROUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_syscall_has_a_name_and_fits_the_bitmap() {
        for &nr in RESOURCE_SYSCALLS {
            assert!(name(nr).is_some(), "syscall {nr} has no name");
            assert!((nr as usize) < crate::SYSCALL_FILTER_BITS);
        }
    }

    #[test]
    fn numbers_are_unique() {
        for (i, (a, an)) in NAMES.iter().enumerate() {
            for (b, bn) in &NAMES[i + 1..] {
                assert_ne!(a, b, "{an} and {bn} share a number");
            }
        }
    }
}
