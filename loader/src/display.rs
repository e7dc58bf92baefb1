//! Human-readable rendering of events, in the spirit of strace.

use std::fmt::{self, Write as _};

use cr_ebpf_common::syscalls as nr;

use crate::event::{CapturedString, Event, Syscall};

/// How one argument is shown.
#[derive(Clone, Copy)]
enum Arg {
    Int,
    Hex,
    Fd,
    DirFd,
    Path,
    Prot,
    MapFlags,
    OpenFlags,
    Mode,
    Signal,
    Advice,
}

fn arg_kinds(nr: u32) -> &'static [Arg] {
    use Arg::*;
    match nr {
        nr::MMAP => &[Hex, Int, Prot, MapFlags, Fd, Int],
        nr::MUNMAP => &[Hex, Int],
        nr::MREMAP => &[Hex, Int, Int, Hex, Hex],
        nr::MPROTECT => &[Hex, Int, Prot],
        nr::MADVISE => &[Hex, Int, Advice],
        nr::BRK => &[Hex],
        nr::OPEN => &[Path, OpenFlags, Mode],
        nr::OPENAT => &[DirFd, Path, OpenFlags, Mode],
        nr::OPENAT2 => &[DirFd, Path, Hex, Int],
        nr::CREAT => &[Path, Mode],
        nr::CLOSE | nr::DUP | nr::FCHDIR => &[Fd],
        nr::CLOSE_RANGE => &[Fd, Fd, Hex],
        nr::DUP2 => &[Fd, Fd],
        nr::DUP3 => &[Fd, Fd, OpenFlags],
        nr::FCNTL => &[Fd, Int, Hex],
        nr::LSEEK => &[Fd, Int, Int],
        nr::PIPE => &[Hex],
        nr::PIPE2 => &[Hex, OpenFlags],
        nr::SOCKET => &[Int, Hex, Int],
        nr::SOCKETPAIR => &[Int, Hex, Int, Hex],
        nr::ACCEPT => &[Fd, Hex, Hex],
        nr::ACCEPT4 => &[Fd, Hex, Hex, Hex],
        nr::BIND | nr::CONNECT => &[Fd, Hex, Int],
        nr::LISTEN => &[Fd, Int],
        nr::EVENTFD2 => &[Int, Hex],
        nr::EPOLL_CREATE1 => &[Hex],
        nr::TIMERFD_CREATE => &[Int, Hex],
        nr::SIGNALFD4 => &[Fd, Hex, Int, Hex],
        nr::MEMFD_CREATE => &[Path, Hex],
        nr::USERFAULTFD => &[Hex],
        nr::CLONE => &[Hex, Hex, Hex, Hex, Hex],
        nr::CLONE3 => &[Hex, Int],
        nr::FORK | nr::VFORK | nr::SETSID => &[],
        nr::EXECVE => &[Hex, Hex, Hex],
        nr::EXECVEAT => &[DirFd, Hex, Hex, Hex, Hex],
        nr::EXIT | nr::EXIT_GROUP => &[Int],
        nr::RT_SIGACTION => &[Signal, Hex, Hex, Int],
        nr::SIGALTSTACK => &[Hex, Hex],
        nr::SETPGID => &[Int, Int],
        nr::CHDIR => &[Path],
        nr::UMASK => &[Mode],
        nr::PRCTL => &[Int, Hex, Hex, Hex, Hex],
        nr::SETRLIMIT => &[Int, Hex],
        nr::PRLIMIT64 => &[Int, Int, Hex, Hex],
        nr::SET_TID_ADDRESS => &[Hex],
        nr::SET_ROBUST_LIST => &[Hex, Int],
        nr::RSEQ => &[Hex, Int, Hex, Hex],
        nr::ARCH_PRCTL => &[Hex, Hex],
        nr::PERSONALITY => &[Hex],
        nr::SHMAT => &[Int, Hex, Hex],
        nr::SHMDT => &[Hex],
        _ => &[Hex, Hex, Hex, Hex, Hex, Hex],
    }
}

