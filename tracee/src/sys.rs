//! Raw calls: `PTRACE_GETREGSET`/`SETREGSET` for the extended FPU state, and
//! cross-process memory access.

use std::io;

use crate::TraceError;

/// `NT_X86_XSTATE`.
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Largest xstate buffer we accept (AMX-capable CPUs need about 11 KiB).
pub const XSTATE_MAX: usize = 16 * 1024;

/// The thread's extended FPU/SSE/AVX state (XSAVE layout).
pub fn get_xstate(tid: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most iov_len bytes into buf and updates iov_len.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// The thread's blocked signals (`PTRACE_GETSIGMASK`).
pub fn sigmask(tid: i32) -> Result<u64, TraceError> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes 8 bytes into `mask`.
    let r = unsafe {
        libc::ptrace(
            0x420a, // PTRACE_GETSIGMASK
            tid,
            std::mem::size_of::<u64>(),
            &mut mask as *mut u64,
        )
    };
    if r < 0 {
        return Err(TraceError::Ptrace {
            request: "PTRACE_GETSIGMASK",
            tid,
            source: nix::Error::last(),
        });
    }
    Ok(mask)
}

/// Sets the thread's extended FPU state from an XSAVE image.
pub fn set_xstate(tid: i32, state: &[u8]) -> io::Result<()> {
    let mut copy = state.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: the kernel reads iov_len bytes from the buffer.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `addr` of process `pid`, through
/// `/proc/PID/mem`.
///
/// Not `process_vm_readv`: it pins the pages it reads, and a read-only pin
/// of an anonymous page shared copy-on-write since a `fork` makes the
/// kernel give the process a private copy first (so that the pin is
/// stable). Reading a forking server that way turned all the memory its
/// workers share with it into private copies, in the live processes. A
/// read of `/proc/PID/mem` takes no pin and leaves the pages shared, also
/// reads pages the process cannot read itself (`PROT_NONE`), and is about
/// as fast (measured: 4.6–5.6 against 5.9 GB/s on one core).
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), TraceError> {
    Mem::open(pid)?.read(addr, buf)
}

/// A process's memory open for reading (see [`read_memory`]), for many
/// reads: the same process as long as it cannot `execve` (frozen, or
/// between two checks of its start time). Shared by threads.
pub struct Mem {
    pid: i32,
    file: std::fs::File,
}

impl Mem {
    /// Opens `/proc/PID/mem`.
    pub fn open(pid: i32) -> Result<Self, TraceError> {
        let file =
            std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::ENOENT | libc::ESRCH) => TraceError::NoSuchProcess { pid },
                    _ => TraceError::Memory {
                        op: "reading",
                        pid,
                        addr: 0,
                        len: 0,
                        source,
                    },
                }
            })?;
        Ok(Self { pid, file })
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), TraceError> {
        use std::os::unix::fs::FileExt as _;
        let (pid, total) = (self.pid, buf.len());
        let err = |done: usize, source| TraceError::Memory {
            op: "reading",
            pid,
            addr: addr + done as u64,
            len: total - done,
            source,
        };
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], addr + done as u64) {
                Ok(0) => return Err(err(done, io::Error::from(io::ErrorKind::UnexpectedEof))),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A page a userfaultfd handler must provide (a lazily
                // restored process): `/proc/PID/mem` cannot wait for it, a
                // pinning read can (and pins only what it reads from here).
                Err(e) => match vm_readv(pid, addr + done as u64, &mut buf[done..]) {
                    n if n > 0 => done += n as usize,
                    _ => return Err(err(done, e)),
                },
            }
        }
        Ok(())
    }
}

/// One `process_vm_readv` into `buf`: the bytes read, or -1.
fn vm_readv(pid: i32, addr: u64, buf: &mut [u8]) -> isize {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, ours; the kernel checks the remote
    // range against the process's mappings.
    unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) }
}

/// Writes `data` at `addr` of process `pid` (`process_vm_writev`); the
/// target range must be writable.
pub fn write_memory(pid: i32, addr: u64, data: &[u8]) -> Result<(), TraceError> {
    let mut done = 0;
    while done < data.len() {
        let local = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        // SAFETY: as for read_memory; the kernel only reads `data`.
        let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
        if n <= 0 {
            return Err(TraceError::Memory {
                op: "writing",
                pid,
                addr: addr + done as u64,
                len: data.len() - done,
                source: if n < 0 {
                    io::Error::last_os_error()
                } else {
                    io::Error::from(io::ErrorKind::WriteZero)
                },
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// `struct clone_args` up to `set_tid_size` (the size the kernel accepts
/// for `set_tid`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
}

/// Forks (`clone3` without `CLONE_VM`) with the pid `pid`; the child runs
/// `child` and exits with its return value. Returns the child's pid.
///
/// # Safety
///
/// `child` runs in a copy of a possibly multi-threaded process with only
/// the calling thread: it must only make raw syscalls (no allocation, no
/// locks, nothing another thread may have held at the fork).
pub unsafe fn fork_with_pid(pid: i32, child: impl FnOnce() -> i32) -> io::Result<i32> {
    let tids = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM copies the address space like fork;
    // `args` and `tids` are valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        let code = child();
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    Ok(r as i32)
}

/// Filter `index` of thread `tid`'s seccomp filters (0 the newest), as
/// `PTRACE_SECCOMP_GET_FILTER` gives it (`struct sock_filter`s, 8 bytes
/// each), with its flags (`PTRACE_GET_SECCOMP_METADATA`: 2 for
/// `SECCOMP_FILTER_FLAG_LOG`); `None` past the oldest. Needs
/// `CAP_SYS_ADMIN` and the thread stopped under our ptrace.
pub fn seccomp_filter(tid: i32, index: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
    const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
    const PTRACE_GET_SECCOMP_METADATA: libc::c_uint = 0x420d;
    // SAFETY: a null buffer asks only for the number of instructions.
    let n = unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_FILTER,
            tid,
            index as usize as *mut libc::c_void,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    let mut prog = vec![0u8; n as usize * 8];
    // SAFETY: the buffer holds the n instructions the kernel reported.
    let got = unsafe {
        libc::ptrace(
            PTRACE_SECCOMP_GET_FILTER,
            tid,
            index as usize as *mut libc::c_void,
            prog.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    if got != n {
        return Err(if got < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("the filter changed while it was read")
        });
    }
    let mut meta = [index, 0u64];
    // SAFETY: the kernel reads filter_off and writes flags, 16 bytes.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_SECCOMP_METADATA,
            tid,
            16usize as *mut libc::c_void,
            meta.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((meta[1], prog)))
}
