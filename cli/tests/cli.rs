//! The `cr-ebpf` binary end to end: `check` and `trace` against real
//! processes. Privileged: they skip outside CI when not root, and fail in CI.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::state_of;

const BIN: &str = env!("CARGO_BIN_EXE_cr-ebpf");

fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test} needs root, and CI=true: a missing capability is a failure in CI");
    }
    eprintln!("SKIPPED {test}: needs root (eBPF, ptrace)");
    false
}

#[test]
fn check_json_reports_every_probe_and_a_backend() {
    if !privileged("check_json_reports_every_probe_and_a_backend") {
        return;
    }
    let out = Command::new(BIN)
        .args(["check", "--json"])
        .output()
        .expect("run cr-ebpf check");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    let checks = report["checks"].as_array().expect("a checks array");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for wanted in [
        "ptrace seize + interrupt",
        "clone3 with set_tid",
        "pidfd_open + pidfd_getfd + kcmp",
        "prctl PR_SET_MM_MAP",
        "vDSO/vvar remap (mremap)",
        "arch_prctl ARCH_MAP_VDSO_64",
        "TCP_REPAIR",
        "time namespaces",
        "userfaultfd WP_ASYNC + PAGEMAP_SCAN",
        "soft-dirty bits",
        "BTF",
        "tracefs",
        "ring buffer delivers every kind of event",
    ] {
        assert!(names.contains(&wanted), "no `{wanted}` probe in {names:?}");
    }
    let programs = names.iter().filter(|n| n.starts_with("program ")).count();
    assert_eq!(programs, 7, "one line per eBPF program");
    for c in checks {
        let status = c["status"].as_str().unwrap();
        assert!(["ok", "missing", "failed"].contains(&status));
        if c["required"] == true {
            assert_ne!(
                status, "missing",
                "a required probe is `failed`, not `missing`"
            );
        }
    }
    let core_ok = report["core_ok"].as_bool().unwrap();
    assert_eq!(out.status.success(), core_ok, "exit status follows core_ok");
    let backend = report["dirty_tracking_backend"].as_str().unwrap();
    assert!(["uffd-wp", "soft-dirty", "hashing"].contains(&backend));
}

