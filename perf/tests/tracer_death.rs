//! The process survives cr-ebpf's death in the middle of an injected call.
//!
//! `inject_and_die` freezes the self-checking `mtwork`, injects a call
//! into one of its threads through the `rt_sigreturn` trampoline, stops
//! after each step of the injection in turn and dies by SIGKILL, as
//! cr-ebpf killed at that instant would. Each time the process must run on,
//! not stopped, with every thread making progress and its own state intact
//! (`mtwork` checks its threads, files, pipe, timer, blocked and pending
//! signals when asked with SIGUSR1).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use cr_ebpf_perf::{spawn_clean, stop, wait_line, KillOnDrop, Scratch};

const MTWORK: &str = env!("CARGO_BIN_EXE_mtwork");
const INJECT_AND_DIE: &str = env!("CARGO_BIN_EXE_inject_and_die");

/// The scheduler state letter of `pid` (`R`, `S`, `T`, `Z`, ...).
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

#[test]
fn a_tracer_killed_at_any_step_of_an_injection_leaves_the_process_whole() {
    if !cr_ebpf_perf::privileged(
        "a_tracer_killed_at_any_step_of_an_injection_leaves_the_process_whole",
    ) {
        return;
    }
    let s = Scratch::new("tracer-death");
    let log = s.0.join("log");
    let mut child = spawn_clean(
        Command::new(MTWORK)
            .arg(&log)
            .args(["4", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    wait_line(&log, 0, "tick 3 ");
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    // The main thread (sleeping between ticks, with an alternate stack),
    // then others: sleeping, blocked on a futex, spinning, in poll.
    for thread in 0..threads.min(6) {
        for step in 0..5 {
            let out = Command::new(INJECT_AND_DIE)
                .args([pid.to_string(), thread.to_string(), step.to_string()])
                .stderr(Stdio::inherit())
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.starts_with("trampoline "),
                "thread {thread} step {step}: {said:?} ({:?})",
                out.status
            );
            std::thread::sleep(Duration::from_millis(100));
            let st = state(pid);
            assert!(
                matches!(st, 'R' | 'S' | 'D'),
                "thread {thread} step {step}: the process is in state {st} ({said})"
            );
            // Every thread still makes progress and the state is whole.
            let before = std::fs::read_to_string(&log).unwrap().lines().count();
            // SAFETY: plain kill.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            let verdict = wait_line(&log, before, "usr1 ");
            assert_eq!(verdict, "usr1 ok", "thread {thread} step {step}: {said}");
        }
    }
    assert!(child.try_wait().unwrap().is_none(), "the process ended");
    stop(pid);
}
