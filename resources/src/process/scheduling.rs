//! Scheduling: nice value, scheduling policy and real-time priority of
//! each thread, and the OOM score adjustment. They are not recorded yet: a
//! process whose settings are not the defaults (nice 0, `SCHED_OTHER`,
//! OOM score adjustment 0) is refused at checkpoint time, naming them,
//! while it keeps running; a restored process is given the defaults, not
//! whatever the restorer runs with.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// Nice, policy, real-time priority, OOM score adjustment.
pub struct Scheduling;

/// (nice, real-time priority, policy) of a `/proc/PID/task/TID/stat` text.
fn of_stat(text: &str) -> Option<(i64, i64, i64)> {
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field n (1-based) of the whole line is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<i64>().ok();
    Some((num(19)?, num(40)?, num(41)?))
}

impl ProcessKind for Scheduling {
    fn name(&self) -> &'static str {
        "nice, scheduling policy, OOM score adjustment"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let read = |p: String| std::fs::read_to_string(&p).map_err(proc_err(pid, p));
        let ours = Some((0, 0, libc::SCHED_OTHER as i64));
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(proc_err(pid, format!("/proc/{pid}/task")))?;
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            let Ok(text) = std::fs::read_to_string(t.path().join("stat")) else {
                continue; // a thread that exited (the process is frozen: only before)
            };
            let theirs = of_stat(&text);
            if theirs != ours {
                let show = |v: Option<(i64, i64, i64)>| {
                    v.map_or("?".into(), |(n, p, pol)| {
                        format!("nice {n}, policy {pol}, rt priority {p}")
                    })
                };
                return Err(cx.refuse(format!(
                    "a scheduling setting other than the default in thread {tid} ({}; the \
                     default {}): it is not restored yet",
                    show(theirs),
                    show(ours)
                )));
            }
        }
        let adj = read(format!("/proc/{pid}/oom_score_adj"))?;
        if adj.trim() != "0" {
            return Err(cx.refuse(format!(
                "an OOM score adjustment of {} (not the default 0): it is not restored yet",
                adj.trim()
            )));
        }
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // The defaults, whatever the restorer runs with (its threads made
        // later inherit them).
        sys.call(
            "setpriority",
            libc::SYS_setpriority,
            [libc::PRIO_PROCESS as u64, 0, 0, 0, 0, 0],
        )?;
        let param = sys.put(0, &0i32.to_le_bytes())?;
        sys.call(
            "sched_setscheduler",
            libc::SYS_sched_setscheduler,
            [0, libc::SCHED_OTHER as u64, param, 0, 0, 0],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn default_settings_pass_stat_fields_parse_and_restore_sets_the_defaults() {
        save_with(
            &Scheduling,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        let rec = crate::sys::fake::Recording::new();
        Scheduling.restore(&rec, &ProcessInfo::default()).unwrap();
        assert_eq!(rec.names(), ["setpriority", "sched_setscheduler"]);
        let line = "7 (a b) S 1 7 7 0 -1 4194560 0 0 0 0 0 0 0 0 20 5 1 0 100 0 0 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 10 2 0 0 0";
        assert_eq!(of_stat(line), Some((5, 10, 2)));
        assert_eq!(of_stat("7 (x) S 1"), None);
    }
}
