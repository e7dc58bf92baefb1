//! Process-wide state only the process itself can be asked for comes back
//! after a dump and restore: `prctl` settings (THP disabled, dumpable),
//! a job-control stop; a parent-death signal whose parent is left behind
//! is refused. The answers come through a Python signal handler, which
//! runs with `SA_ONSTACK`: a restore once left the main thread with the
//! restorer's alternate signal stack, and the first such signal killed it.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// A python3 workload: `SETUP`, then `ctl/ready`; on SIGUSR1 it writes
/// its prctl answers to `ctl/answer`; it counts into `ctl/count`.
const WORKLOAD: &str = r#"
import ctypes, os, signal, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def answer(*_):
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)
    vals = [libc.prctl(3, 0, 0, 0, 0), libc.prctl(42, 0, 0, 0, 0), sig.value]
    with open(os.path.join(ctl, 'answer.tmp'), 'w') as f:
        f.write(' '.join(map(str, vals)))
    os.rename(os.path.join(ctl, 'answer.tmp'), os.path.join(ctl, 'answer'))
signal.signal(signal.SIGUSR1, answer)
SETUP
open(os.path.join(ctl, 'ready'), 'w').close()
n = 0
while True:
    n += 1
    with open(os.path.join(ctl, 'count.tmp'), 'w') as f:
        f.write(str(n))
    os.rename(os.path.join(ctl, 'count.tmp'), os.path.join(ctl, 'count'))
    time.sleep(0.02)
"#;

fn start(s: &Scratch, setup: &str) -> (std::process::Child, i32, std::path::PathBuf) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", &WORKLOAD.replace("SETUP", setup)])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = spawn_clean(&mut cmd);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    cr_ebpf_perf::wait_for_file(&ctl.join("count"));
    let pid = child.id() as i32;
    (child, pid, ctl)
}

