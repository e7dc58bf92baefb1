//! Decoded events: what the ring buffer records mean, as Rust values.

use cr_ebpf_common as abi;
use serde::Serialize;

/// One entry of the resource and dirty-page log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A completed resource-changing syscall.
    Syscall(Syscall),
    /// A write fault on a user address.
    Fault(Fault),
    /// A new thread or process.
    Fork(Fork),
    /// A thread exited.
    Exit(Exit),
    /// A successful exec.
    Exec(Exec),
}

/// Who and when, common to every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Process id (initial pid namespace).
    pub tgid: u32,
    /// Thread id (initial pid namespace).
    pub tid: u32,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
}

/// A completed syscall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Syscall {
    /// Who and when it returned (or entered, for `exit`/`exit_group`).
    #[serde(flatten)]
    pub origin: Origin,
    /// Syscall number.
    pub nr: u32,
    /// Syscall name, when known.
    pub name: Option<&'static str>,
    /// Raw arguments.
    pub args: [u64; 6],
    /// Return value; `None` for calls that do not return.
    pub ret: Option<i64>,
    /// `CLOCK_MONOTONIC` nanoseconds at entry.
    pub enter_ns: u64,
    /// The path or name argument, when the syscall has one.
    pub path: Option<CapturedString>,
}

/// A string copied from the process or the kernel with an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturedString {
    /// The bytes, lossily decoded as UTF-8.
    pub text: String,
    /// The original did not fit and was cut.
    pub truncated: bool,
    /// The string could not be read at all (bad pointer).
    pub unreadable: bool,
}

/// A write fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// Who and when.
    #[serde(flatten)]
    pub origin: Origin,
    /// Faulting address.
    pub address: u64,
    /// Instruction pointer.
    pub ip: u64,
    /// x86 page-fault error code.
    pub error_code: u64,
    /// Taken in kernel mode (a write by the kernel on the process's behalf).
    pub kernel: bool,
}

impl Fault {
    /// Start of the 4 KiB page that was written.
    pub fn page(&self) -> u64 {
        self.address & !0xfff
    }

    /// The page was present and write-protected (a write to a page already
    /// in memory), as opposed to a first touch.
    pub fn protection(&self) -> bool {
        self.error_code & 1 != 0
    }
}

/// A thread or process creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fork {
    /// The parent and when.
    #[serde(flatten)]
    pub origin: Origin,
    /// Child thread id.
    pub child_tid: u32,
    /// Child process id.
    pub child_tgid: u32,
    /// Clone flags, when known.
    pub clone_flags: Option<u64>,
    /// The child is a thread of the parent's process.
    pub thread: bool,
}

/// A thread exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Exit {
    /// Who and when.
    #[serde(flatten)]
    pub origin: Origin,
    /// Whether this was the last thread of the process (`None`: the kernel does not say).
    pub group_dead: Option<bool>,
}

/// An exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exec {
    /// Who (the new leader) and when.
    #[serde(flatten)]
    pub origin: Origin,
    /// The thread that called exec.
    pub old_tid: u32,
    /// The new program.
    pub filename: CapturedString,
}

impl Event {
    /// Who and when.
    pub fn origin(&self) -> &Origin {
        match self {
            Event::Syscall(e) => &e.origin,
            Event::Fault(e) => &e.origin,
            Event::Fork(e) => &e.origin,
            Event::Exit(e) => &e.origin,
            Event::Exec(e) => &e.origin,
        }
    }
}

