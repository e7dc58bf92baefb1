//! Privileged round trips: dump a live, self-checking workload, restore it,
//! and require it to continue exactly where it was, with the same pid and
//! memory. Also bad input: a pid in use, a damaged image.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, stop, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreError, RestoreOptions};
use nix::{
    sys::{
        signal::{kill, Signal},
        wait::waitpid,
    },
    unistd::Pid,
};

const TICKER: &str = env!("CARGO_BIN_EXE_ticker");

/// The tick numbers in a workload's log (which may hold other lines too),
/// checking every tick line is `ok`.
fn ticks(log: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("tick "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(
                f.get(2),
                Some(&"ok"),
                "workload self-check failed: {l:?}\n{text}"
            );
            f[1].parse().unwrap()
        })
        .collect()
}

fn wait_for_ticks(log: &Path, n: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let t = ticks(log);
        if t.len() >= n {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "only {} ticks after 20 s",
            t.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_ticker(log: &Path, mib: usize) -> Child {
    spawn_clean(Command::new(TICKER).arg(log).arg(mib.to_string()).arg("50"))
}

/// Continuous, no gap, no repeat.
fn assert_continuous(t: &[u64]) {
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "ticks jump: {t:?}");
    }
}

#[test]
fn dump_kill_restore_continues_with_same_pid_and_memory() {
    if !cr_ebpf_perf::privileged("dump_kill_restore_continues_with_same_pid_and_memory") {
        return;
    }
    let s = Scratch::new("rt-basic");
    let log = s.0.join("log");
    let mut w = start_ticker(&log, 64);
    let pid = w.id() as i32;
    wait_for_ticks(&log, 3);
    let img = s.0.join("img");
    let report = dump(pid, &img, &DumpOptions::default()).expect("dump");
    assert!(
        report.pages >= 64 * 256,
        "64 MiB of pattern stored: {report:?}"
    );
    // Killed by the dump (which, as its tracer, may already have collected
    // its exit): make sure the pid is free again.
    let _ = w.wait();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the dump killed it"
    );
    let before = ticks(&log);
    let last = *before.last().unwrap();

    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid, "the original pid");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        Path::new(TICKER).canonicalize().unwrap(),
        "/proc/PID/exe names the program again"
    );
    let after = wait_for_ticks(&log, before.len() + 5);
    stop(pid);
    assert_continuous(&after);
    assert!(after.len() >= before.len() + 5 && after[before.len()] == last + 1);
}

#[test]
fn restore_refuses_a_pid_in_use_and_starts_nothing() {
    if !cr_ebpf_perf::privileged("restore_refuses_a_pid_in_use_and_starts_nothing") {
        return;
    }
    let s = Scratch::new("rt-inuse");
    let log = s.0.join("log");
    let mut w = start_ticker(&log, 8);
    let pid = w.id() as i32;
    wait_for_ticks(&log, 2);
    let img = s.0.join("img");
    dump(
        pid,
        &img,
        &DumpOptions {
            leave_running: true,
            ..DumpOptions::default()
        },
    )
    .expect("dump --leave-running");
    // Still running and still ticking correctly after the dump.
    let n = ticks(&log).len();
    wait_for_ticks(&log, n + 3);
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    assert!(
        matches!(err, RestoreError::PidInUse { pid: p, .. } if p == pid),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("pid {pid} is in use")),
        "{err}"
    );
    // The original is untouched.
    assert!(w.try_wait().unwrap().is_none());
    let _ = w.kill();
    let _ = w.wait();
    // Now the pid is free: the image restores and goes on from the dump.
    let r = restore(&img, &RestoreOptions::default()).expect("restore after the pid is free");
    assert_eq!(r.pid, pid);
    let start = Instant::now();
    // The restored process repeats the ticks after the dump point: it is the
    // state of the checkpoint, not of the killed original.
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.lines().filter(|l| l.contains(" ok ")).count() > n + 6 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    stop(pid);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("MISMATCH"), "{text}");
}

