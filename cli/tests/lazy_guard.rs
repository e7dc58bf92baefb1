//! `restore --lazy` whose restorer is killed with SIGKILL before every
//! page is in: the restored process must not run on with the pages still
//! due reading as zeroes. Its guardian kills it instead (SIGKILL, with a
//! message on the restorer's standard error); a process whose memory was
//! all in before the kill runs on whole (it checks every page itself).
//!
//! This test process is a child subreaper, so the restored process, whose
//! parent was the killed restorer, is reaped here and its end is seen.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::Stdio,
    time::{Duration, Instant},
};

mod common;

use common::{clean, root, BIN};
use cr_ebpf_perf::{wait_for_file, Scratch};

/// Fills 256 MiB with pages that name themselves; on SIGUSR1 checks them
/// all and writes `ok` or `BAD` next to its ready file.
const WORKLOAD: &str = r#"
import hashlib, signal, sys, time
n = 256 << 20
b = bytearray(n)
for i in range(0, n, 4096):
    b[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
want = hashlib.sha256(b).hexdigest()
def check(*_):
    good = hashlib.sha256(b).hexdigest() == want
    open(sys.argv[1] + ".check", "w").write("ok" if good else "BAD")
signal.signal(signal.SIGUSR1, check)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(0.05)
"#;

/// How a restored process ended up after its restorer was killed.
enum Outcome {
    /// Killed by SIGKILL while pages were still due.
    Killed,
    /// Running, every page checked good (the fill ended before the kill).
    Whole,
}

fn trial(s: &Scratch, i: usize) -> Outcome {
    let ready = s.0.join(format!("ready-{i}"));
    let img = s.0.join(format!("img-{i}"));
    let mut w = clean("/usr/bin/python3")
        .args(["-c", WORKLOAD])
        .arg(&ready)
        .spawn()
        .expect("python3");
    wait_for_file(&ready);
    let out = std::process::Command::new(BIN)
        .args(["dump", "--pid", &w.id().to_string(), "--images-dir"])
        .arg(&img)
        .output()
        .expect("dump");
    assert!(
        out.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = w.wait();
    // The store read from the disk, not the page cache: a slow fill.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let mut r = std::process::Command::new(BIN)
        .args(["restore", "--lazy", "--detach", "--json", "--images-dir"])
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("restore");
    let mut first = String::new();
    BufReader::new(r.stdout.take().unwrap())
        .read_line(&mut first)
        .expect("restore's first line");
    let v: serde_json::Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("restore's first line {first:?}: {e}"));
    let pid = v["pid"].as_i64().expect("pid") as i32;
    // Right away: the fill has just begun.
    r.kill().unwrap();
    r.wait().unwrap();
    let mut err = String::new();
    r.stderr.take().unwrap().read_to_string(&mut err).unwrap();

    // The guardian acts at once; a process still there after 2 s had all
    // its memory before the kill.
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(2) {
        let mut status = 0;
        // SAFETY: waits for a descendant reparented to us.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
                "restored process {pid} ended by itself with status {status:#x}, not killed: \
                 it ran on with memory it did not have; restorer said: {err}"
            );
            assert!(
                err.contains("killed it"),
                "the guardian did not say it killed {pid}: {err}"
            );
            return Outcome::Killed;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let check = ready.with_extension("check");
    // SAFETY: a signal to the restored process, ours to test.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let asked = Instant::now();
    while !check.exists() && asked.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = std::fs::read_to_string(&check).unwrap_or_default();
    // SAFETY: as above; the trial is over.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let mut status = 0;
    // SAFETY: reaps it.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        said, "ok",
        "restored process {pid} runs on after its restorer was killed, and its memory \
         is not what it was (its own check says {said:?}); restorer said: {err}"
    );
    Outcome::Whole
}

#[test]
fn a_lazy_restore_whose_restorer_is_killed_never_runs_on_zeroes() {
    if !root("a_lazy_restore_whose_restorer_is_killed_never_runs_on_zeroes") {
        return;
    }
    let s = Scratch::needing("lazy-guard", 1);
    // SAFETY: makes this test process the reaper of its orphans.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
    let (mut killed, mut whole) = (0, 0);
    for i in 0..3 {
        match trial(&s, i) {
            Outcome::Killed => killed += 1,
            Outcome::Whole => whole += 1,
        }
        let _ = std::fs::remove_dir_all(s.0.join(format!("img-{i}")));
    }
    eprintln!("lazy restorer killed: {killed} restored processes killed, {whole} whole");
    assert!(
        killed > 0,
        "every fill ended before its restorer was killed: the guardian was not exercised"
    );
    // The guardians, orphaned by their restorers, end here: reap them.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: reaps ended descendants of this test process.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    let left = std::process::Command::new("pgrep")
        .args(["-x", "cr-ebpf-guard"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "guardians left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
