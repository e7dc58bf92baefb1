//! A service whose standard output is a unix stream connection to a
//! journald-like listener outside (what systemd gives every service): the
//! dump refuses it unless told `--ext-unix-sk` (the process runs on);
//! tracked with it, killed with SIGKILL and restored, the service connects
//! to the listener's name again and its next lines reach the listener; with
//! `restore --inherit-fd N:socket:[INODE]` they reach the connection the
//! restorer hands over instead.

use std::{
    io::{BufRead as _, BufReader},
    os::{fd::OwnedFd, unix::net::UnixListener},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

mod common;

use common::{clean, root, Tracking, BIN};

/// Prints a numbered line every 50 ms.
const COUNTER: &str = "import time\ni = 0\nwhile True:\n    print('line', i, flush=True)\n    i += 1\n    time.sleep(0.05)\n";

/// Every line of every connection the listener accepts, with the
/// connection's number.
fn collect(listener: UnixListener) -> mpsc::Receiver<(usize, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if tx.send((n, line)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    rx
}

fn number(line: &str) -> u64 {
    line.strip_prefix("line ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a counter line: {line:?}"))
}

#[test]
fn a_stdout_connected_to_a_journal_like_listener_is_connected_again_after_restore() {
    let test = "a_stdout_connected_to_a_journal_like_listener_is_connected_again_after_restore";
    if !root(test) {
        return;
    }
    // The restored process is reparented to us when `restore` exits.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = common::fresh_dir("cr-ebpf-journal");
    let path = dir.join("stdout.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let stdout = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let lines = collect(listener);
    let mut service = clean("/usr/bin/python3")
        .args(["-c", COUNTER])
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(stdout)))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = service.id() as i32;
    let wait = Duration::from_secs(20);
    let (conn, first) = lines.recv_timeout(wait).expect("the service's first line");
    assert_eq!((conn, number(&first)), (0, 0));

    // Without the option: refused, naming it; the service runs on.
    let refused = Command::new(BIN)
        .args([
            "dump",
            "--json",
            "--leave-running",
            "--pid",
            &pid.to_string(),
            "--images-dir",
        ])
        .arg(dir.join("refused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    // 3: refused, the process left running; with --json, said as JSON.
    assert_eq!(refused.status.code(), Some(3), "{err}");
    let said: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(said["ok"], false);
    assert_eq!(said["refused"], true);
    assert_eq!(said["exit"], 3);
    assert!(said["error"].as_str().unwrap().contains("--ext-unix-sk"));
    assert!(
        err.contains("not supported") && err.contains("--ext-unix-sk"),
        "{err}"
    );
    assert!(service.try_wait().unwrap().is_none(), "still running");

    let images = dir.join("images");
    let track = Tracking::start(pid, &["--interval", "300ms", "--ext-unix-sk"], &images);
    for _ in 0..2 {
        let r = track
            .reports
            .recv_timeout(wait)
            .expect("a checkpoint report");
        assert_eq!(r["ok"], true, "{r}");
    }
    service.kill().unwrap();
    service.wait().unwrap();
    let (status, err) = track.finish();
    // 4: the service ended because the process is gone.
    assert_eq!(status.code(), Some(4), "track: {err}");
    let last_before = lines.try_iter().map(|(_, l)| number(&l)).max().unwrap_or(0);

    let restored = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(&images)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&restored.stderr);
    assert!(restored.status.success(), "restore: {text}");
    // A new connection to the same name; the count goes on from the
    // checkpoint (lines after it were printed by the process that died).
    let (conn, line) = lines.recv_timeout(wait).expect("a line after the restore");
    assert_eq!(conn, 1, "a second connection");
    let n = number(&line);
    assert!(n > 0 && n <= last_before + 1, "{n} after {last_before}");
    let (_, next) = lines.recv_timeout(wait).expect("the line after");
    assert_eq!(number(&next), n + 1);
    // SAFETY: killing and reaping the restored process, ours now.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }

    // Again with `--inherit-fd 3:socket:[INODE]`: the restorer's own
    // connection (here to another listener) takes the place of the old one.
    let newest = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
        })
        .max()
        .expect("a checkpoint");
    let shown = Command::new(BIN)
        .arg("inspect")
        .arg(newest)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let socket = shown
        .split_whitespace()
        .find(|w| w.starts_with("socket:["))
        .unwrap_or_else(|| panic!("inspect names the socket: {shown}"))
        .to_string();
    let other = dir.join("other.sock");
    let other_lines = collect(UnixListener::bind(&other).unwrap());
    let given = std::os::unix::net::UnixStream::connect(&other).unwrap();
    let given = OwnedFd::from(given);
    let mut restore = Command::new(BIN);
    restore
        .args(["restore", "--detach", "--inherit-fd"])
        .arg(format!("3:{socket}"))
        .arg("--images-dir")
        .arg(&images)
        .stdin(Stdio::null());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&given);
    // SAFETY: in the child before exec: puts our connection at 3.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut restore, move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let restored = restore.output().unwrap();
    let text = String::from_utf8_lossy(&restored.stderr);
    assert!(restored.status.success(), "restore --inherit-fd: {text}");
    drop(given);
    let (conn, line) = other_lines
        .recv_timeout(wait)
        .expect("a line on the connection handed over");
    assert_eq!(conn, 0);
    let n = number(&line);
    assert!(n > 0 && n <= last_before + 1, "{n} after {last_before}");
    assert!(
        lines.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing reconnected to the old name"
    );
    // SAFETY: killing and reaping the restored process, ours now.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    // A name the image does not hold is refused.
    let wrong = Command::new(BIN)
        .args([
            "restore",
            "--detach",
            "--inherit-fd",
            "2:socket:[1]",
            "--images-dir",
        ])
        .arg(&images)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("socket:[1]"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