#[test]
fn a_damaged_image_is_refused_before_anything_runs() {
    if !cr_ebpf_perf::privileged("a_damaged_image_is_refused_before_anything_runs") {
        return;
    }
    let s = Scratch::new("rt-damaged");
    let log = s.0.join("log");
    let mut w = start_ticker(&log, 8);
    let pid = w.id() as i32;
    wait_for_ticks(&log, 2);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = w.wait();
    let pages = img.join(cr_ebpf_image::PAGES_FILE);
    let mut b = std::fs::read(&pages).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&pages, &b).unwrap();
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    // Found as the fill reaches the chunk (the store is read once), before
    // the process could run: its stub is gone with it.
    assert!(
        msg.contains("damaged page data") && msg.contains("checksum mismatch"),
        "{msg}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nothing was left of pid {pid}"
    );
    // Truncated: the same.
    std::fs::write(&pages, &b[..mid]).unwrap();
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains("truncated"), "{msg}");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn dump_of_a_missing_pid_is_a_clear_error() {
    if !cr_ebpf_perf::privileged("dump_of_a_missing_pid_is_a_clear_error") {
        return;
    }
    let s = Scratch::new("rt-missing");
    let err = dump(1 << 23, &s.0.join("img"), &DumpOptions::default()).unwrap_err();
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains("no process with pid 8388608"), "{msg}");
    assert!(!s.0.join("img").exists(), "no image left behind");
}

#[test]
fn dump_of_a_zombie_is_refused_and_leaves_nothing() {
    if !cr_ebpf_perf::privileged("dump_of_a_zombie_is_refused_and_leaves_nothing") {
        return;
    }
    let s = Scratch::new("rt-zombie");
    let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
    let pid = child.id() as i32;
    // Not reaped yet: a zombie once it has exited.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the child never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = dump(pid, &s.0.join("img"), &DumpOptions::default()).unwrap_err();
    assert!(err.to_string().contains("a zombie"), "{err}");
    assert!(!s.0.join("img").exists(), "no image left behind");
    child.wait().unwrap();
}

const MTWORK: &str = env!("CARGO_BIN_EXE_mtwork");

fn tids(pid: i32) -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    t.sort_unstable();
    t
}

fn wait_for_line(log: &Path, what: &str, count: usize) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !text.contains("FAILED") && !text.contains("MISMATCH"),
            "{text}"
        );
        if text.lines().filter(|l| l.starts_with(what)).count() >= count {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {count} x {what:?} after 20 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn threads_files_pipes_and_blocked_syscalls_survive_a_round_trip() {
    if !cr_ebpf_perf::privileged("threads_files_pipes_and_blocked_syscalls_survive_a_round_trip") {
        return;
    }
    let s = Scratch::new("rt-threads");
    let log = s.0.join("log");
    // Main thread, a pipe reader (read), a sleeper (nanosleep), a futex
    // waiter, two spinners; a file open at an offset, a pipe with unread
    // bytes, /dev/null.
    let mut w = spawn_clean(Command::new(MTWORK).arg(&log).args(["16", "2"]));
    let pid = w.id() as i32;
    wait_for_line(&log, "tick", 3);
    let _reaper = KillOnDrop(pid);
    let before_tids = tids(pid);
    assert_eq!(before_tids.len(), 6, "{before_tids:?}");
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_for_line(&log, "usr1 ok", 1);

    let img = s.0.join("img");
    let r = dump(pid, &img, &DumpOptions::default()).expect("dump");
    assert_eq!(r.threads, 6);
    let _ = w.wait();
    let n_before = ticks(&log).len();

    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    wait_for_line(&log, "tick", n_before + 3);
    assert_eq!(tids(pid), before_tids, "every thread has its tid back");
    // The handler is installed again, and every thread (sleeping, waiting on
    // a futex, computing) makes progress after the restore.
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_for_line(&log, "usr1 ok", 2);
    // A second check compares with the first after the restore: everything,
    // the interval timer included, runs in the restored process itself.
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    let text = wait_for_line(&log, "usr1 ok", 3);
    stop(pid);
    let t = ticks(&log);
    assert_continuous(&t);
    assert!(t.len() > n_before, "{text}");
}

#[test]
fn an_unsupported_descriptor_fails_the_dump_and_leaves_the_process_running() {
    if !cr_ebpf_perf::privileged(
        "an_unsupported_descriptor_fails_the_dump_and_leaves_the_process_running",
    ) {
        return;
    }
    use std::os::{fd::AsRawFd, unix::process::CommandExt as _};
    let s = Scratch::new("rt-unsupported");
    let log = s.0.join("log");
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.as_raw_fd();
    let mut cmd = Command::new(TICKER);
    cmd.arg(&log).args(["8", "50"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A socket on fd 3 that survives exec, nothing above it.
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
            cr_ebpf_perf::leave_terminal()
        });
    }
    let mut w = cmd.spawn().expect("start ticker");
    let pid = w.id() as i32;
    let _reaper = KillOnDrop(pid);
    wait_for_ticks(&log, 2);
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not supported") && msg.contains("socket") && msg.contains("on fd 3"),
        "{msg}"
    );
    assert!(!img.exists(), "no image published");
    // Running, not stopped, and still ticking correctly.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let state = state[state.rfind(')').unwrap() + 2..]
        .chars()
        .next()
        .unwrap();
    assert!(state == 'S' || state == 'R', "state {state}");
    let n = ticks(&log).len();
    wait_for_ticks(&log, n + 3);
    let _ = w.kill();
    let _ = w.wait();
}

