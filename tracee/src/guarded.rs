//! Injected syscalls that survive the tracer's death.
//!
//! A plain injection points the thread at a borrowed `syscall` instruction
//! with the call's registers; if the tracer dies in between (a SIGKILL of
//! cr-ebpf), the kernel detaches and the thread runs on from that
//! instruction with those registers, and crashes. Here the thread is
//! pointed instead at a `mov $15, %rax; syscall` sequence of its own
//! memory (the `rt_sigreturn` trampoline every libc and Go binary has),
//! with a signal frame below its stack pointer that holds its own
//! registers, FPU state and signal mask, the way the kernel would place a
//! frame for a signal handler:
//!
//! 1. Left alone, the thread executes `rt_sigreturn` and is back in its
//!    own context.
//! 2. At the entry stop of that `rt_sigreturn` the tracer substitutes the
//!    call it wants (number and arguments) and sets the return address to
//!    the trampoline again: left alone from here on, the thread runs the
//!    call, then `rt_sigreturn`, and is back in its own context.
//! 3. At the exit stop the tracer reads the result and sets the thread's
//!    own registers (the way [`Tracee::inject_syscall`] does): the frame is
//!    never used when the tracer lives.
//!
//! So a thread never runs on with borrowed registers. What a death leaves
//! behind: the frame's bytes below the stack pointer (memory a signal
//! frame may take at any time), the injected call done, and, when the
//! thread was stopped in a sleep with a deadline, `-EINTR` from it
//! (`rt_sigreturn` drops the restart block, as after a signal handler).

use crate::{
    regs,
    sys::{self, XSTATE_MAX},
    Regs, TraceError, Tracee,
};

/// `FP_XSTATE_MAGIC1`: the XSAVE area of a signal frame is complete.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
/// `FP_XSTATE_MAGIC2`: after the XSAVE area.
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// `UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS`.
const UC_FLAGS: u64 = 0x7;
/// `rt_sigreturn` (x86_64).
const NR_RT_SIGRETURN: u64 = 15;
/// Offset of the XSAVE area in the frame (after the return address, the
/// `ucontext` and the `siginfo`, aligned for `XRSTOR`).
const FPSTATE_AT: usize = 448;

/// The `rt_sigreturn` trampolines looked for: `mov $15, %rax; syscall`
/// (glibc, musl, Go) and `mov $15, %eax; syscall`.
pub const TRAMPOLINES: [&[u8]; 2] = [
    &[0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
    &[0xb8, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05],
];

/// A signal frame that returns to `r` with FPU state `xstate` (as
/// `PTRACE_GETREGSET(NT_X86_XSTATE)` gives it) and signal mask `mask`,
/// for address `at` (64-byte aligned).
fn frame(r: &Regs, xstate: &[u8], mask: u64, at: u64) -> Vec<u8> {
    let mut f = vec![0u8; FPSTATE_AT + xstate.len() + 4];
    let put =
        |f: &mut Vec<u8>, off: usize, v: u64| f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    // ucontext at 8: flags, link, stack (ss_flags 3 is invalid: the
    // thread's alternate stack is left as it is), then sigcontext at 48.
    put(&mut f, 8, UC_FLAGS);
    f[32..36].copy_from_slice(&3u32.to_le_bytes());
    let sc = 48;
    let gprs = [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ];
    for (i, v) in gprs.iter().enumerate() {
        put(&mut f, sc + i * 8, *v);
    }
    // cs, gs, fs, ss (16 bits each).
    for (i, v) in [r.cs, r.gs, r.fs, r.ss].iter().enumerate() {
        let o = sc + 144 + i * 2;
        f[o..o + 2].copy_from_slice(&(*v as u16).to_le_bytes());
    }
    put(&mut f, sc + 184, at + FPSTATE_AT as u64);
    // uc_sigmask after the 256-byte sigcontext.
    put(&mut f, 8 + 296, mask);
    // The XSAVE area, with the software bytes a signal frame carries (the
    // ptrace copy has XCR0 there instead).
    let fp = FPSTATE_AT;
    f[fp..fp + xstate.len()].copy_from_slice(xstate);
    let xcr0 = u64::from_le_bytes(xstate[464..472].try_into().expect("8 bytes"));
    f[fp + 464..fp + 512].fill(0);
    f[fp + 464..fp + 468].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    f[fp + 468..fp + 472].copy_from_slice(&(xstate.len() as u32 + 4).to_le_bytes());
    put(&mut f, fp + 472, xcr0);
    f[fp + 480..fp + 484].copy_from_slice(&(xstate.len() as u32).to_le_bytes());
    let end = fp + xstate.len();
    f[end..end + 4].copy_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
    f
}

/// The steps of a guarded injection, for fault-injection tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The frame is written below the stack pointer.
    FrameWritten,
    /// The thread points at the trampoline.
    Pointed,
    /// It stopped at the entry of the trampoline's `rt_sigreturn`.
    AtEntry,
    /// The call replaced that `rt_sigreturn`.
    Substituted,
    /// It stopped at the call's exit.
    AtExit,
    /// All done: the thread is on its own registers again.
    Done,
}

