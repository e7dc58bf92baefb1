//! Signal dispositions: asked of the process with an injected
//! `rt_sigaction` per signal (reused while the log shows no
//! `rt_sigaction`), set again with `rt_sigaction` at restore.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::{ProcessInfo, SigAction};

use super::{word, Changes, Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// Handlers, flags, restorers and masks of every signal not at its default.
pub struct SigActions;

impl ProcessKind for SigActions {
    fn name(&self) -> &'static str {
        "signal handlers"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::RT_SIGACTION]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.sigactions = true;
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        if let Some(prev) = cx.known.filter(|_| !cx.changes.sigactions) {
            cx.queries.reused += 62;
            p.sigactions = prev.process.sigactions.clone();
            return Ok(());
        }
        p.sigactions.clear();
        for signo in 1..=64u32 {
            if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
                continue;
            }
            cx.queries.injected += 1;
            let (ret, out) = cx.ask.call_out(libc::SYS_rt_sigaction, 32, &|at| {
                [signo as u64, 0, at, 8, 0, 0]
            })?;
            if ret != 0 {
                continue;
            }
            let a = SigAction {
                signo,
                handler: word(&out, 0),
                flags: word(&out, 1),
                restorer: word(&out, 2),
                mask: word(&out, 3),
            };
            if a.handler != 0 || a.flags != 0 || a.mask != 0 {
                p.sigactions.push(a);
            }
        }
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        for a in &p.sigactions {
            let mut act = Vec::with_capacity(32);
            for v in [a.handler, a.flags, a.restorer, a.mask] {
                act.extend_from_slice(&v.to_le_bytes());
            }
            let at = sys.put(0, &act)?;
            sys.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [a.signo as u64, at, 0, 8, 0, 0],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn each_handler_is_set_with_its_whole_sigaction() {
        let p = ProcessInfo {
            sigactions: vec![
                SigAction {
                    signo: 10,
                    handler: 0x5555_0000_1000,
                    flags: 0x0400_0004,
                    restorer: 0x7f00_0000_2000,
                    mask: 1 << 11,
                },
                SigAction {
                    signo: 13,
                    handler: 1,
                    ..SigAction::default()
                },
            ],
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        SigActions.restore(&rec, &p).unwrap();
        let calls = rec.calls("rt_sigaction");
        assert_eq!(calls.len(), 2);
        for (i, (c, a)) in calls.iter().zip(&p.sigactions).enumerate() {
            assert_eq!((c[0], c[2], c[3]), (a.signo as u64, 0, 8));
            let act = rec.memory("rt_sigaction", i, c[1], 32);
            let w = |k: usize| word(&act, k);
            assert_eq!(
                (w(0), w(1), w(2), w(3)),
                (a.handler, a.flags, a.restorer, a.mask)
            );
        }
        let mut c = Changes::none();
        super::super::invalidate(nr::RT_SIGACTION, &mut c);
        assert!(c.sigactions && !c.itimers && !c.thread_state);
    }

    #[test]
    fn every_signal_is_asked_and_only_set_ones_kept_until_the_log_says_otherwise() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        // SIGUSR1 has a handler; every other signal is at its default.
        let ask = Scripted::default().answer(libc::SYS_rt_sigaction, |a| {
            let mut act = vec![0u8; 32];
            if a[0] == libc::SIGUSR1 as u64 {
                act[..8].copy_from_slice(&0x5555_0000_1000u64.to_le_bytes());
                act[8..16].copy_from_slice(&0x0400_0000u64.to_le_bytes());
            }
            (0, act)
        });
        let (p, q) = save_with(&SigActions, &ask, None, &Changes::all());
        assert_eq!(
            ask.asked().len(),
            62,
            "every signal but SIGKILL and SIGSTOP"
        );
        assert!(
            ask.asked().iter().all(|(_, a)| a[1] == 0 && a[3] == 8),
            "asked, never set"
        );
        assert_eq!(p.sigactions.len(), 1);
        assert_eq!(
            (p.sigactions[0].signo, p.sigactions[0].handler),
            (10, 0x5555_0000_1000)
        );
        assert_eq!((q.injected, q.reused), (62, 0));
        // With a complete log that shows no rt_sigaction: reused, not asked.
        let prev = cr_ebpf_image::Manifest {
            process: p.clone(),
            ..Default::default()
        };
        let quiet = Scripted::default();
        let (again, q) = save_with(&SigActions, &quiet, Some(&prev), &Changes::none());
        assert!(quiet.asked().is_empty());
        assert_eq!((again.sigactions, q.reused), (p.sigactions, 62));
    }
}