fn flags(out: &mut String, value: u64, names: &[(u64, &str)], zero: &str) {
    if value == 0 {
        out.push_str(zero);
        return;
    }
    let mut rest = value;
    let mut first = true;
    for &(bit, name) in names {
        if bit != 0 && rest & bit == bit {
            if !first {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bit;
            first = false;
        }
    }
    if rest != 0 {
        if !first {
            out.push('|');
        }
        let _ = write!(out, "{rest:#x}");
    }
}

const PROT: &[(u64, &str)] = &[(1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC")];
const MAP: &[(u64, &str)] = &[
    (0x01, "MAP_SHARED"),
    (0x02, "MAP_PRIVATE"),
    (0x10, "MAP_FIXED"),
    (0x20, "MAP_ANONYMOUS"),
    (0x100, "MAP_GROWSDOWN"),
    (0x800, "MAP_DENYWRITE"),
    (0x1000, "MAP_EXECUTABLE"),
    (0x2000, "MAP_LOCKED"),
    (0x4000, "MAP_NORESERVE"),
    (0x8000, "MAP_POPULATE"),
    (0x20000, "MAP_STACK"),
    (0x100000, "MAP_FIXED_NOREPLACE"),
];
const OPEN_FLAGS: &[(u64, &str)] = &[
    (0o100, "O_CREAT"),
    (0o200, "O_EXCL"),
    (0o1000, "O_TRUNC"),
    (0o2000, "O_APPEND"),
    (0o4000, "O_NONBLOCK"),
    (0o200000, "O_DIRECTORY"),
    (0o400000, "O_NOFOLLOW"),
    (0o2000000, "O_CLOEXEC"),
    (0o10000000, "O_PATH"),
    (0o20000000 | 0o200000, "O_TMPFILE"),
];

fn open_flags(out: &mut String, v: u64) {
    out.push_str(match v & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    });
    let rest = v & !3;
    if rest != 0 {
        out.push('|');
        flags(out, rest, OPEN_FLAGS, "");
    }
}

fn advice(v: u64) -> String {
    match v {
        0 => "MADV_NORMAL".into(),
        4 => "MADV_DONTNEED".into(),
        8 => "MADV_FREE".into(),
        9 => "MADV_REMOVE".into(),
        10 => "MADV_DONTFORK".into(),
        11 => "MADV_DOFORK".into(),
        14 => "MADV_HUGEPAGE".into(),
        15 => "MADV_NOHUGEPAGE".into(),
        16 => "MADV_DONTDUMP".into(),
        18 => "MADV_WIPEONFORK".into(),
        _ => v.to_string(),
    }
}

fn signal(v: u64) -> String {
    const NAMES: [&str; 32] = [
        "0",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get(v as usize) {
        Some(n) => (*n).to_string(),
        None => format!("SIGRT{}", v.saturating_sub(32)),
    }
}

fn quoted(out: &mut String, s: &CapturedString) {
    if s.unreadable {
        out.push_str("<unreadable>");
        return;
    }
    let _ = write!(out, "{:?}", s.text);
    if s.truncated {
        out.push_str("...");
    }
}

/// Renders a syscall as `name(args) = ret`.
pub fn syscall_line(s: &Syscall) -> String {
    let mut out = String::new();
    match s.name {
        Some(name) => out.push_str(name),
        None => {
            let _ = write!(out, "syscall_{}", s.nr);
        }
    }
    out.push('(');
    for (i, kind) in arg_kinds(s.nr).iter().enumerate() {
        let v = s.args[i];
        if i > 0 {
            out.push_str(", ");
        }
        match kind {
            Arg::Int => {
                let _ = write!(out, "{}", v as i64);
            }
            Arg::Hex if v == 0 => out.push_str("NULL"),
            Arg::Hex => {
                let _ = write!(out, "{v:#x}");
            }
            Arg::Fd => {
                let _ = write!(out, "{}", v as i32);
            }
            Arg::DirFd if v as i32 == -100 => out.push_str("AT_FDCWD"),
            Arg::DirFd => {
                let _ = write!(out, "{}", v as i32);
            }
            Arg::Path => match &s.path {
                Some(p) => quoted(&mut out, p),
                None => {
                    let _ = write!(out, "{v:#x}");
                }
            },
            Arg::Prot => flags(&mut out, v, PROT, "PROT_NONE"),
            Arg::MapFlags => flags(&mut out, v, MAP, "0"),
            Arg::OpenFlags => open_flags(&mut out, v),
            Arg::Mode => {
                let _ = write!(out, "{v:#o}");
            }
            Arg::Signal => out.push_str(&signal(v)),
            Arg::Advice => out.push_str(&advice(v)),
        }
    }
    out.push(')');
    match s.ret {
        None => out.push_str(" = ?"),
        Some(r) if (-4095..0).contains(&r) => {
            let err = std::io::Error::from_raw_os_error(-r as i32);
            let text = err.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            let _ = write!(out, " = -1 errno {} ({text})", -r);
        }
        Some(r) if matches!(s.nr, nr::MMAP | nr::MREMAP | nr::BRK | nr::SHMAT) => {
            let _ = write!(out, " = {:#x}", r as u64);
        }
        Some(r) => {
            let _ = write!(out, " = {r}");
        }
    }
    out
}

/// Renders the part of an event after who/when.
pub fn describe(event: &Event) -> String {
    match event {
        Event::Syscall(s) => syscall_line(s),
        Event::Fault(f) => {
            let what = if f.protection() {
                "write to present page"
            } else {
                "first write"
            };
            let by = if f.kernel { ", by the kernel" } else { "" };
            format!(
                "write-fault page {:#x} (addr {:#x}, {what}{by}, ip {:#x})",
                f.page(),
                f.address,
                f.ip
            )
        }
        Event::Fork(f) if f.thread => format!("new thread {}", f.child_tid),
        Event::Fork(f) => {
            let flags = match f.clone_flags {
                Some(fl) => format!("clone flags {fl:#x}"),
                None => "clone flags unknown".into(),
            };
            format!("new process {} ({flags}), now tracked", f.child_tgid)
        }
        Event::Exit(e) => match e.group_dead {
            Some(true) => "exit: last thread, process gone".into(),
            Some(false) => "thread exit".into(),
            None => "thread exit (group state unknown)".into(),
        },
        Event::Exec(e) => {
            let mut out = String::from("exec ");
            quoted(&mut out, &e.filename);
            if e.old_tid != e.origin.tid {
                let _ = write!(out, " (called by thread {})", e.old_tid);
            }
            out
        }
    }
}

/// An event with a time origin, for a log line: `  0.001234 1234/1235  openat(...) = 3`.
pub struct Line<'a> {
    /// The event.
    pub event: &'a Event,
    /// `CLOCK_MONOTONIC` nanoseconds shown as time zero.
    pub start_ns: u64,
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.event.origin();
        let t = o.ts_ns.saturating_sub(self.start_ns);
        let who = if o.tid == o.tgid {
            format!("{}", o.tgid)
        } else {
            format!("{}/{}", o.tgid, o.tid)
        };
        write!(
            f,
            "{:>4}.{:06} {who:>13}  {}",
            t / 1_000_000_000,
            (t % 1_000_000_000) / 1000,
            describe(self.event)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Origin;

    fn sc(nr: u32, args: [u64; 6], ret: Option<i64>, path: Option<&str>) -> Syscall {
        Syscall {
            origin: Origin {
                tgid: 1,
                tid: 1,
                ts_ns: 0,
            },
            nr,
            name: cr_ebpf_common::syscalls::name(nr),
            args,
            ret,
            enter_ns: 0,
            path: path.map(|p| CapturedString {
                text: p.into(),
                truncated: false,
                unreadable: false,
            }),
        }
    }

    #[test]
    fn renders_like_strace() {
        let mmap = sc(
            nr::MMAP,
            [0, 8192, 3, 0x22, u64::MAX, 0],
            Some(0x7f00_0000_0000),
            None,
        );
        assert_eq!(
            syscall_line(&mmap),
            "mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000"
        );
        let open = sc(
            nr::OPENAT,
            [(-100i64) as u64, 0x1234, 0o2000002, 0, 0, 0],
            Some(-2),
            Some("/nope"),
        );
        assert_eq!(
            syscall_line(&open),
            "openat(AT_FDCWD, \"/nope\", O_RDWR|O_CLOEXEC, 0o0) = -1 errno 2 (No such file or directory)"
        );
        let exit = sc(nr::EXIT_GROUP, [3, 0, 0, 0, 0, 0], None, None);
        assert_eq!(syscall_line(&exit), "exit_group(3) = ?");
    }
}
