//! Each thread's scheduling settings come back after a dump and restore:
//! nice value, policy with its reset-on-fork flag, real-time priority
//! (ZDTM sched_policy00, sched_prio00); a `SCHED_DEADLINE` thread is
//! refused while the process keeps running.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// python3: the main thread gets nice -5; thread A `SCHED_RR` 3 with
/// reset-on-fork and nice 4; thread B `SCHED_BATCH` nice 7; thread C
/// `SETUP_C` (its nice the main thread's). Their tids go to `ctl/tids`.
const WORKLOAD: &str = r#"
import ctypes, os, struct, sys, threading, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def setattr_(policy, flags, nice, prio, runtime=0, deadline=0, period=0):
    a = struct.pack('<IIQiIQQQII', 56, policy, flags, nice, prio, runtime, deadline, period, 0, 0)
    if libc.syscall(314, 0, a, 0) != 0:
        raise OSError(ctypes.get_errno(), 'sched_setattr')
os.setpriority(os.PRIO_PROCESS, 0, -5)
tids = [threading.get_native_id()]
ready = threading.Barrier(4)
def a():
    os.setpriority(os.PRIO_PROCESS, 0, 4)
    setattr_(2, 1, 0, 3)
    tids.append(threading.get_native_id()); ready.wait()
    while True: time.sleep(0.05)
def b():
    setattr_(3, 0, 7, 0)
    tids.append(threading.get_native_id()); ready.wait()
    while True: time.sleep(0.05)
def c():
    SETUP_C
    tids.append(threading.get_native_id()); ready.wait()
    while True: time.sleep(0.05)
for f in (a, b, c):
    threading.Thread(target=f, daemon=True).start()
    time.sleep(0.05)
ready.wait()
with open(os.path.join(ctl, 'tids.tmp'), 'w') as f:
    f.write(' '.join(map(str, tids)))
os.rename(os.path.join(ctl, 'tids.tmp'), os.path.join(ctl, 'tids'))
while True: time.sleep(0.05)
"#;

fn start(s: &Scratch, setup_c: &str) -> (std::process::Child, i32, Vec<i32>) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", &WORKLOAD.replace("SETUP_C", setup_c)])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = spawn_clean(&mut cmd);
    cr_ebpf_perf::wait_for_file(&ctl.join("tids"));
    let tids = std::fs::read_to_string(ctl.join("tids"))
        .unwrap()
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let pid = child.id() as i32;
    (child, pid, tids)
}

/// (policy with `SCHED_RESET_ON_FORK`, rt priority, nice) of thread `tid`.
fn settings(tid: i32) -> (i32, i32, i32) {
    // SAFETY: plain syscalls on a thread id.
    unsafe {
        let policy = libc::sched_getscheduler(tid);
        let mut p = libc::sched_param { sched_priority: 0 };
        assert_eq!(libc::sched_getparam(tid, &mut p), 0);
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (policy, p.sched_priority, nice)
    }
}

#[test]
fn every_threads_scheduling_settings_come_back() {
    if !cr_ebpf_perf::privileged("every_threads_scheduling_settings_come_back") {
        return;
    }
    let s = Scratch::new("sched");
    let (mut child, pid, tids) = start(&s, "setattr_(5, 0, 0, 0)");
    let guard = KillOnDrop(pid);
    let before: Vec<_> = tids.iter().map(|&t| settings(t)).collect();
    assert_eq!(
        before,
        [
            (0, 0, -5),
            (libc::SCHED_RR | 0x4000_0000, 3, 4),
            (libc::SCHED_BATCH, 0, 7),
            (libc::SCHED_IDLE, 0, -5),
        ],
        "set before the checkpoint"
    );
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(r.pid, pid);
    let after: Vec<_> = tids.iter().map(|&t| settings(t)).collect();
    assert_eq!(after, before, "each thread's own settings");
}

#[test]
fn a_deadline_thread_is_refused_and_runs_on() {
    if !cr_ebpf_perf::privileged("a_deadline_thread_is_refused_and_runs_on") {
        return;
    }
    let s = Scratch::new("sched-dl");
    let (_child, pid, tids) = start(
        &s,
        "setattr_(6, 0, 0, 0, 2_000_000, 50_000_000, 50_000_000)",
    );
    let _k = KillOnDrop(pid);
    assert_eq!(settings(tids[3]).0, 6, "SCHED_DEADLINE set");
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    assert!(err.to_string().contains("SCHED_DEADLINE"), "{err}");
    assert!(!img.exists(), "no image published");
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(st.contains("TracerPid:\t0"), "let go: {st}");
}
