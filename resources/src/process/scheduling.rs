//! Scheduling: nice value, scheduling policy and real-time priority of
//! each thread (not recorded yet: settings other than the defaults, nice 0
//! and `SCHED_OTHER`, are refused at checkpoint time, naming them, while
//! the process keeps running; a restored process is given the defaults,
//! not whatever the restorer runs with), and the OOM score adjustment
//! (recorded and written again; one below cr-ebpf's own is refused when
//! cr-ebpf lacks `CAP_SYS_RESOURCE`, which lowering it takes).

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

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
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
        let adj: i32 = read(format!("/proc/{pid}/oom_score_adj"))?
            .trim()
            .parse()
            .unwrap_or(0);
        let ours: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if adj < ours && !may_lower_oom_score() {
            return Err(cx.refuse(format!(
                "an OOM score adjustment of {adj}, below cr-ebpf's {ours}: setting it again \
                 needs CAP_SYS_RESOURCE, which cr-ebpf lacks here"
            )));
        }
        p.oom_score_adj = adj;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
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
        if p.oom_score_adj != 0 {
            let fd = sys.openat("/proc/self/oom_score_adj", libc::O_WRONLY | libc::O_CLOEXEC)?;
            let text = p.oom_score_adj.to_string();
            let at = sys.put(0, text.as_bytes())?;
            let r = sys.call(
                "write(oom_score_adj)",
                libc::SYS_write,
                [fd as u64, at, text.len() as u64, 0, 0, 0],
            );
            sys.close(fd)?;
            r?;
        }
        Ok(())
    }
}

/// Whether cr-ebpf holds `CAP_SYS_RESOURCE` (bit 24 of `CapEff`).
fn may_lower_oom_score() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
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
        let rec = crate::sys::fake::Recording::new();
        let p = ProcessInfo {
            oom_score_adj: 400,
            ..ProcessInfo::default()
        };
        Scheduling.restore(&rec, &p).unwrap();
        let w = rec.calls("write(oom_score_adj)")[0];
        assert_eq!(rec.memory("write(oom_score_adj)", 0, w[1], 3), b"400");
        let line = "7 (a b) S 1 7 7 0 -1 4194560 0 0 0 0 0 0 0 0 20 5 1 0 100 0 0 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 10 2 0 0 0";
        assert_eq!(of_stat(line), Some((5, 10, 2)));
        assert_eq!(of_stat("7 (x) S 1"), None);
    }
}