impl Step {
    /// Every step but `Done`, in order.
    pub const ALL: [Step; 5] = [
        Step::FrameWritten,
        Step::Pointed,
        Step::AtEntry,
        Step::Substituted,
        Step::AtExit,
    ];
}

impl Tracee {
    /// Whether the thread uses a shadow stack (`rt_sigreturn` would then
    /// need a token only the kernel writes); read once per seized thread
    /// (it cannot enable one while stopped).
    fn shadow_stack(&self, pid: i32) -> bool {
        if let Some(known) = self.shadow_stack.get() {
            return known;
        }
        let uses = std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", self.tid()))
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("x86_Thread_features:") && l.contains("shstk"))
            })
            .unwrap_or(true);
        self.shadow_stack.set(Some(uses));
        uses
    }

    /// Runs syscall `nr` with `args` like [`Tracee::inject_syscall`], but
    /// through the `rt_sigreturn` trampoline at `trampoline` with a frame
    /// placed below `below` (see the module's text), so that the thread
    /// returns to its own context whenever the tracer dies. `None` when
    /// that cannot be arranged (no room for the frame, a shadow stack, an
    /// FPU state too large): nothing was changed, use the plain injection.
    pub fn inject_guarded(
        &self,
        pid: i32,
        trampoline: u64,
        below: u64,
        nr: i64,
        args: [u64; 6],
    ) -> Result<Option<i64>, TraceError> {
        self.inject_guarded_until(pid, trampoline, below, nr, args, Step::Done)
    }

    /// [`Tracee::inject_guarded`] that returns right after `until`, leaving
    /// the thread as a tracer that died there would (for fault-injection
    /// tests: the caller then dies without detaching cleanly).
    pub fn inject_guarded_until(
        &self,
        pid: i32,
        trampoline: u64,
        below: u64,
        nr: i64,
        args: [u64; 6],
        until: Step,
    ) -> Result<Option<i64>, TraceError> {
        let saved = self.regs()?;
        let back = regs::restarted(&saved, false);
        let xstate = self.xstate()?;
        if !(512..=XSTATE_MAX).contains(&xstate.len()) || self.shadow_stack(pid) {
            return Ok(None);
        }
        let mask = sys::sigmask(self.tid())?;
        let len = (FPSTATE_AT + xstate.len() + 4) as u64;
        let at = (saved.rsp.wrapping_sub(below).wrapping_sub(len)) & !63;
        let mut old = vec![0u8; len as usize];
        if sys::read_memory(pid, at, &mut old).is_err() {
            return Ok(None);
        }
        sys::write_memory(pid, at, &frame(&back, &xstate, mask, at))?;
        if until == Step::FrameWritten {
            return Ok(Some(0));
        }
        let ret = self.through_trampoline(&saved, &back, trampoline, at, nr, args, until);
        if until != Step::Done {
            return ret.map(Some);
        }
        // Alive: the thread is back on its own registers (or the error
        // says why not); the frame's bytes are put back.
        let put_back = sys::write_memory(pid, at, &old);
        let ret = ret?;
        put_back?;
        Ok(Some(ret))
    }

    #[allow(clippy::too_many_arguments, reason = "the steps of one injection")]
    fn through_trampoline(
        &self,
        saved: &Regs,
        back: &Regs,
        trampoline: u64,
        at: u64,
        nr: i64,
        args: [u64; 6],
        until: Step,
    ) -> Result<i64, TraceError> {
        let mut r = *saved;
        r.rip = trampoline;
        // `rt_sigreturn` finds its frame at rsp - 8 (the return address a
        // handler's `ret` popped).
        r.rsp = at + 8;
        r.orig_rax = u64::MAX;
        self.set_regs(&r)?;
        if until == Step::Pointed {
            return Ok(0);
        }
        // The entry of the trampoline's rt_sigreturn: becomes our call.
        self.to_syscall_stop()?;
        if until == Step::AtEntry {
            return Ok(0);
        }
        let mut e = self.regs()?;
        if e.orig_rax != NR_RT_SIGRETURN {
            self.set_regs(back)?;
            return Err(TraceError::Unexpected {
                tid: self.tid(),
                what: format!(
                    "the rt_sigreturn trampoline at {trampoline:#x} stopped in syscall {}",
                    e.orig_rax as i64
                ),
            });
        }
        e.orig_rax = nr as u64;
        regs::set_args(&mut e, args);
        // Returns to the trampoline: rt_sigreturn next, if left alone.
        e.rip = trampoline;
        self.set_regs(&e)?;
        if until == Step::Substituted {
            return Ok(0);
        }
        self.to_syscall_stop()?;
        let ret = self.regs()?.rax as i64;
        if until == Step::AtExit {
            return Ok(ret);
        }
        self.set_regs(back)?;
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_holds_the_registers_where_the_kernel_reads_them() {
        // SAFETY: an all-zero user_regs_struct is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.r8 = 8;
        r.rdi = 0xd1;
        r.rax = 0xa;
        r.rsp = 0x7fff_0000;
        r.rip = 0x40_1000;
        r.eflags = 0x246;
        r.cs = 0x33;
        r.ss = 0x2b;
        let mut xs = vec![0u8; 832];
        xs[464..472].copy_from_slice(&7u64.to_le_bytes());
        let f = frame(&r, &xs, 0x1234, 0x1000);
        let word = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
        let ctx = 8 + 40;
        assert_eq!(word(8), UC_FLAGS);
        assert_eq!(word(ctx), 8, "r8 first");
        assert_eq!(word(ctx + 8 * 8), 0xd1, "rdi");
        assert_eq!(word(ctx + 13 * 8), 0xa, "rax");
        assert_eq!(word(ctx + 15 * 8), 0x7fff_0000, "rsp");
        assert_eq!(word(ctx + 16 * 8), 0x40_1000, "rip");
        assert_eq!(word(ctx + 17 * 8), 0x246, "eflags");
        assert_eq!(&f[ctx + 144..ctx + 146], &[0x33, 0]);
        assert_eq!(&f[ctx + 150..ctx + 152], &[0x2b, 0]);
        assert_eq!(word(ctx + 184), 0x1000 + FPSTATE_AT as u64);
        assert_eq!(word(8 + 296), 0x1234, "the signal mask");
        let fp = FPSTATE_AT;
        assert_eq!(&f[fp + 464..fp + 468], &FP_XSTATE_MAGIC1.to_le_bytes());
        assert_eq!(word(fp + 472), 7, "XCR0 as the features");
        assert_eq!(&f[fp + 832..fp + 836], &FP_XSTATE_MAGIC2.to_le_bytes());
        assert_eq!(f.len(), fp + 836);
    }
}
