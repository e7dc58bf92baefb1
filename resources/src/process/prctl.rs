//! What a process set about itself with `prctl` and no file shows: the
//! signal it gets when its parent dies, whether it is dumpable, whether
//! transparent huge pages are disabled for it; and whether job control
//! had it stopped. Asked with injected `prctl`s (reused while the log
//! shows no `prctl` and its credentials, which reset `dumpable`, are the
//! same); set again last, once every thread exists: the stop as a stop
//! signal queued to itself, so the process stops again before running
//! any of its own code.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::{Prctl, ProcessInfo};

use super::{Changes, Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

const PR_SET_PDEATHSIG: u64 = 1;
const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_DUMPABLE: u64 = 3;
const PR_SET_DUMPABLE: u64 = 4;
const PR_SET_THP_DISABLE: u64 = 41;
const PR_GET_THP_DISABLE: u64 = 42;

/// Parent-death signal, dumpable, THP disabled, job-control stop.
pub struct Prctls;

impl ProcessKind for Prctls {
    fn name(&self) -> &'static str {
        "parent-death signal, dumpable, THP disabled and job-control stop"
    }

    fn phase(&self) -> Phase {
        Phase::Signals
    }

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::PRCTL]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.prctl = true;
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let job_stop = cx.ask.job_stop() as u32;
        let reuse = cx
            .known
            .filter(|k| !cx.changes.prctl && k.process.creds == p.creds)
            .and_then(|k| k.process.prctl);
        let mut c = if let Some(prev) = reuse {
            cx.queries.reused += 3;
            prev
        } else {
            cx.queries.injected += 3;
            let (ret, out) = cx
                .ask
                .call_out(libc::SYS_prctl, 4, &|at| [PR_GET_PDEATHSIG, at, 0, 0, 0, 0])?;
            let pdeath_signal = if ret == 0 {
                u32::from_le_bytes(out[..4].try_into().expect("4 bytes"))
            } else {
                0
            };
            let (dumpable, _) = cx
                .ask
                .call_out(libc::SYS_prctl, 0, &|_| [PR_GET_DUMPABLE, 0, 0, 0, 0, 0])?;
            let (thp, _) = cx
                .ask
                .call_out(libc::SYS_prctl, 0, &|_| [PR_GET_THP_DISABLE, 0, 0, 0, 0, 0])?;
            Prctl {
                pdeath_signal,
                dumpable: dumpable.clamp(0, 2) as u32,
                thp_disabled: thp > 0,
                job_stop: 0,
            }
        };
        c.job_stop = job_stop;
        if c.pdeath_signal != 0 {
            let ppid = crate::proc::stat(cx.pid)
                .map_err(crate::proc_err(cx.pid, format!("/proc/{}/stat", cx.pid)))?
                .ppid;
            if !cx.together.contains(&ppid) {
                return Err(cx.refuse(format!(
                    "a parent-death signal ({}) while its parent ({ppid}) is not \
                     checkpointed with it: the restored process would get it when \
                     whatever restores it exits",
                    c.pdeath_signal
                )));
            }
        }
        p.prctl = Some(c);
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        let Some(c) = p.prctl else {
            return Ok(());
        };
        if c.thp_disabled {
            sys.call(
                "prctl(PR_SET_THP_DISABLE)",
                libc::SYS_prctl,
                [PR_SET_THP_DISABLE, 1, 0, 0, 0, 0],
            )?;
        }
        if c.pdeath_signal != 0 {
            sys.call(
                "prctl(PR_SET_PDEATHSIG)",
                libc::SYS_prctl,
                [PR_SET_PDEATHSIG, c.pdeath_signal as u64, 0, 0, 0, 0],
            )?;
        }
        if c.dumpable != 1 {
            sys.call(
                "prctl(PR_SET_DUMPABLE)",
                libc::SYS_prctl,
                [PR_SET_DUMPABLE, c.dumpable as u64, 0, 0, 0, 0],
            )?;
        }
        if c.job_stop != 0 {
            // Pending when the process is let go: it stops before running.
            sys.call(
                "kill(job-control stop)",
                libc::SYS_kill,
                [p.pid as u64, c.job_stop as u64, 0, 0, 0, 0],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        process::testing::{save_with, try_save_with},
        sys::{ask::Scripted, fake::Recording},
    };

    fn script(pdeath: u32, dumpable: i64, thp: i64) -> Scripted {
        Scripted::default().answer(libc::SYS_prctl, move |a| match a[0] {
            PR_GET_PDEATHSIG => (0, pdeath.to_le_bytes().to_vec()),
            PR_GET_DUMPABLE => (dumpable, Vec::new()),
            PR_GET_THP_DISABLE => (thp, Vec::new()),
            _ => (-(libc::EINVAL as i64), Vec::new()),
        })
    }

    #[test]
    fn settings_are_asked_then_reused_until_a_prctl() {
        let s = script(0, 0, 1).stopped_by(libc::SIGTSTP);
        let (p, q) = save_with(&Prctls, &s, None, &Changes::all());
        let c = p.prctl.unwrap();
        assert_eq!((c.dumpable, c.thp_disabled, c.job_stop), (0, true, 20));
        assert_eq!(q.injected, 3);
        let prev = cr_ebpf_image::Manifest {
            process: p.clone(),
            ..Default::default()
        };
        let quiet = Scripted::default();
        let (again, q) = save_with(&Prctls, &quiet, Some(&prev), &Changes::none());
        assert_eq!(q.injected, 0);
        assert_eq!(again.prctl.unwrap().job_stop, 0, "the stop is read anew");
        assert_eq!(again.prctl.unwrap().dumpable, 0);
        let mut after = Changes::none();
        crate::process::invalidate(nr::PRCTL, &mut after);
        let (_, q) = save_with(&Prctls, &script(0, 1, 0), Some(&prev), &after);
        assert_eq!(q.injected, 3, "a prctl since: asked again");
    }

    #[test]
    fn a_parent_death_signal_from_a_parent_left_behind_is_refused() {
        let me = std::process::id() as i32;
        let err = try_save_with(&Prctls, &script(10, 1, 0), &[me]).unwrap_err();
        assert!(
            err.to_string().contains("parent-death signal (10)"),
            "{err}"
        );
        let parent = crate::proc::stat(me).unwrap().ppid;
        let p = try_save_with(&Prctls, &script(10, 1, 0), &[me, parent]).unwrap();
        assert_eq!(p.prctl.unwrap().pdeath_signal, 10);
    }

    #[test]
    fn only_what_differs_from_a_new_process_is_set_and_the_stop_goes_last() {
        let rec = Recording::new();
        Prctls.restore(&rec, &ProcessInfo::default()).unwrap();
        assert!(rec.names().is_empty(), "an older image sets nothing");
        let p = ProcessInfo {
            pid: 77,
            prctl: Some(Prctl {
                pdeath_signal: 10,
                dumpable: 0,
                thp_disabled: true,
                job_stop: 19,
            }),
            ..ProcessInfo::default()
        };
        Prctls.restore(&rec, &p).unwrap();
        assert_eq!(
            rec.names(),
            [
                "prctl(PR_SET_THP_DISABLE)",
                "prctl(PR_SET_PDEATHSIG)",
                "prctl(PR_SET_DUMPABLE)",
                "kill(job-control stop)"
            ]
        );
        assert_eq!(rec.calls("kill(job-control stop)")[0][..2], [77, 19]);
    }
}
