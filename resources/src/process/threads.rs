//! Per-thread state: registers and FPU state, blocked signals, rseq area,
//! robust futex list, `clear_child_tid`, alternate signal stack, signals
//! pending for the thread alone, its name and its scheduling settings
//! (kept in `scheduling.rs`). Saved thread by thread while
//! the process is frozen (registers before anything is injected), restored
//! by syscalls in each new thread ([`restore_thread`]); the registers and
//! FPU state are set by the restorer through ptrace.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::{Manifest, ProcessInfo, ThreadInfo};
use cr_ebpf_tracee::{regs, Injector, Tracee};

use super::{Changes, Phase, ProcessKind, Queries, SaveCx};
use crate::{error::proc_err, proc, sys::Sys, RestoreError, SaveError};

/// The per-thread kind: saved and restored by [`save_thread`] and
/// [`restore_thread`]; registered for the syscalls that change what only
/// the thread can be asked for.
pub struct Threads;

impl ProcessKind for Threads {
    fn name(&self) -> &'static str {
        "threads"
    }

    fn phase(&self) -> Phase {
        Phase::Threads
    }

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::SIGALTSTACK, nr::SET_TID_ADDRESS]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.thread_state = true;
    }

    fn save(&self, _cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        Ok(())
    }
}

/// The state of the stopped thread `t` of process `pid`. What only the
/// thread can be asked for (`clear_child_tid`, sigaltstack) is taken from
/// `before`, its record in the previous checkpoint, when the log says it
/// still holds.
pub fn save_thread(
    pid: i32,
    injector: &Injector,
    t: &Tracee,
    before: Option<&ThreadInfo>,
    securebits: Option<u32>,
    queries: &mut Queries,
) -> Result<ThreadInfo, SaveError> {
    let trace = |source| SaveError::Trace { pid, source };
    // Registers first: injected calls below must not show in them.
    let r = t.regs().map_err(trace)?;
    let rseq = t.rseq().map_err(trace)?;
    let (clear_child_tid, sigaltstack) = match before {
        Some(b) => {
            queries.reused += 2;
            (b.clear_child_tid, b.sigaltstack)
        }
        None => {
            queries.injected += 2;
            let (ret, out) = injector
                .call_out(t, libc::SYS_prctl, 8, |at| {
                    [libc::PR_GET_TID_ADDRESS as u64, at, 0, 0, 0, 0]
                })
                .map_err(trace)?;
            let clear_child_tid = if ret == 0 {
                u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
            } else {
                0
            };
            let (ret, ss) = injector
                .call_out(t, libc::SYS_sigaltstack, 24, |at| [0, at, 0, 0, 0, 0])
                .map_err(trace)?;
            let sigaltstack = if ret == 0 {
                let w = |i: usize| u64::from_le_bytes(ss[i..i + 8].try_into().expect("8 bytes"));
                (w(0), w(8) as u32, w(16))
            } else {
                (0, libc::SS_DISABLE as u32, 0)
            };
            (clear_child_tid, sigaltstack)
        }
    };
    let tid = t.tid();
    // Credentials are read again every time (the log does not cover every
    // call that changes them); securebits, which only `prctl` changes (and
    // an exec), are asked (PR_GET_SECUREBITS injected) unless `securebits`
    // still holds.
    let creds = super::creds::save(pid, injector, t, securebits)?;
    match securebits {
        Some(_) => queries.reused += 1,
        None => queries.injected += 1,
    }
    let sched = super::scheduling::save_sched(pid, tid)?;
    Ok(ThreadInfo {
        tid,
        regs: regs::to_bytes(&r),
        xstate: t.xstate().map_err(trace)?,
        rseq: rseq.map_or((0, 0, 0), |q| (q.ptr, q.len, q.sig)),
        robust_list: t.robust_list().map_err(trace)?,
        clear_child_tid,
        sigaltstack,
        pending: t.pending_signals(false).map_err(trace)?,
        comm: std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .map(|c| c.trim_end_matches('\n').chars().take(15).collect())
            .unwrap_or_default(),
        sigmask: proc::sigmask(pid, tid)
            .map_err(proc_err(pid, format!("/proc/{pid}/task/{tid}/status")))?,
        creds: Some(creds),
        sched,
    })
}

