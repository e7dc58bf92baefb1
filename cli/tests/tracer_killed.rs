//! cr-ebpf killed at random instants never harms the process it works on:
//! `dump --leave-running` and `track` are started on the self-checking
//! `mtwork` (threads sleeping, blocked, spinning and polling, a timer, an
//! alternate signal stack, blocked and pending signals) and killed with
//! SIGKILL at a random instant of their first 100 ms, the freeze and the
//! injected calls included; every other `track` at a random instant of the
//! 100 ms after it says it pre-copied the memory (the state it asks while
//! the process runs, then the first freeze: a kill there resumed the
//! process with the registers of an injected call). After each kill the process must run (not
//! stopped, not dead), and its own check of every thread's progress and of
//! its state must pass.
//!
//! Trials: 25 of each command in CI; `CR_EBPF_LONG=1` runs 200 of each;
//! `CR_EBPF_FAULT_SEED` repeats a run.

use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{clean, workload_bin, BIN};
use cr_ebpf_perf::wait_line;

/// xorshift64*, seeded.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// What the process looks like after a kill: `None` when it is whole.
fn harm(pid: i32, log: &Path) -> Option<String> {
    std::thread::sleep(Duration::from_millis(100));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let st = stat
        .rsplit_once(") ")
        .and_then(|(_, r)| r.chars().next())
        .unwrap_or('?');
    if !matches!(st, 'R' | 'S' | 'D') {
        return Some(format!("state {st}"));
    }
    let before = std::fs::read_to_string(log).unwrap().lines().count();
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let verdict = wait_line(log, before, "usr1 ");
    (verdict != "usr1 ok").then_some(verdict)
}

/// Reads the standard error of a command to its end; the receiver hears
/// once it says it pre-copied the process's memory.
fn said_precopied(err: std::process::ChildStderr) -> std::sync::mpsc::Receiver<()> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("pre-copied") {
                let _ = tx.send(());
            }
        }
    });
    rx
}

