//! POSIX timers (`timer_create`): ids, clocks and notification from
//! `/proc/PID/timers`, remaining time and interval from an injected
//! `timer_gettime` (asked every time: armed timers count down). Restored
//! with their ids (`PR_TIMER_CREATE_RESTORE_IDS`: while on, `timer_create`
//! takes the id from the `timer_t` it is given), then armed, last.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::{PosixTimer, ProcessInfo};

use super::{word, Changes, Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// `PR_TIMER_CREATE_RESTORE_IDS` (Linux 6.16+).
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

/// Every POSIX timer of the process, by id.
pub struct PosixTimers;

/// The timers `/proc/PID/timers` lists (no remaining time there), by id;
/// an error names what could not be read.
fn parse(text: &str) -> Result<Vec<PosixTimer>, String> {
    let bad = |what: &str| format!("an unreadable {what} in /proc/PID/timers");
    let mut out: Vec<PosixTimer> = Vec::new();
    for line in text.lines() {
        let (key, value) = line.split_once(':').ok_or_else(|| bad("line"))?;
        let value = value.trim();
        if key == "ID" {
            out.push(PosixTimer {
                id: value.parse().map_err(|_| bad("timer id"))?,
                ..PosixTimer::default()
            });
            continue;
        }
        let t = out.last_mut().ok_or_else(|| bad("timer"))?;
        match key {
            // signal: 10/0000000000000abc
            "signal" => {
                let (signo, v) = value.split_once('/').ok_or_else(|| bad("signal"))?;
                t.signo = signo.parse().map_err(|_| bad("signal"))?;
                t.value = u64::from_str_radix(v, 16).map_err(|_| bad("signal value"))?;
            }
            // notify: signal/pid.8224, none/pid.8224, signal/tid.8225
            "notify" => {
                let (how, target) = value.split_once('/').ok_or_else(|| bad("notify"))?;
                t.notify = match how {
                    "signal" => libc::SIGEV_SIGNAL,
                    "none" => libc::SIGEV_NONE,
                    _ => return Err(format!("POSIX timer {} notifying by {how:?}", t.id)),
                };
                if let Some(tid) = target.strip_prefix("tid.") {
                    t.notify |= libc::SIGEV_THREAD_ID;
                    t.tid = tid.parse().map_err(|_| bad("notify tid"))?;
                }
            }
            "ClockID" => t.clockid = value.parse().map_err(|_| bad("clock"))?,
            _ => {}
        }
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

impl ProcessKind for PosixTimers {
    fn name(&self) -> &'static str {
        "POSIX timers"
    }

    fn phase(&self) -> Phase {
        Phase::Signals
    }

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::TIMER_CREATE, nr::TIMER_SETTIME, nr::TIMER_DELETE]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.itimers = true;
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let path = format!("/proc/{pid}/timers");
        let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path))?;
        let mut timers = parse(&text).map_err(|e| cx.refuse(e))?;
        for t in &mut timers {
            cx.queries.injected += 1;
            let (ret, its) = cx.ask.call_out(libc::SYS_timer_gettime, 32, &|at| {
                [t.id as u64, at, 0, 0, 0, 0]
            })?;
            if ret != 0 {
                return Err(cx.refuse(format!(
                    "timer_gettime of POSIX timer {} failed ({ret})",
                    t.id
                )));
            }
            t.interval_ns = word(&its, 0) * 1_000_000_000 + word(&its, 1);
            t.remaining_ns = word(&its, 2) * 1_000_000_000 + word(&its, 3);
        }
        p.posix_timers = timers;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        if p.posix_timers.is_empty() {
            return Ok(());
        }
        sys.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0],
        )
        .map_err(|e| {
            RestoreError::NotSupported(format!(
                "POSIX timers keep their ids only on kernels with PR_TIMER_CREATE_RESTORE_IDS \
                 (Linux 6.16+): {e}"
            ))
        })?;
        for t in &p.posix_timers {
            // struct sigevent: sigev_value, sigev_signo, sigev_notify, _tid.
            let mut ev = vec![0u8; 64];
            ev[0..8].copy_from_slice(&t.value.to_le_bytes());
            ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
            ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
            ev[16..20].copy_from_slice(&t.tid.to_le_bytes());
            let ev_at = sys.put(0, &ev)?;
            let id_at = sys.put(128, &t.id.to_le_bytes())?;
            sys.call(
                "timer_create",
                libc::SYS_timer_create,
                [t.clockid as u64, ev_at, id_at, 0, 0, 0],
            )
            .map_err(|e| RestoreError::NotSupported(format!("POSIX timer {}: {e}", t.id)))?;
        }
        sys.call(
            "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
            libc::SYS_prctl,
            [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0],
        )?;
        for t in p.posix_timers.iter().filter(|t| t.remaining_ns > 0) {
            let mut its = Vec::with_capacity(32);
            for v in [
                t.interval_ns / 1_000_000_000,
                t.interval_ns % 1_000_000_000,
                t.remaining_ns / 1_000_000_000,
                t.remaining_ns % 1_000_000_000,
            ] {
                its.extend_from_slice(&v.to_le_bytes());
            }
            let at = sys.put(256, &its)?;
            sys.call(
                "timer_settime",
                libc::SYS_timer_settime,
                [t.id as u64, 0, at, 0, 0, 0],
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
    fn timers_of_proc_come_back_with_their_ids_and_times() {
        let text = "ID: 3\nsignal: 14/0000000000000abc\nnotify: signal/tid.8225\nClockID: 1\n\
                    ID: 0\nsignal: 10/0000000000000000\nnotify: none/pid.8224\nClockID: 0\n";
        let mut timers = parse(text).unwrap();
        assert_eq!(timers.iter().map(|t| t.id).collect::<Vec<_>>(), [0, 3]);
        assert_eq!(timers[1].notify, libc::SIGEV_SIGNAL | libc::SIGEV_THREAD_ID);
        assert_eq!(
            (timers[1].tid, timers[1].value, timers[1].clockid),
            (8225, 0xabc, 1)
        );
        assert_eq!(timers[0].notify, libc::SIGEV_NONE);
        assert!(parse("ID: 1\nnotify: thread/pid.1\n")
            .unwrap_err()
            .contains("notifying"));
        timers[1].remaining_ns = 2_500_000_000;
        let p = ProcessInfo {
            posix_timers: timers.clone(),
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        PosixTimers.restore(&rec, &p).unwrap();
        assert_eq!(
            rec.names(),
            [
                "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
                "timer_create",
                "timer_create",
                "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
                "timer_settime"
            ]
        );
        let create = rec.calls("timer_create")[1];
        assert_eq!(create[0], 1);
        assert_eq!(
            rec.memory("timer_create", 1, create[2], 4),
            3i32.to_le_bytes()
        );
        let set = rec.calls("timer_settime")[0];
        assert_eq!(set[0], 3);
        let its = rec.memory("timer_settime", 0, set[2], 32);
        assert_eq!((word(&its, 2), word(&its, 3)), (2, 500_000_000));
    }

    #[test]
    fn a_timer_of_the_process_is_saved_with_its_remaining_time() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: a timer of ours with the default notification.
        let made =
            unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, std::ptr::null_mut(), &mut id) };
        assert_eq!(made, 0);
        let ask = Scripted::default().answer(libc::SYS_timer_gettime, |_| {
            let mut its = vec![0u8; 32];
            its[16..24].copy_from_slice(&3u64.to_le_bytes());
            (0, its)
        });
        let (p, q) = save_with(&PosixTimers, &ask, None, &Changes::all());
        // SAFETY: our timer.
        unsafe { libc::timer_delete(id) };
        assert_eq!(p.posix_timers.len(), 1);
        assert_eq!(p.posix_timers[0].id as i64, id as i64);
        assert_eq!(p.posix_timers[0].remaining_ns, 3_000_000_000);
        assert_eq!(q.injected, 1);
        assert_eq!(ask.asked()[0].1[0], id as u64);
    }
}
