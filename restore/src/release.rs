//! Letting a built process run: every thread gets its own signal mask as
//! its last syscall and its own registers at that syscall's exit; the
//! trampoline goes last.

use cr_ebpf_resources::sys::{Injected, Sys as _, PAGE};
use cr_ebpf_tracee::{regs, Tracee};

use crate::{
    stub::{KillGuard, TRAMPOLINE_LEN},
    RestoreError,
};

/// A process built and stopped, waiting for [`release`].
pub(crate) struct Ready {
    // The guard first: a stub dropped is killed while traced, not let go
    // first (fields drop in order).
    pub guard: KillGuard,
    pub t: Tracee,
    pub others: Vec<(Tracee, regs::Regs, u64)>,
    pub final_regs: regs::Regs,
    pub sigmask: u64,
    pub vdso_insn: u64,
    pub tramp: u64,
    pub filled: crate::Filled,
}

/// Lets a built process run: each thread gets its own mask and registers.
pub(crate) fn release(r: Ready) -> Result<(i32, crate::Filled), RestoreError> {
    let Ready {
        t,
        mut guard,
        others,
        final_regs,
        sigmask,
        vdso_insn,
        tramp,
        filled,
    } = r;
    let got = t.tid();
    let s = Injected::new(&t, got, tramp, tramp + PAGE);
    // Each other thread: its own signal mask as its last syscall, its own
    // registers at that syscall's exit, then it runs (a pending signal it
    // does not block is delivered right then, as the kernel would).
    for (nt, regs, mask) in others {
        let tid = nt.tid();
        let at = s.put(0, &mask.to_le_bytes())?;
        let base = nt.regs().map_err(|source| RestoreError::Build {
            what: format!("reading the registers of thread {tid}"),
            source,
        })?;
        let r = nt
            .run_syscall(
                &base,
                tramp,
                libc::SYS_rt_sigprocmask,
                [libc::SIG_SETMASK as u64, at, 0, 8, 0, 0],
            )
            .map_err(|source| RestoreError::Build {
                what: format!("setting the signal mask of thread {tid}"),
                source,
            })?;
        if r != 0 {
            return Err(RestoreError::Syscall {
                call: format!("rt_sigprocmask in thread {tid}"),
                err: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        nt.set_regs(&regs).map_err(|source| RestoreError::Build {
            what: format!("setting the registers of thread {tid}"),
            source,
        })?;
        nt.detach().map_err(|source| RestoreError::Build {
            what: format!("letting thread {tid} run"),
            source,
        })?;
    }

    // 7. Last syscall: the trampoline goes; at its exit the thread gets its
    //    own registers and runs.
    let base = t.regs().map_err(|source| RestoreError::Build {
        what: "reading registers".into(),
        source,
    })?;
    let r = t
        .run_syscall(
            &base,
            tramp,
            libc::SYS_munmap,
            [tramp, TRAMPOLINE_LEN, 0, 0, 0, 0],
        )
        .map_err(|source| RestoreError::Build {
            what: "removing the trampoline".into(),
            source,
        })?;
    if r != 0 {
        return Err(RestoreError::Syscall {
            call: "munmap(trampoline)".into(),
            err: std::io::Error::from_raw_os_error(-r as i32),
        });
    }
    // The main thread's own mask, last, through the vDSO's `syscall`
    // instruction (the trampoline is gone), with the mask written just
    // below its stack pointer and the bytes there put back.
    let insn = vdso_insn;
    let scratch = (final_regs.rsp - 4096) & !15;
    let mut saved = [0u8; 8];
    let mem = |what: &str, source| RestoreError::Build {
        what: what.into(),
        source,
    };
    cr_ebpf_tracee::read_memory(got, scratch, &mut saved)
        .map_err(|e| mem("reading the stack", e))?;
    cr_ebpf_tracee::write_memory(got, scratch, &sigmask.to_le_bytes())
        .map_err(|e| mem("writing the stack", e))?;
    let base = t.regs().map_err(|e| mem("reading registers", e))?;
    let r = t
        .run_syscall(
            &base,
            insn,
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as u64, scratch, 0, 8, 0, 0],
        )
        .map_err(|e| mem("setting the signal mask", e))?;
    cr_ebpf_tracee::write_memory(got, scratch, &saved)
        .map_err(|e| mem("restoring the stack", e))?;
    if r != 0 {
        return Err(RestoreError::Syscall {
            call: "rt_sigprocmask".into(),
            err: std::io::Error::from_raw_os_error(-r as i32),
        });
    }
    t.set_regs(&final_regs)
        .map_err(|source| RestoreError::Build {
            what: "setting the registers".into(),
            source,
        })?;
    t.detach().map_err(|source| RestoreError::Build {
        what: "letting the process run".into(),
        source,
    })?;
    guard.1 = true;
    Ok((got, filled))
}
