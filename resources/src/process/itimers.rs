//! Interval timers (`ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`): asked
//! with an injected `getitimer` (a timer never armed is not asked again
//! while the log shows no `setitimer`/`alarm`), set with `setitimer` last.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::ProcessInfo;

use super::{word, Changes, Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// The three interval timers: (interval, remaining) in microseconds.
pub struct ITimers;

impl ProcessKind for ITimers {
    fn name(&self) -> &'static str {
        "interval timers"
    }

    fn phase(&self) -> Phase {
        Phase::Signals
    }

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::SETITIMER, nr::ALARM]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.itimers = true;
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        // A timer that was never armed stays disarmed until a setitimer or
        // alarm; an armed one counts down, so it is asked every time.
        let prev = cx
            .known
            .filter(|_| !cx.changes.itimers)
            .map(|m| m.process.itimers);
        p.itimers = [(0, 0); 3];
        for (which, slot) in p.itimers.iter_mut().enumerate() {
            if prev.is_some_and(|t| t[which] == (0, 0)) {
                cx.queries.reused += 1;
                continue;
            }
            cx.queries.injected += 1;
            let (ret, out) = cx.ask.call_out(libc::SYS_getitimer, 32, &|at| {
                [which as u64, at, 0, 0, 0, 0]
            })?;
            if ret == 0 {
                *slot = (
                    word(&out, 0) * 1_000_000 + word(&out, 1),
                    word(&out, 2) * 1_000_000 + word(&out, 3),
                );
            }
        }
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        for (which, &(interval, value)) in p.itimers.iter().enumerate() {
            if interval == 0 && value == 0 {
                continue;
            }
            let mut v = Vec::with_capacity(32);
            for x in [
                interval / 1_000_000,
                interval % 1_000_000,
                value / 1_000_000,
                value % 1_000_000,
            ] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            let at = sys.put(0, &v)?;
            sys.call(
                "setitimer",
                libc::SYS_setitimer,
                [which as u64, at, 0, 0, 0, 0],
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
    fn only_armed_timers_are_set() {
        let p = ProcessInfo {
            itimers: [(0, 0), (0, 0), (250_000, 1_500_000)],
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        ITimers.restore(&rec, &p).unwrap();
        let c = rec.calls("setitimer");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0][0], libc::ITIMER_PROF as u64);
        let v = rec.memory("setitimer", 0, c[0][1], 32);
        assert_eq!(
            [word(&v, 0), word(&v, 1), word(&v, 2), word(&v, 3)],
            [0, 250_000, 1, 500_000]
        );
        let mut ch = Changes::none();
        super::super::invalidate(nr::ALARM, &mut ch);
        assert!(ch.itimers && !ch.sigactions);
    }

    #[test]
    fn armed_timers_are_asked_every_time_and_idle_ones_reused() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        let answer = |a: [u64; 6]| {
            let mut v = vec![0u8; 32];
            if a[0] == libc::ITIMER_REAL as u64 {
                for (i, x) in [0u64, 250_000, 2, 500_000].iter().enumerate() {
                    v[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
                }
            }
            (0, v)
        };
        let ask = Scripted::default().answer(libc::SYS_getitimer, answer);
        let (p, q) = save_with(&ITimers, &ask, None, &Changes::all());
        assert_eq!(p.itimers, [(250_000, 2_500_000), (0, 0), (0, 0)]);
        assert_eq!(q.injected, 3);
        let prev = cr_ebpf_image::Manifest {
            process: p,
            ..Default::default()
        };
        let ask = Scripted::default().answer(libc::SYS_getitimer, answer);
        let (_, q) = save_with(&ITimers, &ask, Some(&prev), &Changes::none());
        assert_eq!(
            (q.injected, q.reused),
            (1, 2),
            "only the armed one is asked again"
        );
        assert_eq!(ask.asked()[0].1[0], libc::ITIMER_REAL as u64);
    }
}
