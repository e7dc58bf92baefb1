//! `cr-ebpf run`: a service started by it, killed with SIGKILL, is restored
//! from its newest checkpoint (same pid, its counter continued) and serves
//! on, tracked again; SIGTERM to `run` stops the service and `run` exits 0;
//! `run --resume` brings it back from its newest checkpoint; a service that
//! crashes before its first checkpoint is started again; with no restart
//! left, a crash makes `run` give up (exit status 5).

use std::{
    io::Read as _,
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{root, BIN};

/// A TCP service: each connection gets `COUNT PID` (connections so far).
const SERVICE: &str = r#"
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    c.sendall(f"{n} {os.getpid()}\n".encode())
    c.close()
"#;

/// `(count, pid)` from the service, trying for up to 20 s.
fn ask(port: u16) -> (u64, i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut s = String::new();
            if c.read_to_string(&mut s).is_ok() {
                let mut it = s.split_whitespace().map(|v| v.parse::<i64>().unwrap_or(-1));
                if let (Some(n), Some(p)) = (it.next(), it.next()) {
                    return (n as u64, p as i32);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the service never answered on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number of the newest checkpoint.
fn newest(dir: &Path) -> u64 {
    cr_ebpf_image::images_dir::list(dir).map_or(0, |l| l.last().map_or(0, |e| e.seq))
}

fn checkpoints(dir: &Path) -> usize {
    cr_ebpf_image::images_dir::list(dir).map_or(0, |l| l.len())
}

fn start_run(dir: &Path, port: u16, extra: &[&str]) -> Child {
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        "--interval",
        "200ms",
        "--backoff",
        "100ms",
        "--images-dir",
    ])
    .arg(dir)
    .args(extra)
    .args(["--", "/usr/bin/python3", "-c", SERVICE, &port.to_string()])
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    cr_ebpf_perf::workload(&mut cmd);
    cmd.spawn().unwrap()
}

fn wait_exit(run: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = run.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() >= deadline {
            let _ = run.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_restores_a_killed_service_and_gives_up_when_told() {
    if !root("run_restores_a_killed_service_and_gives_up_when_told") {
        return;
    }
    let base = common::fresh_dir("cr-ebpf-run");
    let images = base.join("images");
    let port = 18300 + (std::process::id() % 500) as u16;
    let mut run = start_run(&images, port, &[]);
    let (n, pid) = ask(port);
    assert_eq!(n, 1);
    // Checkpoints taken, more connections served meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    while checkpoints(&images) < 3 {
        assert!(
            Instant::now() < deadline,
            "no checkpoints in {}",
            images.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (n, _) = ask(port);
    assert_eq!(n, 2);
    // Two checkpoints more: the newest holds the second connection.
    let seq0 = newest(&images);
    let deadline = Instant::now() + Duration::from_secs(20);
    while newest(&images) < seq0 + 2 {
        assert!(Instant::now() < deadline, "no new checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: killing the service as a crash would.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Back with the same pid and its counter from a checkpoint after the
    // second connection.
    let (m, again) = ask(port);
    let log = || std::fs::read_to_string(images.with_extension("log")).unwrap_or_default();
    assert_eq!(again, pid, "{}", log());
    assert_eq!(m, 3, "the counter continues: {}", log());
    // (The service runs before `run` says so.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("restored the service") {
        assert!(Instant::now() < deadline, "{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Tracked again: checkpoints of the restored service, the newest
    // after its third connection.
    let seq0 = newest(&images);
    let deadline = Instant::now() + Duration::from_secs(20);
    while newest(&images) < seq0 + 2 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint after the restore: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM: the service stops, run exits 0.
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    assert_eq!(
        wait_exit(&mut run, Duration::from_secs(30)),
        Some(0),
        "{}",
        log()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the service still serves"
    );

    // `--resume`: the service comes back from its newest checkpoint, not
    // started anew (same pid, its counter continued).
    let mut run = start_run(&images, port, &["--resume"]);
    let (m, again) = ask(port);
    assert_eq!((m, again), (4, pid), "{}", log());
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    assert_eq!(
        wait_exit(&mut run, Duration::from_secs(30)),
        Some(0),
        "{}",
        log()
    );

    // A service that crashes before its first checkpoint is started again
    // (not restored from the checkpoints an earlier run left), then given
    // up on: exit status 5.
    let mut run = Command::new(BIN)
        .args([
            "run",
            "--restarts",
            "2",
            "--backoff",
            "100ms",
            "--images-dir",
        ])
        .arg(&images)
        .args(["--", "/bin/sh", "-c", "kill -KILL $$"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(
        wait_exit(&mut run, Duration::from_secs(30)),
        Some(5),
        "{err}"
    );
    assert_eq!(
        err.matches("starting the command again").count(),
        2,
        "{err}"
    );
    assert!(!err.contains("restored the service"), "{err}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "an earlier run's service was restored"
    );

    // No restore allowed: a crash ends run with status 5.
    let images = base.join("images-0");
    let mut run = start_run(&images, port, &["--restarts", "0"]);
    let (_, pid) = ask(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while checkpoints(&images) < 1 {
        assert!(Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: killing the service.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(wait_exit(&mut run, Duration::from_secs(30)), Some(5));
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_command_that_cannot_start_is_a_json_error() {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-run-bad-{}", std::process::id()));
    let out = Command::new(BIN)
        .args(["run", "--json", "--images-dir"])
        .arg(&dir)
        .args(["--", "/nonexistent/service"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(said["ok"], false);
    assert!(
        said["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/service"),
        "{said}"
    );
}

/// A service cr-ebpf cannot checkpoint (its parent-death signal, set
/// before it starts, would come from whatever restored it) is refused,
/// exit status 3 with a JSON error, and stopped: `run` does not leave it
/// running unsupervised.
#[test]
fn a_service_that_is_refused_is_stopped_with_status_3() {
    if !root("a_service_that_is_refused_is_stopped_with_status_3") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-run-refused-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut run = Command::new(BIN)
        .args(["run", "--json", "--images-dir"])
        .arg(&dir)
        .args([
            "--",
            "/usr/bin/setpriv",
            "--pdeathsig",
            "TERM",
            "/bin/sleep",
            "600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Waited for first, with a deadline (its output is a few lines).
    let status = wait_exit(&mut run, Duration::from_secs(60));
    let mut err = String::new();
    run.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let mut out = String::new();
    run.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(status, Some(3), "{err}");
    let said: serde_json::Value = serde_json::from_str(&out).expect("a JSON error");
    assert_eq!(said["refused"], true, "{said}");
    assert_eq!(said["exit"], 3, "{said}");
    assert!(
        said["error"].as_str().unwrap().contains("not supported"),
        "{said}"
    );
    let pid = err
        .split("started the service, pid ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("no pid in {err}"));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the refused service {pid} runs on unsupervised: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The service is tracked from its first instruction: it waits at its exec
/// until the eBPF programs follow its pid, so that what it prints first
/// comes after `run` says it tracks it (before, the service ran while the
/// programs loaded, a tenth of a second and more). A wrapper that execs
/// again at once (`env`) is tracked across that exec too.
#[test]
fn the_service_is_tracked_from_its_first_instruction() {
    if !root("the_service_is_tracked_from_its_first_instruction") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-run-first-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--interval", "200ms", "--images-dir"])
        .arg(&dir)
        .args([
            "--",
            "env",
            "FIRST=1",
            "/bin/sh",
            "-c",
            "echo first-instruction; exec sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cr_ebpf_perf::workload(&mut cmd);
    let mut run = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // Its own line (the command line `run` echoes holds the words too).
        if text.contains("\nfirst-instruction\n") && checkpoints(&dir) >= 2 {
            break text;
        }
        assert!(Instant::now() < deadline, "run said: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let tracking = text
        .find("letting the service start")
        .expect("run lets the service start once it is tracked");
    let first = text.find("\nfirst-instruction\n").unwrap();
    assert!(
        tracking < first,
        "the service ran before it was tracked:\n{text}"
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    assert_eq!(
        wait_exit(&mut run, Duration::from_secs(40)),
        Some(0),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log_path);
}
