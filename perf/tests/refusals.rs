//! Refuse, never lose: state a process can see that an image does not carry
//! is refused at checkpoint time, naming it, while the process keeps
//! running untouched (not stopped, not traced, no image published); and
//! what is carried comes back (a session leader leads its session again).

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Starts the python3 `script` (its first argument a control directory)
/// and waits for it to write `CTL/ready`.
fn start(s: &Scratch, script: &str, prefix: &[&str]) -> (std::process::Child, i32) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new(prefix.first().copied().unwrap_or("python3"));
    cmd.args(prefix.iter().skip(1));
    if !prefix.is_empty() {
        cmd.arg("python3");
    }
    cmd.args(["-c", script])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = spawn_clean(&mut cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl.join("ready").exists() {
        assert!(Instant::now() < deadline, "the workload did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The python process itself: the child, or the child of `unshare`.
    let pid = python_pid(child.id() as i32);
    (child, pid)
}

fn python_pid(pid: i32) -> i32 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if exe.to_string_lossy().contains("python") {
        return pid;
    }
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    kids.split_whitespace().next().unwrap().parse().unwrap()
}

fn stat_field(pid: i32, n: usize) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(n - 3).unwrap().to_string()
}

/// Dumps `pid`, which must be refused with `want` in the message, and
/// checks the process runs on untouched.
fn refused(s: &Scratch, pid: i32, want: &str) {
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not supported") && msg.contains(want), "{msg}");
    assert!(!img.exists(), "no image published");
    let state = stat_field(pid, 3);
    assert!(state == "S" || state == "R", "state {state}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "not traced any more");
}

const SLEEPER: &str = r#"
import os, sys, time
ctl = sys.argv[1]
SETUP
open(os.path.join(ctl, 'ready'), 'w').close()
time.sleep(120)
"#;

fn script(setup: &str) -> String {
    SLEEPER.replace("SETUP", setup)
}

#[test]
fn namespaces_of_its_own_are_refused_naming_the_kind() {
    if !cr_ebpf_perf::privileged("namespaces_of_its_own_are_refused_naming_the_kind") {
        return;
    }
    // UTS and IPC namespaces are carried (perf/tests/namespaces.rs), but
    // not a POSIX message queue in an IPC namespace.
    let mq = "import ctypes\n\
        assert ctypes.CDLL(None).mq_open(b'/cr-ebpf-q', 0o102, 0o600, None) >= 0";
    for (flag, setup, want) in [
        ("--net", "", "network namespace"),
        ("--mount", "", "mount namespace"),
        (
            "--ipc",
            mq,
            "POSIX message queues in its IPC namespace (cr-ebpf-q)",
        ),
    ] {
        let s = Scratch::new("ref-ns");
        let (mut child, pid) = start(&s, &script(setup), &["unshare", flag]);
        let _k = KillOnDrop(child.id() as i32);
        let _k2 = KillOnDrop(pid);
        refused(&s, pid, want);
        let _ = child.kill();
    }
}

/// Whether the lock `op` (an `flock` operation, or an `fcntl` command with
/// a `struct flock`) on `path` is refused to this process: someone holds it.
fn blocked(path: &std::path::Path, what: &str) -> bool {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: locks on our own descriptor, with a struct of ours.
    let r = unsafe {
        match what {
            "flock" => libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB),
            cmd => {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_WRLCK as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = 12;
                fl.l_len = 1;
                let cmd = if cmd == "ofd" { 37 } else { libc::F_SETLK };
                libc::fcntl(fd, cmd, &fl)
            }
        }
    };
    r != 0
}

#[test]
fn file_locks_of_each_kind_are_held_again_after_a_restore() {
    if !cr_ebpf_perf::privileged("file_locks_of_each_kind_are_held_again_after_a_restore") {
        return;
    }
    let s = Scratch::new("ref-lock");
    let setup = "import fcntl, struct\n\
        a = open(os.path.join(ctl, 'flock'), 'w'); fcntl.flock(a, fcntl.LOCK_EX)\n\
        b = open(os.path.join(ctl, 'posix'), 'w'); fcntl.lockf(b, fcntl.LOCK_EX, 10, 5)\n\
        c = os.open(os.path.join(ctl, 'ofd'), os.O_RDWR | os.O_CREAT)\n\
        fcntl.fcntl(c, 37, struct.pack('hhqqi', fcntl.F_WRLCK, 0, 0, 0, 0) + bytes(4))";
    let (mut child, pid) = start(&s, &script(setup), &[]);
    let guard = KillOnDrop(pid);
    let ctl = s.0.join("ctl");
    for what in ["flock", "posix", "ofd"] {
        assert!(blocked(&ctl.join(what), what), "{what} held before");
    }
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert_eq!(m.locks.len(), 3, "{:?}", m.locks);
    // Down: the locks are free meanwhile.
    assert!(!blocked(&ctl.join("posix"), "posix"));
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    for what in ["flock", "posix", "ofd"] {
        assert!(
            blocked(&ctl.join(what), what),
            "{what} held again after the restore"
        );
    }
}