#[test]
fn python_with_a_dict_a_generator_and_a_thread_finishes_after_restore() {
    if !cr_ebpf_perf::privileged(
        "python_with_a_dict_a_generator_and_a_thread_finishes_after_restore",
    ) {
        return;
    }
    let Ok(python) = which_python() else {
        panic!("python3 is needed for this test (Debian's python3 package)");
    };
    let s = Scratch::new("rt-python");
    let log = s.0.join("log");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/workloads/pystate.py");
    let mut w = spawn_clean(
        Command::new(python)
            .arg(script)
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let pid = w.id() as i32;
    let _reaper = KillOnDrop(pid);
    wait_for_line(&log, "step", 3);
    let img = s.0.join("img");
    let r = dump(pid, &img, &DumpOptions::default()).expect("dump python");
    assert_eq!(r.threads, 2, "the interpreter and its worker thread");
    let _ = w.wait();
    let steps_before = wait_for_line(&log, "step", 1).lines().count();
    let r = restore(&img, &RestoreOptions::default()).expect("restore python");
    // The restored interpreter is our child: it must finish its 60 steps and exit 0.
    let status = waitpid(Pid::from_raw(r.pid), None).expect("wait for python");
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(Pid::from_raw(r.pid), 0)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"done"));
    assert_eq!(
        lines.len(),
        61,
        "60 steps and done, none lost or repeated:\n{text}"
    );
    for (i, l) in lines[..60].iter().enumerate() {
        // gen= follows the step (the generator resumed), dict= grows by one per step.
        assert!(
            l.starts_with(&format!("step {i} gen={i} dict={}", 100_000 + i)),
            "line {i}: {l}"
        );
    }
    assert!(steps_before < 60);
}

fn which_python() -> Result<&'static str, ()> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or(())
}

