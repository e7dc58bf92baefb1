//! Helpers shared by the command-line tests.

#![allow(dead_code, reason = "each test binary uses a part of them")]

use std::process::Command;

/// A new empty directory `PREFIX-PID` in the temporary directory (one
/// left by an earlier run of the same pid removed first).
pub fn fresh_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cr-ebpf restore --detach --images-dir IMAGES` (no stdin, no stdout),
/// required to succeed; what it said on stderr.
pub fn restore_detached(images: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(images)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "restore: {text}");
    text
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the test may run: root, or skip outside CI (a failure in CI).
pub fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!in_ci(), "{test} needs root, and CI=true: a failure in CI");
    eprintln!("SKIPPED {test}: needs root (eBPF, ptrace)");
    false
}

/// `program` as a checkpointable workload: no descriptors but 0, 1, 2
/// (the harness leaks its own, which a checkpoint rightly refuses as pipes
/// to the outside), off the terminal.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cr_ebpf_perf::workload(&mut cmd);
    cmd
}

/// The `cr-ebpf` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cr-ebpf");

/// A workload of the `perf` package, built next to `cr-ebpf` by a
/// workspace build. `None` (the test skips) when not root, or when it was
/// not built outside CI.
pub fn workload_bin(name: &str, test: &str) -> Option<std::path::PathBuf> {
    if !root(test) {
        return None;
    }
    let p = std::path::Path::new(BIN).with_file_name(name);
    if !p.exists() {
        assert!(
            !in_ci(),
            "{} is missing: build the whole workspace",
            p.display()
        );
        eprintln!(
            "SKIPPED {test}: {} not built (run `cargo xtask test`)",
            p.display()
        );
        return None;
    }
    Some(p)
}

/// The complete lines of a log a workload appends to.
pub fn complete_lines(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete.lines().map(str::to_string).collect()
}

/// A running `cr-ebpf track --json`: its reports as they come, its
/// standard error kept for the end.
pub struct Tracking {
    pub child: std::process::Child,
    pub reports: std::sync::mpsc::Receiver<serde_json::Value>,
    err: std::thread::JoinHandle<String>,
}

impl Tracking {
    /// Starts `cr-ebpf track --pid PID ARGS --json --images-dir IMAGES`.
    pub fn start(pid: i32, args: &[&str], images: &std::path::Path) -> Self {
        use std::io::{BufRead as _, Read as _};
        let mut child = clean(BIN)
            .args(["track", "--pid", &pid.to_string()])
            .args(args)
            .arg("--json")
            .arg("--images-dir")
            .arg(images)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let err = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::BufReader::new(err).read_to_string(&mut s);
            s
        });
        let (tx, reports) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Self {
            child,
            reports,
            err,
        }
    }

    /// Waits for the service to end: its exit status and standard error.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.err.join().unwrap())
    }
}

/// The state letter of `pid` (`R`, `S`, `Z`, ...); `?` when it is gone.
pub fn state_of(pid: i32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .unwrap_or('?')
}
