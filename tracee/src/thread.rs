//! One seized thread.

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};

use crate::{sys, Regs, TraceError};

/// Why a seized thread is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// `PTRACE_INTERRUPT` or group stop (`PTRACE_EVENT_STOP`).
    Interrupt,
    /// A syscall entry or exit (`PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// A signal is about to be delivered.
    Signal(Signal),
    /// Another ptrace event.
    Event(i32),
}

/// A registered rseq area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    /// Address of `struct rseq`.
    pub ptr: u64,
    /// Its registered size.
    pub len: u32,
    /// The abort signature.
    pub sig: u32,
}

/// A thread under ptrace.
#[derive(Debug)]
pub struct Tracee {
    tid: Pid,
    attached: bool,
    /// A signal that arrived while we drove the thread; delivered when we
    /// let it go.
    deferred: std::cell::Cell<Option<Signal>>,
    /// The stop signal of the job-control stop the process was in at the
    /// last `PTRACE_EVENT_STOP` (the kernel reports it instead of
    /// `SIGTRAP` while the group is stopped).
    job_stop: std::cell::Cell<Option<Signal>>,
    /// Whether the thread uses a shadow stack, once looked up (see
    /// `guarded.rs`).
    pub(crate) shadow_stack: std::cell::Cell<Option<bool>>,
}

/// `PTRACE_O_SUSPEND_SECCOMP` (nix does not name it).
fn suspend_seccomp() -> ptrace::Options {
    ptrace::Options::from_bits_retain(1 << 21)
}

/// Whether the seccomp filters of threads we seize are suspended while we
/// hold them: `PTRACE_O_SUSPEND_SECCOMP` needs `CAP_SYS_ADMIN` and a tracer
/// not itself under seccomp.
pub fn can_suspend_seccomp() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
    };
    let admin = field("CapEff:")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << 21) != 0);
    admin && field("Seccomp:").as_deref() == Some("0")
}

fn perr(request: &'static str, tid: Pid) -> impl FnOnce(nix::Error) -> TraceError {
    move |source| TraceError::Ptrace {
        request,
        tid: tid.as_raw(),
        source,
    }
}

impl Tracee {
    /// Seizes thread `tid` (no stop yet) with `PTRACE_O_TRACESYSGOOD`, never
    /// `EXITKILL`: if we die, the kernel detaches and the thread runs on.
    ///
    /// With `CAP_SYS_ADMIN` the thread's seccomp filters are also suspended
    /// while we hold it (`PTRACE_O_SUSPEND_SECCOMP`): the syscalls we inject
    /// must not be failed or killed by them. They act again once it is
    /// let go.
    pub fn seize(tid: i32) -> Result<Self, TraceError> {
        let tid = Pid::from_raw(tid);
        let plain = ptrace::Options::PTRACE_O_TRACESYSGOOD;
        ptrace::seize(tid, plain | suspend_seccomp())
            .or_else(|e| match e {
                nix::Error::EPERM | nix::Error::EINVAL => ptrace::seize(tid, plain),
                e => Err(e),
            })
            .map_err(perr("PTRACE_SEIZE", tid))?;
        Ok(Self {
            tid,
            attached: true,
            deferred: std::cell::Cell::new(None),
            shadow_stack: std::cell::Cell::new(None),
            job_stop: std::cell::Cell::new(None),
        })
    }

    /// A thread attached automatically (`PTRACE_O_TRACECLONE`) and stopped
    /// in its initial `SIGSTOP`.
    pub fn adopt_clone(tid: i32) -> Result<Self, TraceError> {
        let t = Self {
            tid: Pid::from_raw(tid),
            attached: true,
            deferred: std::cell::Cell::new(None),
            shadow_stack: std::cell::Cell::new(None),
            job_stop: std::cell::Cell::new(None),
        };
        loop {
            match t.wait()? {
                StopKind::Signal(Signal::SIGSTOP) | StopKind::Interrupt => return Ok(t),
                StopKind::Signal(sig) => t.deferred.set(Some(sig)),
                StopKind::Syscall | StopKind::Event(_) => {}
            }
            ptrace::cont(t.tid, None).map_err(perr("PTRACE_CONT", t.tid))?;
        }
    }