#[test]
fn terminal_state_that_cannot_be_made_again_is_refused() {
    if !cr_ebpf_perf::privileged("terminal_state_that_cannot_be_made_again_is_refused") {
        return;
    }
    // A pty whose slave is the controlling terminal of the process and
    // whose master is in packet mode, with a line typed into the master
    // that nobody read (taking the queues would show the master a change
    // of settings).
    let typed = "import pty, fcntl, termios, os, struct\nm, sl = pty.openpty()\n\
                 fcntl.ioctl(sl, termios.TIOCSCTTY, 0)\n\
                 fcntl.ioctl(m, termios.TIOCPKT, struct.pack('i', 1))\n\
                 os.write(m, b'typed\\n')";
    // A master whose slave is closed everywhere (a new pair would not be
    // hung up as this one is).
    let closed = "import pty, os\nm, sl = pty.openpty()\nos.close(sl)";
    for (name, setup, want) in [
        ("ref-tty-typed", typed, "in packet mode"),
        ("ref-tty-closed", closed, "slave is closed everywhere"),
    ] {
        let s = Scratch::new(name);
        let (mut child, pid) = start(&s, &script(setup), &[]);
        let _k = KillOnDrop(pid);
        refused(&s, pid, want);
        let _ = child.kill();
    }
}

#[test]
fn a_session_leader_restores_as_the_leader_of_its_session() {
    if !cr_ebpf_perf::privileged("a_session_leader_restores_as_the_leader_of_its_session") {
        return;
    }
    let s = Scratch::new("ref-sid");
    let (mut child, pid) = start(&s, &script(""), &[]);
    let guard = KillOnDrop(pid);
    // Started in a session of its own (as a daemon would be).
    assert_eq!(stat_field(pid, 6), pid.to_string());
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert_eq!((m.process.sid, m.process.pgid), (pid, pid));
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(r.pid, pid);
    assert_eq!(stat_field(pid, 6), pid.to_string(), "session");
    assert_eq!(stat_field(pid, 5), pid.to_string(), "process group");
}

#[test]
fn a_lease_being_broken_is_being_broken_again_after_a_restore() {
    if !cr_ebpf_perf::privileged("a_lease_being_broken_is_being_broken_again_after_a_restore") {
        return;
    }
    let s = Scratch::new("ref-lease");
    // A read lease that a writer broke: the holder got SIGIO once and
    // F_GETLEASE says F_UNLCK (2) until it lets the file go.
    let workload = r#"
import fcntl, os, signal, sys, time
ctl = sys.argv[1]
got = []
signal.signal(signal.SIGIO, lambda *a: got.append(1))
path = os.path.join(ctl, 'leased')
open(path, 'w').close()
f = os.open(path, os.O_RDONLY)
fcntl.fcntl(f, fcntl.F_SETLEASE, fcntl.F_RDLCK)
try:
    os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    raise SystemExit('not broken')
except BlockingIOError:
    pass
while not got:
    time.sleep(0.01)
open(os.path.join(ctl, 'ready'), 'w').close()
while True:
    state = '%d %d' % (fcntl.fcntl(f, fcntl.F_GETLEASE), len(got))
    with open(os.path.join(ctl, 'state.tmp'), 'w') as o:
        o.write(state)
    os.rename(os.path.join(ctl, 'state.tmp'), os.path.join(ctl, 'state'))
    time.sleep(0.05)
"#;
    let (mut child, pid) = start(&s, workload, &[]);
    let guard = KillOnDrop(pid);
    let ctl = s.0.join("ctl");
    let state = || std::fs::read_to_string(ctl.join("state")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state() != "2 1" {
        assert!(Instant::now() < deadline, "before: {}", state());
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert_eq!(
        m.locks.iter().map(|l| l.kind).collect::<Vec<_>>(),
        [cr_ebpf_image::LockKind::LeaseBreakingToNone]
    );
    std::fs::remove_file(ctl.join("state")).unwrap();
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state().is_empty() {
        assert!(Instant::now() < deadline, "the restored process runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        state(),
        "2 1",
        "still being broken to F_UNLCK, and no second SIGIO"
    );
}