fn start(mtwork: &Path, log: &Path) -> Child {
    let child = clean(mtwork)
        .arg(log)
        .args(["8", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_line(log, 0, "tick 3 ");
    child
}

#[test]
fn dump_and_track_killed_at_random_instants_never_harm_the_process() {
    let test = "dump_and_track_killed_at_random_instants_never_harm_the_process";
    let Some(mtwork) = workload_bin("mtwork", test) else {
        return;
    };
    let long = std::env::var("CR_EBPF_LONG").is_ok_and(|v| v == "1");
    let trials = if long { 200 } else { 25 };
    let seed = std::env::var("CR_EBPF_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| (std::process::id() as u64 * 0x9e37_79b9) | 1);
    eprintln!("tracer killed: seed {seed} (CR_EBPF_FAULT_SEED), {trials} trials of each command");
    let mut rng = Rng(seed);
    let dir = common::fresh_dir("cr-ebpf-killed");
    let mut harmed = Vec::new();
    for command in ["dump", "track"] {
        let (mut finished, mut cut) = (0, 0);
        let log = dir.join(format!("{command}.log"));
        // One process for every dump; a new one for each track (a track
        // killed between creating its userfaultfd in the process and
        // closing it there leaves it, which a later checkpoint refuses).
        let mut target = start(&mtwork, &log);
        for i in 0..trials {
            if command == "track" && i > 0 {
                let _ = target.kill();
                let _ = target.wait();
                let _ = std::fs::remove_file(&log);
                target = start(&mtwork, &log);
            }
            let pid = target.id() as i32;
            let images = dir.join(format!("{command}-{i}"));
            let mut cmd = std::process::Command::new(BIN);
            match command {
                "dump" => cmd.args(["dump", "--leave-running", "--pid"]),
                _ => cmd.args(["track", "--interval", "20ms", "--keep", "all", "--pid"]),
            };
            let mut c = cmd
                .arg(pid.to_string())
                .arg("--images-dir")
                .arg(&images)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let precopied = said_precopied(c.stderr.take().unwrap());
            // Every other track from its pre-copy on: the state asked while
            // the process runs and the first freeze follow it.
            if command == "track" && i % 2 == 1 {
                let _ = precopied.recv_timeout(Duration::from_secs(20));
            }
            std::thread::sleep(Duration::from_micros(rng.below(100_000)));
            if c.try_wait().unwrap().is_some() {
                finished += 1;
            } else {
                cut += 1;
            }
            let _ = c.kill();
            let _ = c.wait();
            if let Some(h) = harm(pid, &log) {
                harmed.push(format!("{command} trial {i}: {h}"));
                let _ = target.kill();
                let _ = target.wait();
                target = start(&mtwork, &log);
            }
            let _ = std::fs::remove_dir_all(&images);
        }
        eprintln!(
            "tracer killed, {command}: {trials} kills ({cut} while it ran, {finished} after it \
             ended), {} processes harmed",
            harmed.iter().filter(|h| h.starts_with(command)).count()
        );
        let _ = target.kill();
        let _ = target.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(harmed.is_empty(), "processes harmed: {harmed:#?}");
}

#[test]
fn a_stuck_dump_lets_the_process_go_at_its_freeze_limit() {
    let test = "a_stuck_dump_lets_the_process_go_at_its_freeze_limit";
    let Some(mtwork) = workload_bin("mtwork", test) else {
        return;
    };
    let dir = common::fresh_dir("cr-ebpf-stuck");
    let log = dir.join("log");
    let mut target = start(&mtwork, &log);
    let pid = target.id() as i32;
    // Stalled (by the fault-injection hook) in three phases, killing and not.
    for (stall, leave_running) in [
        ("reading the state of process", true),
        ("reading memory", false),
        ("writing the manifests", false),
    ] {
        let images = dir.join("image");
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["dump", "--freeze-limit", "1s", "--pid"])
            .arg(pid.to_string())
            .arg("--images-dir")
            .arg(&images)
            .env(cr_ebpf_checkpoint::STALL_ENV, stall);
        if leave_running {
            cmd.arg("--leave-running");
        }
        let t = Instant::now();
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stall}: {err}");
        assert!(
            !err.contains("pages, "),
            "a progress bar off a terminal: {err}"
        );
        assert!(
            err.contains(&format!("stuck {stall}")) && err.contains("--freeze-limit"),
            "{stall}: {err}"
        );
        assert!(took < Duration::from_secs(10), "{stall}: {took:?}");
        assert!(!images.exists(), "{stall}: an image was published");
        assert_eq!(harm(pid, &log), None, "{stall}: {err}");
    }
    // On a terminal, a dump that lasts shows its progress (here the stall
    // after the pages were written); off a terminal it does not (above).
    let images = dir.join("image");
    let line = format!(
        "{BIN} dump --freeze-limit 3s --pid {pid} --images-dir {}",
        images.display()
    );
    let out = std::process::Command::new("/usr/bin/script")
        .args(["-qec", &line, "/dev/null"])
        .env(cr_ebpf_checkpoint::STALL_ENV, "writing the manifests")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("writing pages") && shown.contains("100%"),
        "no progress bar on a terminal: {shown}"
    );
    assert!(!images.exists());
    assert_eq!(harm(pid, &log), None);
    let _ = target.kill();
    let _ = target.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dump killed while it writes leaves its temporary directory and its
/// pre-copy's next to the image (both holding the process's memory): the
/// next dump to the same place removes them.
#[test]
fn what_a_killed_dump_left_is_swept_by_the_next() {
    let test = "what_a_killed_dump_left_is_swept_by_the_next";
    let Some(mtwork) = workload_bin("mtwork", test) else {
        return;
    };
    let dir = common::fresh_dir("cr-ebpf-leftover");
    let log = dir.join("log");
    let mut target = start(&mtwork, &log);
    let pid = target.id() as i32;
    let images = dir.join("image");
    let leftovers = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".image.tmp-"))
            .collect();
        v.sort();
        v
    };
    let dump = || {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["dump", "--leave-running", "--pid"])
            .arg(pid.to_string())
            .arg("--images-dir")
            .arg(&images)
            .stdin(Stdio::null());
        cmd
    };
    // Held (the fault-injection hook) once its image is written, then killed.
    let mut c = dump()
        .env(cr_ebpf_checkpoint::STALL_ENV, "writing the manifests")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while leftovers().len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the dump never got there: {:?}",
            leftovers()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    let _ = c.wait();
    let left = leftovers();
    assert!(
        left.len() == 2 && left.iter().any(|n| n.ends_with("-precopy")),
        "a killed dump's directories: {left:?}"
    );
    assert_eq!(harm(pid, &log), None, "the process after the killed dump");
    let out = dump().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "left after the next dump"
    );
    assert!(images.join("manifest.img").exists());
    let _ = target.kill();
    let _ = target.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