#[test]
fn a_gibibyte_round_trips_twice() {
    if !cr_ebpf_perf::privileged("a_gibibyte_round_trips_twice") {
        return;
    }
    let s = Scratch::needing("rt-gib", 2);
    let log = s.0.join("log");
    let mut w = start_ticker(&log, 1024);
    let pid = w.id() as i32;
    let _reaper = KillOnDrop(pid);
    wait_for_ticks(&log, 2);
    let img1 = s.0.join("img1");
    let r = dump(pid, &img1, &DumpOptions::default()).expect("dump 1 GiB");
    assert!(r.pages >= 1024 * 256, "{r:?}");
    let _ = w.wait();
    let n1 = ticks(&log).len();
    let r = restore(&img1, &RestoreOptions::default()).expect("restore 1 GiB");
    wait_for_ticks(&log, n1 + 2);
    // Done with: its gibibyte need not sit beside the next one.
    std::fs::remove_dir_all(&img1).unwrap();
    // Restore -> dump -> restore of the same process.
    let img2 = s.0.join("img2");
    dump(r.pid, &img2, &DumpOptions::default()).expect("dump the restored process");
    let _ = waitpid(Pid::from_raw(r.pid), None);
    let n2 = ticks(&log).len();
    let r2 = restore(&img2, &RestoreOptions::default()).expect("restore again");
    assert_eq!(r2.pid, pid);
    let t = wait_for_ticks(&log, n2 + 2);
    stop(pid);
    assert_continuous(&t);
}

#[test]
fn edited_credentials_are_refused_and_recorded_ones_come_back_exactly() {
    if !cr_ebpf_perf::privileged("edited_credentials_are_refused_and_recorded_ones_come_back") {
        return;
    }
    let s = Scratch::new("rt-creds");
    let log = s.0.join("log");
    let mut w = start_ticker(&log, 4);
    let pid = w.id() as i32;
    let _reaper = KillOnDrop(pid);
    wait_for_ticks(&log, 2);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = w.wait();
    // The process's ids edited alone disagree with its thread's.
    let mut m = cr_ebpf_image::Manifest::read(&img).unwrap();
    let mut edited = m.clone();
    edited.process.creds = [1000; 8];
    edited.write(&img).unwrap();
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("disagree"), "{err}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nothing started"
    );
    // Recorded as another user without capabilities: root restores it as
    // that user, never as root.
    m.process.creds = [1000; 8];
    for t in &mut m.threads {
        let c = t.creds.as_mut().expect("format 1.9 records credentials");
        c.uids = [1000; 4];
        c.gids = [1000; 4];
        c.caps = [0, 0, 0, c.caps[3], 0];
    }
    m.write(&img).unwrap();
    // The ticker opens its log again at every tick: as that user too.
    use std::os::unix::fs::PermissionsExt as _;
    // (Sticky, as /tmp: an image below a directory others may write is
    // trusted only so.)
    std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let status = std::fs::read_to_string(format!("/proc/{}/status", r.pid)).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "1000 1000 1000 1000");
    assert_eq!(field("Gid:"), "1000 1000 1000 1000");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    let n = ticks(&log).len();
    wait_for_ticks(&log, n + 2);
    stop(r.pid);
}

#[test]
fn a_changed_file_is_refused_and_the_same_file_accepted() {
    if !cr_ebpf_perf::privileged("a_changed_file_is_refused_and_the_same_file_accepted") {
        return;
    }
    let s = Scratch::new("rt-changed");
    let log = s.0.join("log");
    let mut w = spawn_clean(Command::new(MTWORK).arg(&log).args(["4", "0"]));
    let pid = w.id() as i32;
    let _reaper = KillOnDrop(pid);
    wait_for_line(&log, "tick", 2);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = w.wait();
    // The data file the process reads (open read-only at an offset) changes.
    let data = PathBuf::from(format!("{}.data", log.display()));
    let before = std::fs::metadata(&data).unwrap();
    let original = std::fs::read(&data).unwrap();
    let mut changed = original.clone();
    changed.push(0);
    std::fs::write(&data, &changed).unwrap();
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    assert!(matches!(err, RestoreError::File { .. }), "{err}");
    assert!(
        err.to_string().contains("changed since the checkpoint"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nothing started"
    );
    // Put it back as it was: accepted.
    std::fs::write(&data, &original).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    let r = restore(&img, &RestoreOptions::default()).expect("restore with the same file");
    let n = ticks(&log).len();
    wait_for_line(&log, "tick", n + 2);
    stop(r.pid);
}
