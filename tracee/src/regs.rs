//! Register sets of an x86_64 thread as ptrace shows them.

pub use libc::user_regs_struct as Regs;

/// `-ERESTARTSYS`: restart unless a handler ran without `SA_RESTART`.
pub const ERESTARTSYS: i64 = -512;
/// `-ERESTARTNOINTR`: always restart.
pub const ERESTARTNOINTR: i64 = -513;
/// `-ERESTARTNOHAND`: restart if no handler ran.
pub const ERESTARTNOHAND: i64 = -514;
/// `-ERESTART_RESTARTBLOCK`: restart through `restart_syscall`.
pub const ERESTART_RESTARTBLOCK: i64 = -516;
/// `restart_syscall` (x86_64).
pub const NR_RESTART_SYSCALL: u64 = 219;
/// `-EINTR`.
pub const EINTR: i64 = -(libc::EINTR as i64);

/// Puts syscall arguments where the x86_64 syscall ABI takes them.
pub fn set_args(r: &mut Regs, args: [u64; 6]) {
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
}

/// Whether the thread was stopped inside a syscall that the kernel would
/// restart on return to user space.
pub fn in_restartable_syscall(r: &Regs) -> bool {
    (r.orig_rax as i64) >= 0
        && matches!(
            r.rax as i64,
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        )
}

/// Registers that make the thread redo the syscall it was stopped in, the
/// way the kernel would on return to user space, for a thread that is
/// resumed from somewhere other than its original stop (after injected
/// syscalls, or in a restored process).
///
/// `fresh_restart_block`: the kernel's restart block of the thread is lost
/// (a restored process); a `-ERESTART_RESTARTBLOCK` call (sleeps with a
/// deadline) then returns `-EINTR`, and the caller's library retries it.
pub fn restarted(r: &Regs, fresh_restart_block: bool) -> Regs {
    let mut out = *r;
    if !in_restartable_syscall(r) {
        return out;
    }
    match r.rax as i64 {
        ERESTART_RESTARTBLOCK if fresh_restart_block => {
            out.rax = EINTR as u64;
        }
        ERESTART_RESTARTBLOCK => {
            out.rax = NR_RESTART_SYSCALL;
            out.rip -= 2;
        }
        _ => {
            out.rax = r.orig_rax;
            out.rip -= 2;
        }
    }
    // Not in a syscall any more: nothing for the kernel to restart again.
    out.orig_rax = u64::MAX;
    out
}

/// The registers as bytes, for an image.
pub fn to_bytes(r: &Regs) -> Vec<u8> {
    // SAFETY: user_regs_struct is plain integers with no padding.
    unsafe {
        std::slice::from_raw_parts((r as *const Regs).cast::<u8>(), std::mem::size_of::<Regs>())
    }
    .to_vec()
}

/// Registers from bytes written by [`to_bytes`]; `None` on a size mismatch.
pub fn from_bytes(b: &[u8]) -> Option<Regs> {
    if b.len() != std::mem::size_of::<Regs>() {
        return None;
    }
    // SAFETY: length checked; any bit pattern is a valid user_regs_struct.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Regs>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(orig: i64, ax: i64) -> Regs {
        // SAFETY: all-zero is a valid user_regs_struct.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = orig as u64;
        r.rax = ax as u64;
        r.rip = 0x1002;
        r
    }

    #[test]
    fn restart_rules() {
        let r = restarted(&regs(35, ERESTARTSYS), true);
        assert_eq!((r.rax, r.rip, r.orig_rax), (35, 0x1000, u64::MAX));
        let r = restarted(&regs(230, ERESTART_RESTARTBLOCK), false);
        assert_eq!((r.rax, r.rip), (NR_RESTART_SYSCALL, 0x1000));
        let r = restarted(&regs(230, ERESTART_RESTARTBLOCK), true);
        assert_eq!((r.rax as i64, r.rip), (EINTR, 0x1002));
        // Not in a syscall, or a syscall that completed: untouched.
        let r = restarted(&regs(-1, ERESTARTSYS), true);
        assert_eq!((r.rax as i64, r.rip), (ERESTARTSYS, 0x1002));
        let r = restarted(&regs(0, 5), true);
        assert_eq!((r.rax, r.rip), (5, 0x1002));
    }

    #[test]
    fn bytes_round_trip() {
        let r = regs(1, 2);
        assert_eq!(
            from_bytes(&to_bytes(&r)).map(|x| (x.orig_rax, x.rax)),
            Some((1, 2))
        );
        assert!(from_bytes(&[0u8; 3]).is_none());
    }
}
