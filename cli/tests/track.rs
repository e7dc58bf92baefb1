//! `cr-ebpf track` end to end: periodic checkpoints, a snapshot on request
//! over the control socket, and SIGKILL of the service in the middle of
//! checkpointing: the target keeps running, and the newest published
//! checkpoint restores to a state the target really was in.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

mod common;

use common::{clean, complete_lines, restore_detached, root, state_of, workload_bin, BIN};

fn epochs_bin(test: &str) -> Option<PathBuf> {
    workload_bin("epochs", test)
}

fn wait_for(log: &Path, what: &str, pred: impl Fn(&[String]) -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = pred(&complete_lines(log)) {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cr-ebpf ARGS PATH`, requires success, and parses its JSON output.
fn cr_ebpf_json(args: &[&str], path: &Path) -> serde_json::Value {
    let out = Command::new(BIN).args(args).arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "cr-ebpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Asks for a `now` line and returns (epoch, state).
fn now(pid: i32, log: &Path) -> (u64, String) {
    let before = complete_lines(log)
        .iter()
        .filter(|l| l.starts_with("now "))
        .count();
    assert!(signal(pid, libc::SIGUSR2), "process {pid} is gone");
    let l = wait_for(log, "a now line", |ls| {
        ls.iter()
            .filter(|l| l.starts_with("now "))
            .nth(before)
            .cloned()
    });
    let mut it = l.splitn(3, ' ');
    it.next();
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().to_string(),
    )
}

/// `ADDR+LEN=SUM` map entries as `+LEN=SUM`.
fn without_addresses(state: &str) -> String {
    state
        .split(' ')
        .map(|w| {
            let (open, word) = match w.strip_prefix('[') {
                Some(rest) => ("[", rest),
                None => ("", w),
            };
            match word.split_once('+') {
                Some((addr, rest)) if u64::from_str_radix(addr, 16).is_ok() => {
                    format!("{open}+{rest}")
                }
                _ => w.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn epoch_state(log: &Path, k: u64) -> Option<String> {
    if k == 0 {
        return None;
    }
    complete_lines(log).iter().find_map(|l| {
        let rest = l.strip_prefix(&format!("epoch {k} "))?;
        Some(rest.split_once(" pages ")?.0.to_string())
    })
}

#[test]
fn track_snapshots_on_request_and_survives_its_own_sigkill() {
    let test = "track_snapshots_on_request_and_survives_its_own_sigkill";
    let Some(epochs) = epochs_bin(test) else {
        return;
    };
    let dir = common::fresh_dir("cr-ebpf-track");
    let log = dir.join("epochs.log");
    let images = dir.join("images");
    let mut cmd = clean(&epochs);
    // `layout`: each epoch also maps, unmaps, opens or closes something,
    // which the service registers early from the log.
    cmd.arg(&log)
        .args(["256", "100", "layout"])
        .stdin(Stdio::null());
    let mut workload = cmd.spawn().unwrap();
    let pid = workload.id() as i32;
    wait_for(&log, "the workload", |ls| ls.first().cloned());

    let mut cmd = clean(BIN);
    cmd.args([
        "track",
        "--pid",
        &pid.to_string(),
        "--interval",
        "100ms",
        "--keep",
        "4",
    ])
    .arg("--json")
    .arg("--images-dir")
    .arg(&images)
    .stdout(Stdio::piped());
    let mut track = cmd.spawn().unwrap();
    let mut out = BufReader::new(track.stdout.take().unwrap());
    let mut read_report = || -> serde_json::Value {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let first = read_report();
    assert_eq!(first["method"], "full");
    let second = read_report();
    assert_eq!(second["method"], "uffd-wp");
    assert_eq!(second["parent"], first["id"]);

    // A snapshot on request, through the control socket.
    let v = cr_ebpf_json(
        &["snapshot", "--incremental", "--json", "--images-dir"],
        &images,
    );
    assert_eq!(v["ok"], true);
    assert_eq!(v["method"], "uffd-wp");
    assert!(v["freeze_ms"].as_f64().unwrap() > 0.0);

    // Only the owner may use the control socket.
    let mut other = Command::new(BIN);
    other
        .args(["snapshot", "--incremental", "--images-dir"])
        .arg(&images);
    std::os::unix::process::CommandExt::uid(&mut other, 65534);
    let denied = other.output().unwrap();
    assert!(!denied.status.success());
    let why = String::from_utf8_lossy(&denied.stderr);
    assert!(why.contains("belongs to another user"), "{why}");

    // Epochs keep the workload writing while the service checkpoints it.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                signal(pid, libc::SIGUSR1);
                std::thread::sleep(Duration::from_millis(15));
            }
        });
        for _ in 0..4 {
            read_report();
        }
        // Somewhere inside the next checkpoint (they take tens of ms).
        let jitter = (std::process::id() % 7) as u64 * 9;
        std::thread::sleep(Duration::from_millis(100 + jitter));
        track.kill().unwrap();
        let _ = track.wait();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
    });
    // The target was not left stopped, and answers.
    let st = state_of(pid);
    assert!(!matches!(st, 't' | 'T' | 'Z' | 'X'), "target state {st}");
    let (k, state) = now(pid, &log);
    assert_eq!(epoch_state(&log, k), Some(state), "target consistent");
    workload.kill().unwrap();
    let _ = workload.wait();

    // The chain is readable and its newest checkpoint restores.
    let chain = cr_ebpf_json(&["inspect", "--json"], &images);
    let n = chain["checkpoints"].as_array().unwrap().len();
    assert!((2..=9).contains(&n), "{n} checkpoints kept with --keep 4");
    // The restored process inherits our stdio: its report goes to a file
    // (a pipe would stay open as long as the restored process runs).
    let report = dir.join("restore.err");
    let mut cmd = clean(BIN);
    cmd.args(["restore", "--detach", "--images-dir"])
        .arg(&images)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&report).unwrap());
    let status = cmd.status().unwrap();
    let err = std::fs::read_to_string(&report).unwrap();
    assert!(status.success(), "{err}");
    let restored: i32 = err
        .split("restored pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {err}"));
    assert_eq!(restored, pid);
    let (k, state) = now(pid, &log);
    // The checkpoint may have caught the process inside an epoch: the
    // restored process then redoes the rest of it, and a mapping it creates
    // may land elsewhere (the kernel picks the address), so addresses of
    // mappings are left out here (the library tests compare them).
    assert_eq!(
        epoch_state(&log, k).map(|s| without_addresses(&s)),
        Some(without_addresses(&state)),
        "the restored process is in a state epoch {k} really had"
    );
    signal(pid, libc::SIGKILL);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_process_that_execs_is_tracked_across_the_exec_and_restores_as_the_new_program() {
    let test = "a_process_that_execs_is_tracked_across_the_exec_and_restores_as_the_new_program";
    if !root(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-exec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Waits without a child process (a child is a process tree, which
    // checkpoints refuse), then execs.
    // Debian's python3 itself (a version manager's shim on PATH would fork
    // helpers while the tracking starts).
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| !p.starts_with('/') || std::path::Path::new(p).exists())
        .unwrap();
    let mut cmd = clean(python);
    cmd.args([
        "-c",
        "import os,signal,time\nsignal.signal(signal.SIGUSR1, lambda *a: None)\n\
         time.sleep(1)\nos.execv('/bin/sleep', ['sleep', '60'])",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let out = Command::new(BIN)
        .args(["track", "--pid", &pid.to_string(), "--interval", "300ms"])
        .args(["--count", "8", "--json", "--images-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with("sleep"),
        "the exec happened: {}",
        exe.display()
    );
    // The exec reset python's handlers (SIGINT, SIGUSR1): none caught now.
    let caught = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:").map(|v| v.trim().to_string()))
            .unwrap()
    };
    let before = caught(pid);
    assert_eq!(before, "0000000000000000", "sleep catches nothing");
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 8);
    assert!(
        reports.last().unwrap()["method"] == "uffd-wp"
            && reports.last().unwrap()["inherited_mappings"].as_u64() > Some(0),
        "after the exec, checkpoints are incremental again: {reports:?}"
    );
    child.kill().unwrap();
    let _ = child.wait();
    restore_detached(&dir);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with("sleep"),
        "restored as the new program: {}",
        exe.display()
    );
    let st = state_of(pid);
    assert!(matches!(st, 'S' | 'R'), "restored sleep runs: {st}");
    // Not python's handlers from before the exec, at addresses of a
    // program that is gone.
    assert_eq!(caught(pid), before, "signal handlers after the restore");
    signal(pid, libc::SIGKILL);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process replacing its memory again and again while `track` starts
/// (an exec between reading its maps and its pagemap, in the pre-copy
/// that runs with the process running): tracking goes on, the exec's new
/// memory is stored whole, and the newest checkpoint restores as the
/// program it became.
#[test]
fn execs_during_the_pre_copy_do_not_end_the_tracking() {
    let test = "execs_during_the_pre_copy_do_not_end_the_tracking";
    if !root(test) {
        return;
    }
    let base = common::fresh_dir("cr-ebpf-execs");
    let script = base.join("again.sh");
    std::fs::write(
        &script,
        "n=${1:-0}\n[ \"$n\" -lt 1500 ] && exec /bin/sh \"$0\" $((n+1))\nexec sleep 60\n",
    )
    .unwrap();
    // Each trial had about one chance in five to fail before the fix.
    for trial in 0..8 {
        let dir = base.join(format!("images-{trial}"));
        let mut child = clean("/bin/sh")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let out = Command::new(BIN)
            .args(["track", "--pid", &pid.to_string(), "--interval", "100ms"])
            .args(["--count", "6", "--images-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "trial {trial}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Done exec'ing: one more checkpoint of the program it became.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .ends_with("sleep")
        {
            assert!(Instant::now() < deadline, "the execs end");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = Command::new(BIN)
            .args(["track", "--pid", &pid.to_string(), "--interval", "100ms"])
            .args(["--count", "1", "--images-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        child.kill().unwrap();
        let _ = child.wait();
        restore_detached(&dir);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.ends_with("sleep"), "restored: {}", exe.display());
        assert!(matches!(state_of(pid), 'S' | 'R'), "restored sleep runs");
        signal(pid, libc::SIGKILL);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Becomes a child subreaper, then registers for expedited membarriers
/// once told (file `go`), then keeps its capabilities across uid changes
/// (a securebit) once told again (`go2`), then sleeps; on SIGUSR1 says
/// what the kernel holds for the three.
const FLAGS: &str = r#"
import ctypes, os, signal, sys, time
log, go = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
def say(line):
    with open(log, "a") as f:
        f.write(line + "\n")
def on_usr1(s, f):
    v = ctypes.c_int(0)
    libc.prctl(37, ctypes.byref(v), 0, 0, 0)
    say("subreaper %d membarrier %#x securebits %#x" % (
        v.value, libc.syscall(324, 1 << 9, 0, 0), libc.prctl(27, 0, 0, 0, 0)))
signal.signal(signal.SIGUSR1, on_usr1)
libc.prctl(36, 1, 0, 0, 0)
say("ready")
while not os.path.exists(go):
    time.sleep(0.01)
say("registered %d" % libc.syscall(324, 1 << 4, 0, 0))
while not os.path.exists(go + "2"):
    time.sleep(0.01)
say("keeping capabilities %d" % libc.prctl(28, 1 << 4, 0, 0, 0))
while True:
    time.sleep(1)
"#;

/// Settings only the process can be asked for, which checkpoints reuse
/// while the log shows no call that changes them: one set before the
/// tracking is carried over, one changed between two checkpoints is asked
/// again, and the restore has both.
#[test]
fn a_subreaper_membarrier_and_securebits_set_while_tracked_are_restored() {
    let test = "a_subreaper_membarrier_and_securebits_set_while_tracked_are_restored";
    if !root(test) {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-flags");
    let (log, go, images) = (dir.join("log"), dir.join("go"), dir.join("images"));
    let mut py = clean("/usr/bin/python3")
        .args(["-c", FLAGS])
        .arg(&log)
        .arg(&go)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = py.id() as i32;
    wait_for(&log, "the workload", |ls| ls.first().cloned());
    let mut track = clean(BIN)
        .args([
            "track",
            "--pid",
            &pid.to_string(),
            "--interval",
            "200ms",
            "--json",
        ])
        .arg("--images-dir")
        .arg(&images)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(track.stdout.take().unwrap());
    // Reads reports until `n` more checkpoints were made.
    let mut checkpoints = |n: usize| {
        let mut seen = 0;
        while seen < n {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let r: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            seen += usize::from(r.get("seq").is_some());
        }
    };
    // Two checkpoints before the change: the second reuses the answers.
    checkpoints(2);
    std::fs::write(&go, "").unwrap();
    let said = wait_for(&log, "the registration", |ls| {
        ls.iter().find(|l| l.starts_with("registered")).cloned()
    });
    assert_eq!(said, "registered 0", "membarrier registration");
    checkpoints(2);
    // Then a securebit (SECBIT_KEEP_CAPS), by prctl.
    std::fs::write(dir.join("go2"), "").unwrap();
    let said = wait_for(&log, "the securebit", |ls| {
        ls.iter().find(|l| l.starts_with("keeping")).cloned()
    });
    assert_eq!(said, "keeping capabilities 0", "PR_SET_SECUREBITS");
    checkpoints(2);
    signal(track.id() as i32, libc::SIGINT);
    assert!(track.wait().unwrap().success());
    py.kill().unwrap();
    let _ = py.wait();
    restore_detached(&images);
    signal(pid, libc::SIGUSR1);
    let state = wait_for(&log, "the restored state", |ls| {
        ls.iter().find(|l| l.starts_with("subreaper")).cloned()
    });
    signal(pid, libc::SIGKILL);
    // Registered for private expedited (bit 4): GET_REGISTRATIONS says so.
    assert_eq!(state, "subreaper 1 membarrier 0x10 securebits 0x10");
    let _ = std::fs::remove_dir_all(&dir);
}

fn spawn_sleep(secs: &str) -> std::process::Child {
    clean("/bin/sleep")
        .arg(secs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn fds_of(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{:?} {:?}",
                e.file_name(),
                std::fs::read_link(e.path()).ok()
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn ctrl_c_detaches_untouched_and_an_exit_ends_the_service() {
    let test = "ctrl_c_detaches_untouched_and_an_exit_ends_the_service";
    if !root(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-detach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sleeper = spawn_sleep("60");
    let pid = sleeper.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    let fds = fds_of(pid);
    let mut track = Command::new(BIN)
        .args([
            "track",
            "--pid",
            &pid.to_string(),
            "--interval",
            "200ms",
            "--images-dir",
        ])
        .arg(dir.join("a"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(track.stdout.take().unwrap());
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ckpt-"), "{line:?}");
    }
    signal(track.id() as i32, libc::SIGINT);
    let done = track.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{err}");
    assert!(err.contains("runs on untouched"), "{err}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "no tracer left: {status}");
    assert_eq!(state_of(pid), 'S');
    assert_eq!(fds_of(pid), fds, "no descriptor left in the process");
    sleeper.kill().unwrap();
    let _ = sleeper.wait();

    // A process that exits ends the service, with a final status.
    let mut short = spawn_sleep("1");
    let pid = short.id() as i32;
    let t = Instant::now();
    let done = Command::new(BIN)
        .args([
            "track",
            "--pid",
            &pid.to_string(),
            "--interval",
            "200ms",
            "--images-dir",
        ])
        .arg(dir.join("b"))
        .output()
        .unwrap();
    let _ = short.wait();
    let err = String::from_utf8_lossy(&done.stderr);
    // 4: ended because the process is gone, told apart from a detach.
    assert_eq!(done.status.code(), Some(4), "{err}");
    assert!(err.contains(&format!("process {pid} exited")), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn addresses_are_left_out_of_compared_states() {
    assert_eq!(
        without_addresses("sum 5 maps [7f00a000+8192=9 7f10b000+4096=3 ] fds [4=2 ]"),
        "sum 5 maps [+8192=9 +4096=3 ] fds [4=2 ]"
    );
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

/// Without `--keep` a chain is bounded all the same (the newest 20 are
/// kept); `--keep-for` merges away what is older than it, the newest
/// always kept; `--keep all` keeps every checkpoint; `--max-disk` keeps
/// the directory within a size.
#[test]
fn retention_bounds_a_chain_by_default_and_by_age() {
    if !root("retention_bounds_a_chain_by_default_and_by_age") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut sleeper = spawn_sleep("600");
    let pid = sleeper.id() as i32;
    let run = |images: &Path, extra: &[&str], count: &str| {
        let out = Command::new(BIN)
            .args(["track", "--pid", &pid.to_string(), "--interval", "100ms"])
            .args(["--count", count])
            .args(extra)
            .arg("--images-dir")
            .arg(images)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let chain = cr_ebpf_json(&["inspect", "--json"], images);
        chain["checkpoints"].as_array().unwrap().len()
    };
    // 45 taken, the newest 20 kept.
    assert_eq!(run(&dir.join("default"), &[], "45"), 20);
    // Every one kept when asked.
    assert_eq!(run(&dir.join("all"), &["--keep", "all"], "25"), 25);
    // Of 30 taken over about 3 s, those older than 1 s go (the young ones
    // and a batch at most: fewer than 30, more than 0).
    let n = run(&dir.join("age"), &["--keep-for", "1s"], "30");
    assert!((1..30).contains(&n), "{n} kept with --keep-for 1s");
    // A disk budget of three full checkpoints: older ones merged away.
    let full = dir_size(&dir.join("all").join("ckpt-000001"));
    let budget = (3 * full).to_string();
    let n = run(
        &dir.join("disk"),
        &["--keep", "all", "--max-disk", &budget],
        "30",
    );
    let used = dir_size(&dir.join("disk"));
    assert!(
        n < 30 && used <= 3 * full,
        "{n} kept, {used} bytes with --max-disk {budget}"
    );
    // The newest restores after retention.
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    restore_detached(&dir.join("age"));
    assert!(signal(pid, libc::SIGKILL), "restored");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sets a parent-death signal on SIGUSR1 (its parent, the test, is not
/// tracked with it: its checkpoints are refused from then on).
const REFUSE_ON_USR1: &str = "import ctypes, signal, time
libc = ctypes.CDLL(None)
signal.signal(signal.SIGUSR1, lambda s, f: libc.prctl(1, 15))
while True:
    time.sleep(1)
";

/// One HTTP scrape of `port`: the response, head and body.
fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("the metrics port answers");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of sample `name` in the exposition `text`.
fn sample(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    line[name.len() + 1..].parse().unwrap()
}

/// One request line on the control socket of `dir`, its JSON answer.
fn control(dir: &Path, request: &str) -> serde_json::Value {
    use std::io::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("control.sock")).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// `track --metrics ADDR` answers an HTTP scrape with its counters in
/// Prometheus' text format; the control socket answers `status` and
/// rejects what it does not know; a checkpoint refused through it is
/// exit status 3 with a JSON error for `snapshot --incremental --json`,
/// counted as a failure, the process left running.
#[test]
fn track_serves_its_metrics_for_prometheus() {
    if !root("track_serves_its_metrics_for_prometheus") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut service = clean("/usr/bin/python3")
        .args(["-c", REFUSE_ON_USR1])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = service.id() as i32;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut track = Command::new(BIN)
        .args(["track", "--pid", &pid.to_string(), "--interval", "200ms"])
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--images-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(track.stdout.take().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ckpt-"), "{line:?}");
    }
    let text = scrape(port);
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4"),
        "{text}"
    );
    let value = |name: &str| sample(&text, name);
    let taken = value("cr_ebpf_checkpoints_total");
    assert!(taken >= 3.0, "{text}");
    assert_eq!(value("cr_ebpf_freeze_seconds_count"), taken);
    assert_eq!(value("cr_ebpf_freeze_seconds_bucket{le=\"+Inf\"}"), taken);
    assert!(value("cr_ebpf_freeze_seconds_sum") > 0.0, "{text}");
    assert_eq!(value("cr_ebpf_tracked_processes"), 1.0);
    assert_eq!(value("cr_ebpf_checkpoint_failures_total"), 0.0);
    assert!(value("cr_ebpf_bytes_total") > 0.0);
    assert!(value("cr_ebpf_pages_total") > 0.0);
    assert!(value("cr_ebpf_lost_fault_records_total") >= 0.0);

    // The control socket's other request, and one it does not know.
    let status = control(&dir, "status");
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["pid"], pid, "{status}");
    assert!(status["checkpoints"].as_u64() >= Some(3), "{status}");
    assert_eq!(status["images_dir"], dir.display().to_string(), "{status}");
    let unknown = control(&dir, "restart");
    assert_eq!(unknown["ok"], false, "{unknown}");
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("unknown request"),
        "{unknown}"
    );

    // Refused from now on.
    signal(pid, libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    let refused = Command::new(BIN)
        .args(["snapshot", "--incremental", "--json", "--images-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{err}");
    let said: serde_json::Value = serde_json::from_slice(&refused.stdout).expect("a JSON error");
    assert_eq!(
        (said["ok"].clone(), said["refused"].clone()),
        (false.into(), true.into())
    );
    assert!(
        said["error"]
            .as_str()
            .unwrap()
            .contains("parent-death signal"),
        "{said}"
    );
    // Not left stopped: track goes on freezing it every 200 ms (each
    // attempt refused again), so one look may catch it in such a freeze;
    // it must be seen running between them, and never dead.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let st = state_of(pid);
        assert!(!matches!(st, 'Z' | 'X'), "target state {st}");
        if !matches!(st, 't' | 'T') {
            break;
        }
        assert!(Instant::now() < deadline, "target held stopped: {st}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let text = scrape(port);
    assert!(
        sample(&text, "cr_ebpf_checkpoint_failures_total") >= 1.0,
        "{text}"
    );
    signal(track.id() as i32, libc::SIGINT);
    assert!(track.wait().unwrap().success());
    service.kill().unwrap();
    let _ = service.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Toggles the kernel's action for SIGUSR1 between ignoring it and a
/// handler every half millisecond for `SECS` seconds (recording which it
/// set last), then keeps still. After a SIGUSR2 it prints, between two
/// toggles, what the kernel holds for SIGUSR1 (read with `sigaction`) and
/// what it set last.
const TOGGLER: &str = r#"
import ctypes, signal, sys, time
log, secs = sys.argv[1], float(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
last = [0]
asked = [False]
def on_usr1(s, f):
    pass
def on_usr2(s, f):
    asked[0] = True
def answer():
    # Between two toggles, where the kernel's action and `last` agree.
    if not asked[0]:
        return
    asked[0] = False
    act = (ctypes.c_char * 152)()
    libc.sigaction(signal.SIGUSR1, None, act)
    ign = ctypes.c_void_p.from_buffer(act).value == 1
    with open(log, "a") as f:
        f.write("kernel %s set %s\n" % ("ignore" if ign else "handler", "ignore" if last[0] else "handler"))
signal.signal(signal.SIGUSR2, on_usr2)
with open(log, "a") as f:
    f.write("ready\n")
end = time.monotonic() + secs
i = 0
while time.monotonic() < end:
    answer()
    i += 1
    signal.signal(signal.SIGUSR1, signal.SIG_IGN if i % 2 else on_usr1)
    last[0] = i % 2
    time.sleep(0.0005)
while True:
    answer()
    time.sleep(0.05)
"#;

/// The first checkpoint of `track` reuses what it collected while the
/// process ran (the warm-up), re-asking what the log shows changed since:
/// a process changing a signal action all the while comes back with the
/// action it had at the checkpoint.
#[test]
fn the_first_checkpoint_sees_what_changed_after_the_warm_up() {
    let test = "the_first_checkpoint_sees_what_changed_after_the_warm_up";
    if !root(test) {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-warm");
    for round in 0..4 {
        let log = dir.join(format!("log-{round}"));
        let images = dir.join(format!("images-{round}"));
        let mut w = clean("/usr/bin/python3")
            .args(["-c", TOGGLER])
            .arg(&log)
            .arg("6")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = w.id() as i32;
        wait_for(&log, "ready", |l| l.iter().find(|x| *x == "ready").cloned());
        let out = Command::new(BIN)
            .args([
                "track",
                "--pid",
                &pid.to_string(),
                "--count",
                "1",
                "--images-dir",
            ])
            .arg(&images)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "track: {err}");
        assert!(err.contains("collected its state while it ran"), "{err}");
        signal(pid, libc::SIGKILL);
        let _ = w.wait();
        let mut r = Command::new(BIN)
            .args(["restore", "--detach", "--images-dir"])
            .arg(&images)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(r.wait().unwrap().success(), "restore");
        signal(pid, libc::SIGUSR2);
        let line = wait_for(&log, "the answer", |l| {
            l.iter().find(|x| x.starts_with("kernel ")).cloned()
        });
        signal(pid, libc::SIGKILL);
        // Ours now: the restore made it our child.
        // SAFETY: reaping it.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[1], words[3], "round {round}: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The newest checkpoint's `manifest.img` deleted: `inspect` lists it as
/// damaged, `restore` refuses it naming the one before (never restores
/// that one in its place), and `track` in that directory goes on with a
/// full checkpoint after it.
#[test]
fn a_damaged_newest_checkpoint_is_never_skipped_silently() {
    if !root("a_damaged_newest_checkpoint_is_never_skipped_silently") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-damaged-newest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let track = |pid: i32, count: &str| {
        let out = Command::new(BIN)
            .args(["track", "--pid", &pid.to_string(), "--interval", "100ms"])
            .args(["--count", count, "--images-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "track: {err}");
    };
    let mut first = spawn_sleep("600");
    let pid = first.id() as i32;
    track(pid, "2");
    first.kill().unwrap();
    first.wait().unwrap();
    std::fs::remove_file(dir.join("ckpt-000002").join("manifest.img")).unwrap();

    let chain = cr_ebpf_json(&["inspect", "--json"], &dir);
    let ids: Vec<&str> = chain["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ckpt-000001"], "{chain}");
    assert_eq!(chain["damaged"], serde_json::json!(["ckpt-000002"]));
    let out = Command::new(BIN).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("ckpt-000002: damaged"),
        "{text}"
    );

    // Refused, naming the one before; nothing restored.
    let out = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ckpt-000002 holds no image") && err.contains("--checkpoint ckpt-000001"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the checkpoint before was restored in its place"
    );

    // track goes on in that directory: a full checkpoint after the damaged one.
    let mut second = spawn_sleep("600");
    track(second.id() as i32, "1");
    second.kill().unwrap();
    second.wait().unwrap();
    let chain = cr_ebpf_json(&["inspect", "--json"], &dir);
    let newest = chain["checkpoints"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(newest["id"], "ckpt-000003", "{chain}");
    assert!(newest["parent"].is_null(), "{chain}");
    assert_eq!(chain["damaged"], serde_json::json!(["ckpt-000002"]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A seqpacket pair with an empty message queued between two others;
/// once `ctl/drain` exists it reads them all and writes what it read (as
/// Python's repr) to `ctl/out`.
const EMPTY_MESSAGE: &str = r#"
import os, socket, sys, time
ctl = sys.argv[1]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
for m in [b'one', b'', b'three']:
    b.send(m)
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'drain')):
    time.sleep(0.02)
got = [a.recv(64) for _ in range(3)]
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write(repr(got))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
while True:
    time.sleep(0.05)
"#;

/// An empty message on a seqpacket queue is kept by the first checkpoint;
/// the kernel then passes over it in every later read of the queue (it is
/// marked peeked), so the checkpoints after it are refused, the process
/// left running with its queue whole, until the queue has emptied. They
/// stored the queue without it.
#[test]
fn an_empty_message_read_by_a_checkpoint_before_is_refused_not_lost() {
    if !root("an_empty_message_read_by_a_checkpoint_before_is_refused_not_lost") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-empty-msg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut w = clean("/usr/bin/python3")
        .args(["-c", EMPTY_MESSAGE])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = w.id() as i32;
    let w_guard = cr_ebpf_perf::KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let images = dir.join("images");
    let mut t = clean(BIN)
        .args(["track", "--pid", &pid.to_string(), "--interval", "100ms"])
        .arg("--images-dir")
        .arg(&images)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not left running when the test fails half-way.
    let t_guard = cr_ebpf_perf::KillOnDrop(t.id() as i32);
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    for out in [
        Box::new(t.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(t.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let mut seen = Vec::new();
    let mut wait_line = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!("no line {what} from track; it said: {seen:#?}"),
            }
        }
    };
    wait_line("of its first checkpoint", &|l| l.starts_with("ckpt-000001"));
    let refused = wait_line("refusing a checkpoint", &|l| {
        l.contains("checkpoint failed")
    });
    assert!(
        refused.contains("not supported: a unix socket queue that held an empty message"),
        "{refused}"
    );
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(images.join("ckpt-000001"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("8 bytes queued in 3 messages"), "{text}");
    // Read by the process: its queue was whole; the next checkpoint is taken.
    std::fs::write(ctl.join("drain"), b"").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("out"));
    assert_eq!(
        std::fs::read_to_string(ctl.join("out")).unwrap(),
        "[b'one', b'', b'three']"
    );
    wait_line("of a checkpoint after the queue emptied", &|l| {
        l.starts_with("ckpt-000002")
    });
    assert!(signal(t.id() as i32, libc::SIGINT));
    std::mem::forget(t_guard);
    let status = t.wait().unwrap();
    assert!(status.success(), "{status:?}");
    std::mem::forget(w_guard);
    w.kill().unwrap();
    w.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