/// Every thread of the frozen process, main thread first (`prev`: the
/// previous checkpoint, whose answers are reused when `changes` allows).
pub fn save_threads(
    pid: i32,
    injector: &Injector,
    threads: &[Tracee],
    prev: Option<&Manifest>,
    changes: &Changes,
    queries: &mut Queries,
) -> Result<Vec<ThreadInfo>, SaveError> {
    let all = threads
        .iter()
        .map(|t| {
            let before = prev
                .filter(|_| !changes.thread_state && !changes.unknown)
                .and_then(|p| p.threads.iter().find(|x| x.tid == t.tid()));
            // The same thread (no thread came or went since) and no prctl.
            let securebits = before
                .filter(|_| !changes.prctl)
                .and_then(|b| b.creds.as_ref())
                .map(|c| c.securebits);
            save_thread(pid, injector, t, before, securebits, queries)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(what) = super::creds::check_sharing(&all) {
        return Err(SaveError::NotSupported { pid, what });
    }
    Ok(all)
}

/// Sets the kernel state of thread `info` of process `pid` by syscalls in
/// that thread (`sys` runs them there). Signals it had pending are queued
/// again: every signal stays blocked until its own mask is set, last.
pub fn restore_thread(sys: &dyn Sys, pid: i32, info: &ThreadInfo) -> Result<(), RestoreError> {
    sys.call(
        "set_robust_list",
        libc::SYS_set_robust_list,
        [info.robust_list.0, info.robust_list.1, 0, 0, 0, 0],
    )?;
    sys.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        [info.clear_child_tid, 0, 0, 0, 0, 0],
    )?;
    if info.rseq.0 != 0 {
        sys.call(
            "rseq",
            libc::SYS_rseq,
            [info.rseq.0, info.rseq.1 as u64, 0, info.rseq.2 as u64, 0, 0],
        )?;
    }
    if !info.comm.is_empty() {
        let mut name = info.comm.clone().into_bytes();
        name.truncate(15);
        name.push(0);
        let at = sys.put(0, &name)?;
        sys.call(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            [libc::PR_SET_NAME as u64, at, 0, 0, 0, 0],
        )?;
    }
    // Always set, a disabled one too: the main thread inherited the
    // restorer's alternate stack, which points into memory that is gone
    // (a handler with SA_ONSTACK would then kill the process).
    let disabled = info.sigaltstack.1 & libc::SS_DISABLE as u32 != 0;
    let (sp, flags, size) = if disabled {
        (0, libc::SS_DISABLE as u32, 0)
    } else {
        (
            info.sigaltstack.0,
            info.sigaltstack.1 & !(libc::SS_ONSTACK as u32),
            info.sigaltstack.2,
        )
    };
    let mut ss = sp.to_le_bytes().to_vec();
    ss.extend_from_slice(&flags.to_le_bytes());
    ss.extend_from_slice(&0u32.to_le_bytes());
    ss.extend_from_slice(&size.to_le_bytes());
    let at = sys.put(0, &ss)?;
    sys.call("sigaltstack", libc::SYS_sigaltstack, [at, 0, 0, 0, 0, 0])?;
    if let Some(sched) = &info.sched {
        super::scheduling::restore_sched(sys, sched)?;
    }
    for siginfo in &info.pending {
        let signo = i32::from_le_bytes(siginfo[0..4].try_into().expect("4 bytes"));
        let at = sys.put(0, siginfo)?;
        sys.call(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            [pid as u64, info.tid as u64, signo as u64, at, 0, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn a_thread_gets_its_lists_areas_name_stack_and_signals_back() {
        let mut siginfo = vec![0u8; 128];
        siginfo[0..4].copy_from_slice(&34i32.to_le_bytes());
        let info = ThreadInfo {
            tid: 77,
            rseq: (0x7f00_0000_1000, 32, 0x5305_3053),
            robust_list: (0x7f00_0000_2000, 24),
            clear_child_tid: 0x7f00_0000_3000,
            sigaltstack: (0x7f00_0010_0000, libc::SS_ONSTACK as u32, 65536),
            pending: vec![siginfo],
            comm: "a-very-long-thread-name".into(),
            sched: Some(cr_ebpf_image::Sched {
                policy: 1,
                priority: 7,
                ..Default::default()
            }),
            ..ThreadInfo::default()
        };
        let rec = Recording::new();
        restore_thread(&rec, 70, &info).unwrap();
        assert_eq!(
            rec.names(),
            [
                "set_robust_list",
                "set_tid_address",
                "rseq",
                "prctl(PR_SET_NAME)",
                "sigaltstack",
                "setpriority",
                "sched_setattr",
                "rt_tgsigqueueinfo"
            ]
        );
        assert_eq!(rec.calls("rseq")[0][3], 0x5305_3053);
        let name = rec.calls("prctl(PR_SET_NAME)")[0][1];
        assert_eq!(
            rec.memory("prctl(PR_SET_NAME)", 0, name, 16),
            b"a-very-long-thr\0"
        );
        let ss = rec.memory("sigaltstack", 0, rec.calls("sigaltstack")[0][0], 24);
        assert_eq!(
            u32::from_le_bytes(ss[8..12].try_into().unwrap()),
            0,
            "SS_ONSTACK is the kernel's to set"
        );
        let q = rec.calls("rt_tgsigqueueinfo")[0];
        assert_eq!((q[0], q[1], q[2]), (70, 77, 34));
        // A disabled alternate stack is set disabled: the restorer's own
        // is not left behind.
        let rec = Recording::new();
        let plain = ThreadInfo {
            sigaltstack: (0, libc::SS_DISABLE as u32, 0),
            ..ThreadInfo::default()
        };
        restore_thread(&rec, 70, &plain).unwrap();
        assert_eq!(
            rec.names(),
            ["set_robust_list", "set_tid_address", "sigaltstack"]
        );
        let ss = rec.memory("sigaltstack", 0, rec.calls("sigaltstack")[0][0], 24);
        assert_eq!(
            u32::from_le_bytes(ss[8..12].try_into().unwrap()),
            libc::SS_DISABLE as u32
        );
        let mut c = Changes::none();
        super::super::invalidate(nr::SIGALTSTACK, &mut c);
        assert!(c.thread_state);
    }
}