#[test]
fn trace_logs_a_tree_and_stops_when_it_exits() {
    if !privileged("trace_logs_a_tree_and_stops_when_it_exits") {
        return;
    }
    // A shell that waits for a line, then opens a file, runs a child and exits.
    let mut work = Command::new("/bin/sh")
        .args(["-c", "read go; exec 3</etc/hostname; /bin/true; exit 0"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("start the shell");
    let pid = work.id();
    let mut trace = Command::new(BIN)
        .args(["trace", "--pid", &pid.to_string(), "--no-faults"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cr-ebpf trace");
    let mut err = BufReader::new(trace.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(
        first.starts_with(&format!("tracing pid {pid}")),
        "{first:?}"
    );

    work.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert!(work.wait().unwrap().success());

    let start = Instant::now();
    let status = loop {
        if let Some(s) = trace.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = trace.kill();
            panic!("trace did not stop after the traced tree exited");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "trace exited with {status}");
    let mut out = String::new();
    trace
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("the traced tree has exited"),
        "stderr: {rest}"
    );

    let has = |needle: &str| out.lines().any(|l| l.contains(needle));
    assert!(
        has(&format!(
            "{pid}  openat(AT_FDCWD, \"/etc/hostname\", O_RDONLY"
        )),
        "no openat of /etc/hostname by the shell in:\n{out}"
    );
    assert!(has("now tracked"), "no child creation in:\n{out}");
    assert!(has("exec \"/bin/true\""), "no exec of the child in:\n{out}");
    assert!(has("exit_group(0) = ?"), "no exit_group in:\n{out}");
    let last = out.lines().last().unwrap_or("");
    assert!(
        last.contains(&format!("{pid}  exit: last thread, process gone")),
        "the shell's exit is the last line, got {last:?}"
    );
}

#[test]
fn trace_of_a_missing_pid_names_the_problem() {
    if !privileged("trace_of_a_missing_pid_names_the_problem") {
        return;
    }
    let out = Command::new(BIN)
        .args(["trace", "--pid", "8388608"])
        .output()
        .unwrap();
    // 1: failed (2 is bad usage, 3 a refusal).
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no process with pid 8388608"), "{err}");
}

#[test]
fn dump_inspect_restore_from_the_command_line() {
    if !privileged("dump_inspect_restore_from_the_command_line") {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-cli");
    let img = dir.join("img");
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cr_ebpf_perf::workload(&mut cmd);
    let mut sleeper = cmd.spawn().unwrap();
    let pid = sleeper.id();
    std::thread::sleep(Duration::from_millis(200));

    let out = Command::new(BIN)
        .args(["dump", "--pid", &pid.to_string(), "--json", "--images-dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["pid"], pid);
    assert_eq!(report["threads"], 1);
    assert!(report["freeze_ms"].as_f64().unwrap() > 0.0);
    let _ = sleeper.wait();

    let out = Command::new(BIN)
        .arg("inspect")
        .arg(&img)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["pid"], pid);
    // One size: what dump reported is what inspect finds on disk.
    assert!(image["bytes"].as_u64() > Some(0), "{image}");
    assert_eq!(image["bytes"], report["bytes"]);
    assert_eq!(image["size_bytes"], report["size_bytes"]);
    assert_eq!(
        image["format"],
        format!("1.{}", cr_ebpf_image::FORMAT_MINOR)
    );
    assert!(image["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["kind"] == "Vdso"));

    let out = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("restored with its pid");
    assert!(stat.contains("(sleep)"), "{stat}");
    // SAFETY: stopping the restored sleep.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };

    // A damaged image: a clear error and exit status 1 (failed).
    let pages = img.join("pages.img");
    let mut b = std::fs::read(&pages).unwrap();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&pages, b).unwrap();
    let out = Command::new(BIN).arg("inspect").arg(&img).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let json = Command::new(BIN)
        .args(["inspect", "--json"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(1));
    let said: serde_json::Value = serde_json::from_slice(&json.stdout).expect("a JSON error");
    assert_eq!(
        (said["ok"].clone(), said["exit"].clone()),
        (false.into(), 1.into())
    );
    assert!(said["error"].as_str().unwrap().contains("corrupt image"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupt image") && err.contains("pages.img"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Shell completions and the manual page come from the same definitions
/// as the commands (no root needed).
#[test]
fn completions_and_the_manual_page_name_every_command() {
    let bash = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(bash.status.success());
    let bash = String::from_utf8_lossy(&bash.stdout);
    let man = Command::new(BIN).arg("man").output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH cr-ebpf 1"), "{man}");
    for cmd in [
        "track", "restore", "dump", "inspect", "snapshot", "compact", "unlock", "run",
    ] {
        assert!(bash.contains(cmd), "{cmd} in the bash completions");
        assert!(man.contains(cmd), "{cmd} in the manual page");
    }
    assert!(bash.contains("--images-dir"));
}

#[test]
fn inspect_shows_the_shared_memory_an_image_stores() {
    if !privileged("inspect_shows_the_shared_memory_an_image_stores") {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-cli-shm");
    let ready = dir.join("ready");
    let script = "import mmap, os, sys, time\n\
        fd = os.memfd_create('inspect-me')\n\
        os.ftruncate(fd, 1 << 20)\n\
        m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)\n\
        m[:] = b'x' * (1 << 20)\n\
        open(sys.argv[1], 'w').close()\n\
        time.sleep(60)\n";
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script])
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cr_ebpf_perf::workload(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    cr_ebpf_perf::wait_for_file(&ready);
    let img = dir.join("img");
    let out = Command::new(BIN)
        .args(["dump", "--leave-running", "--pid", &child.id().to_string()])
        .arg("--images-dir")
        .arg(&img)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["inspect", "--json"])
        .arg(&img)
        .output()
        .unwrap();
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects = image["shared_memory"].as_array().unwrap();
    let memfd = objects
        .iter()
        .find(|o| o["name"] == "inspect-me")
        .unwrap_or_else(|| panic!("{objects:?}"));
    assert_eq!(
        (memfd["kind"].as_str(), memfd["pages_stored"].as_u64()),
        (Some("Memfd"), Some(256)),
        "{memfd}"
    );
    let text = Command::new(BIN).arg("inspect").arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("256 pages stored") && l.ends_with("inspect-me")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zombie and a kernel thread are refused by `dump` and `track` before
/// anything is stopped or written (exit status 3): `track` of a zombie
/// took a "full checkpoint" of 0 pages and ended with 0, and a kernel
/// thread got a bare EPERM of PTRACE_SEIZE. (pid 1, refused the same way
/// by the same check, is left to its unit test: a regression would stop
/// every process of the machine.)
#[test]
fn a_zombie_or_a_kernel_thread_is_refused_before_anything_is_stopped() {
    if !privileged("a_zombie_or_a_kernel_thread_is_refused_before_anything_is_stopped") {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-uncheckable");
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let zombie = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(zombie) != 'Z' {
        assert!(Instant::now() < deadline, "the child never exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut cases = vec![(zombie, "a zombie")];
    // kthreadd (pid 2), parent of every kernel thread.
    if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
        cases.push((2, "a kernel thread"));
    }
    for (pid, what) in cases {
        for command in ["dump", "track"] {
            let images = dir.join(format!("{command}-{pid}"));
            let mut cmd = Command::new(BIN);
            cmd.args([command, "--pid", &pid.to_string()]);
            if command == "dump" {
                cmd.arg("--leave-running");
            } else {
                cmd.args(["--count", "1", "--interval", "100ms"]);
            }
            let out = cmd
                .arg("--images-dir")
                .arg(&images)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(3), "{command} of {what}: {err}");
            assert!(
                err.contains(&format!("not supported: {what}")),
                "{command} of {what}: {err}"
            );
            let written: Vec<_> = std::fs::read_dir(&images)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(written.is_empty(), "{command} of {what} wrote {written:?}");
            assert!(
                !images.exists(),
                "{command} of {what} made {}",
                images.display()
            );
        }
    }
    assert_eq!(state_of(zombie), 'Z', "the zombie is left as it was");
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Option values out of bounds are bad usage (exit status 2), said before
/// anything runs: `--threads 100000` spawned threads without end, and
/// `--keep 0` was taken as 1. (The pid does not exist and the images
/// directory does already: without the bounds each command fails early,
/// before any thread is started.)
#[test]
fn thread_and_keep_counts_out_of_bounds_are_refused_as_bad_usage() {
    let dir = common::fresh_dir("cr-ebpf-bounds");
    let (pid, images) = ("--pid=8388608", format!("--images-dir={}", dir.display()));
    let cases: [(&[&str], &str); 6] = [
        (&["dump", "--threads", "100000", pid], "at most 1024"),
        (&["restore", "--threads", "100000"], "at most 1024"),
        (&["compact", "--threads", "100000"], "at most 1024"),
        (&["track", "--keep", "0", pid], "at least"),
        (&["compact", "--keep", "0"], "at least"),
        (&["run", "--keep", "0"], "at least"),
    ];
    for (args, want) in cases {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg(&images);
        if args[0] == "run" {
            cmd.args(["--", "/bin/true"]);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let written: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert!(written.is_empty(), "a refused command wrote {written:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `inspect DIR | head`: a reader that stops early ends `inspect` as it
/// ends any filter (SIGPIPE), quietly; it panicked on the broken pipe.
#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    use std::os::{fd::FromRawFd as _, unix::process::ExitStatusExt as _};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/tests/fixtures");
    // An image, a tree, a chain; as text and as JSON.
    for (dir, json) in [("1.1", false), ("1.2", true), ("1.3", false), ("1.3", true)] {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both are new descriptors we own; the reader goes at once.
        let (reader, writer) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(reader);
        let mut cmd = Command::new(BIN);
        cmd.arg("inspect").arg(fixtures.join(dir));
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked"),
            "inspect {dir} (json: {json}): {err}"
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "inspect {dir} (json: {json}): {:?} {err}",
            out.status
        );
    }
}

/// The commands `cr-ebpf --help` lists (without `help`).
fn commands() -> Vec<String> {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// `args` fails with exit status `code`, says why on standard error, and
/// prints exactly one JSON line on standard output: `{"ok": false,
/// "error", "refused": false, "exit": code}`.
fn json_error(args: &[&str], code: i32) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "{args:?}: {stdout:?}");
    let said: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout:?}"));
    assert_eq!(said["ok"], false, "{args:?}: {said}");
    assert_eq!(said["refused"], false, "{args:?}: {said}");
    assert_eq!(said["exit"], code, "{args:?}: {said}");
    let error = said["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{args:?}: {said}");
    assert!(stderr.contains("error"), "{args:?}: {stderr}");
    said
}

/// Every command given `--json` reports a failure (exit status 1) and bad
/// usage (2) as one JSON line (no root needed: each fails before it would
/// take a privilege). A command added to the CLI without a case here fails
/// this test. Refusals (3) are checked in `outside_unix.rs`, a tracked
/// process that ends (4) in `track.rs`, `run` giving up (5) in `run.rs`.
#[test]
fn every_command_reports_its_errors_as_json() {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-json-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();
    let new = dir.join("new");
    let new = new.to_str().unwrap();
    // A pid above the kernel's largest (4194304): never a process.
    let nopid = "8388608";
    let failures: &[(&str, &[&str], &str)] = &[
        ("trace", &["trace", "--json", "--pid", nopid], nopid),
        (
            "dump",
            &["dump", "--json", "--pid", nopid, "--images-dir", new],
            nopid,
        ),
        (
            "restore",
            &["restore", "--json", "--images-dir", missing],
            "no image",
        ),
        (
            "unlock",
            &["unlock", "--json", "--images-dir", missing],
            "no image",
        ),
        ("inspect", &["inspect", "--json", missing], missing),
        (
            "track",
            &["track", "--json", "--pid", nopid, "--images-dir", new],
            nopid,
        ),
        (
            "run",
            &[
                "run",
                "--json",
                "--images-dir",
                new,
                "--",
                "/nonexistent/service",
            ],
            "/nonexistent/service",
        ),
        (
            "snapshot",
            &[
                "snapshot",
                "--incremental",
                "--json",
                "--images-dir",
                missing,
            ],
            "no checkpoint",
        ),
        (
            "compact",
            &["compact", "--json", "--images-dir", missing],
            "no image",
        ),
        (
            "man",
            &["man", "--json", "--dir", "/proc/version/man"],
            "/proc/version/man",
        ),
    ];
    let mut covered = Vec::new();
    for (cmd, args, names) in failures {
        let said = json_error(args, 1);
        let error = said["error"].as_str().unwrap();
        assert!(error.contains(names), "{args:?}: {error}");
        covered.push(*cmd);
    }
    // Bad usage: an unknown option, a malformed value, a missing one.
    let mut usage = 0;
    for cmd in commands() {
        let said = json_error(&[&cmd, "--json", "--no-such-option"], 2);
        assert!(
            said["error"].as_str().unwrap().contains("--no-such-option"),
            "{cmd}: {said}"
        );
        usage += 1;
        // `check` and `completions` take nothing that can fail but their
        // options (`check` fails on a machine that lacks what the core
        // needs).
        assert!(
            covered.contains(&cmd.as_str()) || ["check", "completions"].contains(&&*cmd),
            "{cmd}: no failing case with --json here"
        );
    }
    assert!(usage >= 12, "{usage} commands in --help");
    let said = json_error(&["dump", "--json", "--pid", "abc", "--images-dir", new], 2);
    assert!(said["error"].as_str().unwrap().contains("abc"), "{said}");
    let said = json_error(&["run", "--json", "--images-dir", new], 2);
    assert!(
        said["error"].as_str().unwrap().contains("COMMAND"),
        "{said}"
    );
    // `--json` after `--` is the service's, not run's.
    let out = Command::new(BIN)
        .args(["run", "--images-dir", new, "--", "/nonexistent/x", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Failures made nothing where the images would have gone, but `run`'s.
    assert!(!Path::new(missing).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `man --dir` writes the main page and one per command, so that the main
/// page's references (`cr-ebpf-run(1)`, ...) exist; the main page has the
/// exit statuses.
#[test]
fn the_manual_has_a_page_per_command_and_the_exit_statuses() {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main = std::fs::read_to_string(dir.join("cr-ebpf.1")).unwrap();
    for cmd in commands() {
        let page = dir.join(format!("cr-ebpf-{cmd}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{page:?}: {e}"));
        assert!(text.contains(".TH cr-ebpf-"), "{page:?}: {text}");
        assert!(
            main.contains(&format!("cr\\-ebpf\\-{cmd}(1)")),
            "{cmd} in the main page"
        );
    }
    assert!(text_has_exit_statuses(&main), "{main}");
    let printed = Command::new(BIN).arg("man").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&printed.stdout), main);
    let _ = std::fs::remove_dir_all(&dir);
}

fn text_has_exit_statuses(page: &str) -> bool {
    page.contains("EXIT STATUS") && (0..=5).all(|c| page.contains(&format!(".TP\n{c}\n")))
}

/// The systemd unit of `contrib/` runs `cr-ebpf run` with options it has.
#[test]
fn the_systemd_unit_uses_options_run_has() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/systemd/cr-ebpf@.service"
    ))
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        words[0].ends_with("/cr-ebpf") && words[1] == "run",
        "{exec}"
    );
    let ours: Vec<&str> = words.iter().take_while(|w| **w != "--").copied().collect();
    assert!(
        ours.len() < words.len(),
        "no `--` before the command: {exec}"
    );
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = ours
        .iter()
        .filter(|w| w.starts_with("--"))
        .copied()
        .collect();
    assert!(flags.contains(&"--images-dir"), "{exec}");
    for flag in flags {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{flag} ")) || l.trim() == flag),
            "{flag} of the unit is not an option of run: {help}"
        );
    }
}