    /// Takes over a child that called `PTRACE_TRACEME` and is stopped; the
    /// options include `EXITKILL` (for a process we are building: if we die
    /// half-way, it must not run).
    pub fn adopt_traceme_child(tid: i32) -> Result<Self, TraceError> {
        let pid = Pid::from_raw(tid);
        // Seccomp filters suspended where we may (threads and processes it
        // makes inherit the options): the process being built gets its
        // filters before our last syscalls in it.
        let options = ptrace::Options::PTRACE_O_TRACESYSGOOD
            | ptrace::Options::PTRACE_O_EXITKILL
            | ptrace::Options::PTRACE_O_TRACECLONE
            | ptrace::Options::PTRACE_O_TRACEFORK;
        ptrace::setoptions(pid, options | suspend_seccomp())
            .or_else(|e| match e {
                nix::Error::EPERM | nix::Error::EINVAL => ptrace::setoptions(pid, options),
                e => Err(e),
            })
            .map_err(perr("PTRACE_SETOPTIONS", pid))?;
        Ok(Self {
            tid: pid,
            attached: true,
            deferred: std::cell::Cell::new(None),
            shadow_stack: std::cell::Cell::new(None),
            job_stop: std::cell::Cell::new(None),
        })
    }

    /// The thread id.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// Asks the thread to stop (`PTRACE_INTERRUPT`) and waits until it has.
    pub fn interrupt(&self) -> Result<(), TraceError> {
        ptrace::interrupt(self.tid).map_err(perr("PTRACE_INTERRUPT", self.tid))?;
        loop {
            match self.wait()? {
                StopKind::Interrupt => return Ok(()),
                // A signal arrived first: let it stay pending (re-queue it by
                // not suppressing) and keep waiting for the interrupt stop.
                StopKind::Signal(sig) => {
                    ptrace::cont(self.tid, sig).map_err(perr("PTRACE_CONT", self.tid))?
                }
                other => {
                    return Err(TraceError::Unexpected {
                        tid: self.tid(),
                        what: format!("stopped for {other:?} while being interrupted"),
                    });
                }
            }
        }
    }

    /// Waits for the next stop of this thread.
    pub fn wait(&self) -> Result<StopKind, TraceError> {
        loop {
            let status = waitpid(self.tid, Some(WaitPidFlag::__WALL)).map_err(|e| {
                TraceError::Unexpected {
                    tid: self.tid(),
                    what: format!("waitpid: {e}"),
                }
            })?;
            return Ok(match status {
                WaitStatus::PtraceEvent(_, sig, ev) if ev == libc::PTRACE_EVENT_STOP => {
                    self.job_stop.set((sig != Signal::SIGTRAP).then_some(sig));
                    StopKind::Interrupt
                }
                WaitStatus::PtraceEvent(_, _, ev) => StopKind::Event(ev),
                WaitStatus::PtraceSyscall(_) => StopKind::Syscall,
                WaitStatus::Stopped(_, sig) => StopKind::Signal(sig),
                WaitStatus::Exited(p, code) => {
                    crate::reaped::record(p.as_raw(), crate::Ending::Exited(code));
                    return Err(TraceError::Gone { pid: self.tid() });
                }
                WaitStatus::Signaled(p, sig, _) => {
                    crate::reaped::record(p.as_raw(), crate::Ending::Killed(sig as i32));
                    return Err(TraceError::Gone { pid: self.tid() });
                }
                WaitStatus::Continued(_) | WaitStatus::StillAlive => continue,
            });
        }
    }

    /// General registers.
    pub fn regs(&self) -> Result<Regs, TraceError> {
        ptrace::getregs(self.tid).map_err(perr("PTRACE_GETREGS", self.tid))
    }

    /// Sets the general registers.
    pub fn set_regs(&self, regs: &Regs) -> Result<(), TraceError> {
        ptrace::setregs(self.tid, *regs).map_err(perr("PTRACE_SETREGS", self.tid))
    }