/// A record that is not a valid event of the ABI this build understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header.
    #[error("event record of {0} bytes is shorter than its header")]
    Short(usize),
    /// Written by programs of another ABI version.
    #[error("event record has ABI version {found}, this build reads version {expected}")]
    Version {
        /// Version in the record.
        found: u16,
        /// Version this build reads.
        expected: u16,
    },
    /// Unknown kind.
    #[error("event record has unknown kind {0}")]
    Kind(u16),
    /// The size does not match the kind.
    #[error("event record of kind {kind:?} has {len} bytes, expected {expected}")]
    Size {
        /// The kind.
        kind: abi::EventKind,
        /// Bytes received.
        len: usize,
        /// Bytes that kind has.
        expected: usize,
    },
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>());
    // SAFETY: length checked above; `T` is one of the plain-integer
    // `#[repr(C)]` records of the ABI, valid for any bit pattern, and
    // `read_unaligned` has no alignment requirement.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn captured(buf: &[u8], len: u32, truncated: bool, unreadable: bool) -> CapturedString {
    let len = (len as usize).min(buf.len());
    let bytes = &buf[..len];
    let bytes = bytes.split(|b| *b == 0).next().unwrap_or(bytes);
    CapturedString {
        text: String::from_utf8_lossy(bytes).into_owned(),
        truncated,
        unreadable,
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    use std::mem::size_of;
    if bytes.len() < size_of::<abi::EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let h: abi::EventHeader = read(bytes);
    if h.abi != abi::EVENT_ABI_VERSION {
        return Err(DecodeError::Version {
            found: h.abi,
            expected: abi::EVENT_ABI_VERSION,
        });
    }
    let kind = abi::EventKind::try_from(h.kind).map_err(DecodeError::Kind)?;
    let expected = match kind {
        abi::EventKind::Syscall => size_of::<abi::SyscallEvent>(),
        abi::EventKind::Fault => size_of::<abi::FaultEvent>(),
        abi::EventKind::Fork => size_of::<abi::ForkEvent>(),
        abi::EventKind::Exit => size_of::<abi::ExitEvent>(),
        abi::EventKind::Exec => size_of::<abi::ExecEvent>(),
        abi::EventKind::Invalid => return Err(DecodeError::Kind(0)),
    };
    // The ring buffer rounds records up to 8 bytes; the header says the real size.
    if bytes.len() < expected || h.size as usize != expected {
        return Err(DecodeError::Size {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    let origin = Origin {
        tgid: h.tgid,
        tid: h.tid,
        ts_ns: h.ts_ns,
    };
    Ok(match kind {
        abi::EventKind::Syscall => {
            let e: abi::SyscallEvent = read(bytes);
            let no_return = e.flags & abi::SYSCALL_F_NO_RETURN != 0;
            let path = if e.flags & abi::SYSCALL_F_PATH != 0 {
                Some(captured(
                    &e.path,
                    e.path_len,
                    e.flags & abi::SYSCALL_F_PATH_TRUNCATED != 0,
                    false,
                ))
            } else if e.flags & abi::SYSCALL_F_PATH_FAULT != 0 {
                Some(captured(&[], 0, false, true))
            } else {
                None
            };
            Event::Syscall(Syscall {
                origin,
                nr: e.nr,
                name: abi::syscalls::name(e.nr),
                args: e.args,
                ret: (!no_return).then_some(e.ret),
                enter_ns: e.enter_ns,
                path,
            })
        }
        abi::EventKind::Fault => {
            let e: abi::FaultEvent = read(bytes);
            Event::Fault(Fault {
                origin,
                address: e.address,
                ip: e.ip,
                error_code: e.error_code,
                kernel: e.flags & abi::FAULT_F_KERNEL != 0,
            })
        }
        abi::EventKind::Fork => {
            let e: abi::ForkEvent = read(bytes);
            Event::Fork(Fork {
                origin,
                child_tid: e.child_tid,
                child_tgid: e.child_tgid,
                clone_flags: (e.flags & abi::FORK_F_FLAGS_UNKNOWN == 0).then_some(e.clone_flags),
                thread: e.flags & abi::FORK_F_THREAD != 0,
            })
        }
        abi::EventKind::Exit => {
            let e: abi::ExitEvent = read(bytes);
            Event::Exit(Exit {
                origin,
                group_dead: (e.flags & abi::EXIT_F_GROUP_UNKNOWN == 0)
                    .then_some(e.flags & abi::EXIT_F_GROUP_DEAD != 0),
            })
        }
        abi::EventKind::Exec => {
            let e: abi::ExecEvent = read(bytes);
            Event::Exec(Exec {
                origin,
                old_tid: e.old_tid,
                filename: captured(
                    &e.filename,
                    e.filename_len,
                    e.flags & abi::EXEC_F_TRUNCATED != 0,
                    false,
                ),
            })
        }
        abi::EventKind::Invalid => unreachable!("rejected above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain #[repr(C)] value.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn header(kind: abi::EventKind, size: usize) -> abi::EventHeader {
        abi::EventHeader {
            abi: abi::EVENT_ABI_VERSION,
            kind: kind as u16,
            size: size as u32,
            tgid: 10,
            tid: 11,
            ts_ns: 12,
        }
    }

    #[test]
    fn decodes_a_syscall_with_path() {
        let mut path = [0u8; abi::PATH_CAPTURE];
        path[..9].copy_from_slice(b"/dev/null");
        let e = abi::SyscallEvent {
            header: header(
                abi::EventKind::Syscall,
                std::mem::size_of::<abi::SyscallEvent>(),
            ),
            nr: abi::syscalls::OPENAT,
            flags: abi::SYSCALL_F_PATH,
            args: [u64::MAX - 99, 0x1000, 2, 0, 0, 0],
            ret: 3,
            enter_ns: 5,
            path_len: 9,
            _pad: 0,
            path,
        };
        let Event::Syscall(s) = decode(&bytes_of(&e)).unwrap() else {
            panic!("not a syscall")
        };
        assert_eq!(s.name, Some("openat"));
        assert_eq!(s.ret, Some(3));
        assert_eq!(s.path.unwrap().text, "/dev/null");
        assert_eq!(s.origin.tid, 11);
    }

    #[test]
    fn rejects_bad_records() {
        let f = abi::FaultEvent {
            header: header(
                abi::EventKind::Fault,
                std::mem::size_of::<abi::FaultEvent>(),
            ),
            ..Default::default()
        };
        let good = bytes_of(&f);
        assert!(matches!(decode(&good), Ok(Event::Fault(_))));
        assert_eq!(decode(&good[..10]), Err(DecodeError::Short(10)));
        assert!(matches!(decode(&good[..40]), Err(DecodeError::Size { .. })));
        let mut other = f;
        other.header.abi = 99;
        assert!(matches!(
            decode(&bytes_of(&other)),
            Err(DecodeError::Version { found: 99, .. })
        ));
        other.header.abi = abi::EVENT_ABI_VERSION;
        other.header.kind = 77;
        assert_eq!(decode(&bytes_of(&other)), Err(DecodeError::Kind(77)));
        other.header.kind = 0;
        assert_eq!(decode(&bytes_of(&other)), Err(DecodeError::Kind(0)));
    }
}