fn count(ctl: &std::path::Path) -> u64 {
    std::fs::read_to_string(ctl.join("count"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

/// Asks the process for its prctl answers: dumpable, THP disabled, pdeath.
fn answers(pid: i32, ctl: &std::path::Path) -> String {
    let _ = std::fs::remove_file(ctl.join("answer"));
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    std::fs::read_to_string(ctl.join("answer")).unwrap()
}

#[test]
fn prctl_settings_come_back_after_a_restore() {
    if !cr_ebpf_perf::privileged("prctl_settings_come_back_after_a_restore") {
        return;
    }
    let s = Scratch::new("ps-prctl");
    let (mut child, pid, ctl) = start(&s, "libc.prctl(41, 1, 0, 0, 0)\nlibc.prctl(4, 0, 0, 0, 0)");
    let guard = KillOnDrop(pid);
    assert_eq!(answers(pid, &ctl), "0 1 0", "set before the checkpoint");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(answers(r.pid, &ctl), "0 1 0", "not dumpable, THP disabled");
}

#[test]
fn a_stopped_process_comes_back_stopped_and_continues_on_sigcont() {
    if !cr_ebpf_perf::privileged("a_stopped_process_comes_back_stopped_and_continues_on_sigcont") {
        return;
    }
    let s = Scratch::new("ps-stop");
    let (mut child, pid, ctl) = start(&s, "");
    let guard = KillOnDrop(pid);
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(pid) != 'T' {
        assert!(Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = count(&ctl);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert_eq!(m.process.prctl.unwrap().job_stop, libc::SIGSTOP as u32);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(state(r.pid), 'T', "stopped again");
    assert_eq!(count(&ctl), before, "it ran none of its own code");
    // SAFETY: plain kill.
    unsafe { libc::kill(r.pid, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&ctl) < before + 3 {
        assert!(Instant::now() < deadline, "did not continue after SIGCONT");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_parent_death_signal_from_a_parent_left_behind_is_refused() {
    if !cr_ebpf_perf::privileged("a_parent_death_signal_from_a_parent_left_behind_is_refused") {
        return;
    }
    let s = Scratch::new("ps-pdeath");
    let (mut child, pid, ctl) = start(&s, "libc.prctl(1, 10, 0, 0, 0)");
    let _k = KillOnDrop(pid);
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not supported") && msg.contains("parent-death signal (10)"),
        "{msg}"
    );
    assert!(!img.exists(), "no image published");
    let before = count(&ctl);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&ctl) <= before {
        assert!(Instant::now() < deadline, "left running");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none());
}

/// `VmFlags` of the mapping at `addr` in `pid`.
fn vm_flags(pid: i32, addr: u64) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let head = format!("{addr:x}-");
    let at = smaps.find(&head).expect("the mapping");
    let rest = &smaps[at..];
    let line = rest.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
    line.to_string()
}

#[test]
fn a_mappings_own_settings_come_back_after_a_restore() {
    if !cr_ebpf_perf::privileged("a_mappings_own_settings_come_back_after_a_restore") {
        return;
    }
    let s = Scratch::new("ps-advice");
    // 16 pages, MAP_NORESERVE, advised don't-fork and wipe-on-fork, written.
    let setup = "libc.mmap.restype = ctypes.c_void_p\n\
        a = libc.mmap(None, 65536, 3, 0x22 | 0x4000, -1, 0)\n\
        libc.madvise(ctypes.c_void_p(a), 65536, 10)\n\
        libc.madvise(ctypes.c_void_p(a), 65536, 18)\n\
        ctypes.memset(a, 7, 65536)\n\
        open(os.path.join(ctl, 'addr'), 'w').write(str(a))";
    let (mut child, pid, ctl) = start(&s, setup);
    let guard = KillOnDrop(pid);
    let addr: u64 = std::fs::read_to_string(ctl.join("addr"))
        .unwrap()
        .parse()
        .unwrap();
    let before = vm_flags(pid, addr);
    for f in [" dc", " wf", " nr"] {
        assert!(before.contains(f), "{before}");
    }
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    let after = vm_flags(r.pid, addr);
    for f in [" dc", " wf", " nr"] {
        assert!(after.contains(f), "{f} lost: {before} -> {after}");
    }
}

/// Unmaps its vDSO (as on a kernel booted with `vdso=0`, ZDTM `vdso02`),
/// then waits for signals using only plain syscalls (its clock calls, and
/// Python's text files, would go through the vDSO): SIGUSR1 makes it write
/// `ctl/answer`.
const NO_VDSO: &str = r#"
import ctypes, os, signal, sys
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
ready, answer = os.path.join(ctl, "ready"), os.path.join(ctl, "answer")
def maps():
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    data = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data
def put(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
def reply(*_):
    put(answer, b"vdso" if b"[vdso]" in maps() else b"none")
signal.signal(signal.SIGUSR1, reply)
for line in maps().splitlines():
    if line.endswith(b"[vdso]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split(b"-"))
        libc.munmap(lo, hi - lo)
put(ready, b"")
while True:
    signal.pause()
"#;

#[test]
fn a_process_without_a_vdso_comes_back_without_one() {
    if !cr_ebpf_perf::privileged("a_process_without_a_vdso_comes_back_without_one") {
        return;
    }
    let s = Scratch::new("ps-novdso");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", NO_VDSO])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    // Asked again until it answers: a signal that comes just before its
    // pause() (where a restored process resumes) only wakes the next one.
    let ask = |pid: i32| {
        let at = ctl.join("answer");
        let _ = std::fs::remove_file(&at);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !at.exists() {
            assert!(Instant::now() < deadline, "process {pid} never answered");
            // SAFETY: plain kill.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::read_to_string(&at).unwrap()
    };
    assert_eq!(ask(pid), "none", "unmapped before the checkpoint");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(r.pid), "none", "restored, and still without a vDSO");
}

/// `SigCgt` and `SigIgn` of `/proc/PID/status`: which signals are handled
/// and which ignored.
fn dispositions(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("SigCgt:") || l.starts_with("SigIgn:"))
        .map(str::to_string)
        .collect()
}

/// A signal at its default disposition stays there: the restorer's own
/// (SIGPIPE ignored, SIGSEGV and SIGBUS handled by the Rust runtime) once
/// stayed in the restored process.
#[test]
fn default_signal_dispositions_stay_default() {
    if !cr_ebpf_perf::privileged("default_signal_dispositions_stay_default") {
        return;
    }
    let s = Scratch::new("ps-sigdfl");
    let (mut child, pid, _ctl) = start(&s, "signal.signal(signal.SIGPIPE, signal.SIG_DFL)");
    let guard = KillOnDrop(pid);
    let before = dispositions(pid);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(dispositions(r.pid), before);
}