    /// The thread's seccomp filters, oldest first, each with its flags
    /// (see [`crate::sys::seccomp_filter`]).
    pub fn seccomp_filters(&self) -> Result<Vec<(u64, Vec<u8>)>, TraceError> {
        let mut all = Vec::new();
        while let Some(f) =
            sys::seccomp_filter(self.tid(), all.len() as u64).map_err(|e| TraceError::Ptrace {
                request: "PTRACE_SECCOMP_GET_FILTER",
                tid: self.tid(),
                source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?
        {
            all.push(f);
        }
        all.reverse();
        Ok(all)
    }

    /// Extended FPU state (XSAVE layout).
    pub fn xstate(&self) -> Result<Vec<u8>, TraceError> {
        sys::get_xstate(self.tid()).map_err(|e| TraceError::Ptrace {
            request: "PTRACE_GETREGSET(NT_X86_XSTATE)",
            tid: self.tid(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
    }

    /// Sets the extended FPU state.
    pub fn set_xstate(&self, state: &[u8]) -> Result<(), TraceError> {
        sys::set_xstate(self.tid(), state).map_err(|e| TraceError::Ptrace {
            request: "PTRACE_SETREGSET(NT_X86_XSTATE)",
            tid: self.tid(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
    }

    /// The thread's registered rseq area (`PTRACE_GET_RSEQ_CONFIGURATION`),
    /// or `None` when it has none.
    pub fn rseq(&self) -> Result<Option<Rseq>, TraceError> {
        const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
        #[repr(C)]
        #[derive(Default)]
        struct Conf {
            ptr: u64,
            size: u32,
            sig: u32,
            flags: u32,
            pad: u32,
        }
        let mut c = Conf::default();
        // SAFETY: the kernel writes at most `size_of::<Conf>()` bytes into `c`.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid(),
                std::mem::size_of::<Conf>(),
                &mut c as *mut Conf,
            )
        };
        if r < 0 {
            return Err(TraceError::Ptrace {
                request: "PTRACE_GET_RSEQ_CONFIGURATION",
                tid: self.tid(),
                source: nix::Error::last(),
            });
        }
        Ok((c.ptr != 0).then_some(Rseq {
            ptr: c.ptr,
            len: c.size,
            sig: c.sig,
        }))
    }

    /// Aborts the restartable sequence the stopped thread is in, if any, as
    /// the kernel does when it preempts a thread inside one: its
    /// instruction pointer goes to the sequence's abort handler and the
    /// area's `rseq_cs` is cleared. Syscalls injected later return through
    /// the kernel's rseq check with the injection's instruction pointer,
    /// which would clear `rseq_cs` and leave the thread inside a sequence
    /// the kernel no longer guards. Returns whether it aborted one.
    pub fn abort_rseq(&self) -> Result<bool, TraceError> {
        let Some(q) = self.rseq()? else {
            return Ok(false);
        };
        let tid = self.tid();
        // struct rseq: u32 cpu_id_start, u32 cpu_id, u64 rseq_cs, ...
        let mut cs = [0u8; 8];
        sys::read_memory(tid, q.ptr + 8, &mut cs)?;
        let cs = u64::from_le_bytes(cs);
        if cs == 0 {
            return Ok(false);
        }
        // struct rseq_cs: u32 version, u32 flags, u64 start_ip,
        // u64 post_commit_offset, u64 abort_ip.
        let mut d = [0u8; 32];
        if sys::read_memory(tid, cs, &mut d).is_err() {
            // The kernel would kill the thread at its next preemption; not
            // ours to do.
            return Ok(false);
        }
        let word = |i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        let (start, len, abort) = (word(8), word(16), word(24));
        let mut r = self.regs()?;
        if r.rip < start || r.rip - start >= len {
            return Ok(false);
        }
        // The abort handler is preceded by the registered signature, or the
        // kernel kills the thread instead.
        let mut sig = [0u8; 4];
        sys::read_memory(tid, abort.wrapping_sub(4), &mut sig)?;
        if u32::from_le_bytes(sig) != q.sig {
            return Ok(false);
        }
        r.rip = abort;
        self.set_regs(&r)?;
        sys::write_memory(tid, q.ptr + 8, &[0; 8])?;
        Ok(true)
    }

    /// Signals pending for this thread (`shared`: for the whole process),
    /// as 128-byte `siginfo_t`s, read without dequeuing them
    /// (`PTRACE_PEEKSIGINFO`).
    pub fn pending_signals(&self, shared: bool) -> Result<Vec<Vec<u8>>, TraceError> {
        const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
        const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
        #[repr(C)]
        struct Args {
            off: u64,
            flags: u32,
            nr: i32,
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 128 * 32];
        loop {
            let mut args = Args {
                off: out.len() as u64,
                flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
                nr: 32,
            };
            // SAFETY: the kernel writes at most `nr` siginfos (128 bytes each) into buf.
            let n = unsafe {
                libc::ptrace(
                    PTRACE_PEEKSIGINFO,
                    self.tid(),
                    &mut args as *mut Args,
                    buf.as_mut_ptr(),
                )
            };
            if n < 0 {
                return Err(TraceError::Ptrace {
                    request: "PTRACE_PEEKSIGINFO",
                    tid: self.tid(),
                    source: nix::Error::last(),
                });
            }
            for i in 0..n as usize {
                out.push(buf[i * 128..(i + 1) * 128].to_vec());
            }
            if (n as usize) < 32 {
                return Ok(out);
            }
        }
    }

    /// The thread's robust futex list (`get_robust_list`): (head, length).
    pub fn robust_list(&self) -> Result<(u64, u64), TraceError> {
        let mut head: u64 = 0;
        let mut len: usize = 0;
        // SAFETY: the kernel writes one pointer and one size_t.
        let r = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                self.tid(),
                &mut head as *mut u64,
                &mut len as *mut usize,
            )
        };
        if r < 0 {
            return Err(TraceError::Ptrace {
                request: "get_robust_list",
                tid: self.tid(),
                source: nix::Error::last(),
            });
        }
        Ok((head, len as u64))
    }

    /// Makes the stopped thread run syscall `nr` with `args`, using the
    /// `syscall` instruction at `insn` in its memory, and returns the raw
    /// result (negative errno on failure). The thread's registers are put
    /// back afterwards; it is left stopped at the syscall exit.
    pub fn inject_syscall(&self, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        let saved = self.regs()?;
        let ret = match self.run_syscall(&saved, insn, nr, args) {
            Ok(r) => r,
            Err(e) => {
                // Best effort: the thread's own registers back.
                let _ = self.set_regs(&saved);
                return Err(e);
            }
        };
        // The thread now resumes from a syscall exit, not from the stop it
        // was in: if that stop was inside a syscall, redo it the way the
        // kernel would have (same process: its restart block is intact).
        self.set_regs(&crate::regs::restarted(&saved, false))?;
        Ok(ret)
    }

    /// Like [`Tracee::inject_syscall`] but leaves the registers as the
    /// syscall left them (for the last call before new registers are set).
    pub fn run_syscall(
        &self,
        base: &Regs,
        insn: u64,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64, TraceError> {
        let mut r = *base;
        r.rip = insn;
        r.rax = nr as u64;
        // Not inside a syscall: keeps the kernel from "restarting" anything.
        r.orig_rax = u64::MAX;
        crate::regs::set_args(&mut r, args);
        self.set_regs(&r)?;
        self.to_syscall_stop()?;
        self.to_syscall_stop()?;
        Ok(self.regs()?.rax as i64)
    }

    /// Lets the thread run to its next syscall entry or exit stop.
    pub(crate) fn to_syscall_stop(&self) -> Result<(), TraceError> {
        loop {
            ptrace::syscall(self.tid, None).map_err(perr("PTRACE_SYSCALL", self.tid))?;
            match self.wait()? {
                StopKind::Syscall => return Ok(()),
                // A clone/fork event stop inside the injected syscall.
                StopKind::Event(_) | StopKind::Interrupt => {}
                // The injected instruction itself faulted (its memory
                // changed under it: an exec): held back, it would fault
                // again at once, for ever.
                StopKind::Signal(sig) if self.faulted(sig) => {
                    return Err(TraceError::Unexpected {
                        tid: self.tid(),
                        what: format!(
                            "the injected system call faulted ({sig}): the process's memory \
                             changed under it (an exec?)"
                        ),
                    });
                }
                // A signal (a timer, a child): hold it for later.
                StopKind::Signal(sig) => self.deferred.set(Some(sig)),
            }
        }
    }

    /// Whether the signal-delivery stop the thread is in is a fault of the
    /// code it ran (SIGSEGV, SIGBUS, SIGILL or SIGFPE raised by the kernel,
    /// not sent by a process).
    fn faulted(&self, sig: Signal) -> bool {
        matches!(
            sig,
            Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE
        ) && ptrace::getsiginfo(self.tid).is_ok_and(|i| i.si_code > 0)
    }

    /// The signal of the job-control stop (`SIGSTOP`, `SIGTSTP`, ...) the
    /// process was in when this seized thread was last interrupted, or
    /// `None` when it was running.
    pub fn job_stop(&self) -> Option<Signal> {
        self.job_stop.get()
    }

    /// The signal held back while the thread was driven, if any.
    pub fn deferred_signal(&self) -> Option<Signal> {
        self.deferred.get()
    }

    /// Forgets a thread that has exited (nothing to detach from).
    pub fn forget(mut self) {
        self.attached = false;
    }

    /// Lets the thread go (`PTRACE_DETACH`).
    pub fn detach(mut self) -> Result<(), TraceError> {
        self.attached = false;
        ptrace::detach(self.tid, self.deferred.get()).map_err(perr("PTRACE_DETACH", self.tid))
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        if self.attached {
            // Best effort: a thread we lose track of must not stay stopped.
            let _ = ptrace::detach(self.tid, self.deferred.get());
        }
    }
}
