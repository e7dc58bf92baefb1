//! Restartable sequences: a thread stopped inside one by a checkpoint is
//! aborted out of it as a preemption would (its handler runs), never left
//! to finish it unguarded, both when the dump leaves it running and after
//! a restore.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const RSEQ_LOOP: &str = env!("CARGO_BIN_EXE_rseq_loop");

/// (aborted, completed) sequences so far; fails on the `bad` marker.
fn status(ctl: &std::path::Path) -> Option<(u64, u64)> {
    assert!(
        !ctl.join("bad").exists(),
        "a sequence ran to its end unguarded"
    );
    let t = std::fs::read_to_string(ctl.join("status")).ok()?;
    let (a, c) = t.split_once(' ')?;
    Some((a.parse().ok()?, c.parse().ok()?))
}

/// Waits until `more` more sequences ended, either way.
fn progress(ctl: &std::path::Path, more: u64) {
    let start = status(ctl).map_or(0, |(a, c)| a + c);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if status(ctl).is_some_and(|(a, c)| a + c >= start + more) {
            return;
        }
        assert!(Instant::now() < deadline, "no progress: {:?}", status(ctl));
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_restartable_sequence_is_aborted_not_left_unguarded() {
    if !cr_ebpf_perf::privileged("a_restartable_sequence_is_aborted_not_left_unguarded") {
        return;
    }
    let s = Scratch::new("rseq");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new(RSEQ_LOOP)
            .arg(&ctl)
            .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    progress(&ctl, 3);
    // The thread is inside its sequence nearly all the time: each dump
    // stops it there.
    for i in 0..5 {
        let opts = DumpOptions {
            leave_running: true,
            ..DumpOptions::default()
        };
        dump(pid, &s.0.join(format!("run-{i}")), &opts).expect("dump, left running");
        progress(&ctl, 2);
    }
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    progress(&ctl, 5);
    let (aborted, completed) = status(&ctl).unwrap();
    assert!(aborted > 0 && completed > 0, "{aborted} {completed}");
}
