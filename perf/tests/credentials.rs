//! Credentials come back exactly, thread by thread: a python3 process
//! started as root takes another uid and gid with supplementary groups,
//! keeps only a few capabilities (one ambient), drops one from its bounding
//! set, sets its audit login uid, no_new_privs and a seccomp filter that
//! makes `getppid` fail with `EBADFD`, while a second thread runs as yet
//! another user. After dump, kill and restore, `/proc/PID/status` of each
//! thread shows the same credentials and the filter still acts.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// The workload: every credential change by a raw syscall, which changes
/// the calling thread only (glibc's wrappers would change every thread).
const WORKLOAD: &str = r#"
import ctypes, os, struct, sys, threading, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(*a):
    r = libc.syscall(*[ctypes.c_long(x) for x in a])
    if r < 0:
        raise OSError(ctypes.get_errno(), 'syscall %d' % a[0])
    return r
def put(name, text):
    with open(os.path.join(ctl, name + '.tmp'), 'w') as f:
        f.write(text)
    os.rename(os.path.join(ctl, name + '.tmp'), os.path.join(ctl, name))
def other():
    sc(119, 2001, 2002, 2003)      # setresgid
    sc(117, 2001, 2002, 2003)      # setresuid
    put('tid', str(threading.get_native_id()))
    while True:
        time.sleep(0.05)
threading.Thread(target=other, daemon=True).start()
while not os.path.exists(os.path.join(ctl, 'tid')):
    time.sleep(0.01)
with open('/proc/thread-self/loginuid', 'w') as f:
    f.write('4242')
sc(157, 24, 16, 0, 0, 0)           # PR_CAPBSET_DROP CAP_SYS_MODULE
sc(157, 8, 1, 0, 0, 0)             # PR_SET_KEEPCAPS
groups = (ctypes.c_uint * 2)(4000, 4001)
sc(116, 2, ctypes.addressof(groups))
sc(119, 3000, 3000, 3000)
sc(117, 3000, 3000, 3000)
hdr = (ctypes.c_uint * 2)(0x20080522, 0)
keep = (1 << 10) | (1 << 5)        # CAP_NET_BIND_SERVICE, CAP_KILL
data = (ctypes.c_uint * 6)(keep, keep, 1 << 10, 0, 0, 0)
sc(126, ctypes.addressof(hdr), ctypes.addressof(data))
sc(157, 47, 2, 10, 0, 0)           # PR_CAP_AMBIENT_RAISE CAP_NET_BIND_SERVICE
sc(157, 38, 1, 0, 0, 0)            # PR_SET_NO_NEW_PRIVS
prog = struct.pack('<HBBI', 0x20, 0, 0, 0)           # ld [nr]
prog += struct.pack('<HBBI', 0x15, 0, 1, 110)        # jeq getppid
prog += struct.pack('<HBBI', 0x06, 0, 0, 0x00050000 | 77)  # errno EBADFD
prog += struct.pack('<HBBI', 0x06, 0, 0, 0x7fff0000)       # allow
buf = ctypes.create_string_buffer(prog, len(prog))
fprog = ctypes.create_string_buffer(struct.pack('<HxxxxxxQ', 4, ctypes.addressof(buf)), 16)
sc(157, 22, 2, ctypes.addressof(fprog), 0, 0)      # PR_SET_SECCOMP filter
put('ready', '')
n = 0
while True:
    r = libc.syscall(110)
    if r == -1 and ctypes.get_errno() == 77:
        n += 1
        put('count', str(n))
    else:
        put('bad', 'getppid returned %d' % r)
    time.sleep(0.02)
"#;

/// The credential lines of `/proc/PID/task/TID/status`.
fn creds(pid: i32, tid: i32) -> Vec<String> {
    const KEYS: [&str; 11] = [
        "Uid:",
        "Gid:",
        "Groups:",
        "CapInh:",
        "CapPrm:",
        "CapEff:",
        "CapBnd:",
        "CapAmb:",
        "NoNewPrivs:",
        "Seccomp:",
        "Seccomp_filters:",
    ];
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let mut lines: Vec<String> = status
        .lines()
        .filter(|l| KEYS.iter().any(|k| l.starts_with(k)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.push(
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/loginuid")).unwrap_or_default(),
    );
    lines
}

fn count(ctl: &Path) -> u64 {
    std::fs::read_to_string(ctl.join("count"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits until the workload has counted past `n` (the filter acted again).
fn counts_past(ctl: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(ctl) <= n {
        assert!(!ctl.join("bad").exists(), "the filter stopped acting");
        assert!(Instant::now() < deadline, "the workload stopped counting");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !ctl.join("bad").exists(),
        "{}",
        std::fs::read_to_string(ctl.join("bad")).unwrap_or_default()
    );
}

#[test]
fn credentials_and_a_seccomp_filter_come_back_exactly() {
    if !cr_ebpf_perf::privileged("credentials_and_a_seccomp_filter_come_back_exactly") {
        return;
    }
    let s = Scratch::new("creds");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    // The workload writes here as uid 3000.
    std::fs::set_permissions(&s.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", WORKLOAD])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_clean(&mut cmd);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    counts_past(&ctl, 0);
    let tid: i32 = std::fs::read_to_string(ctl.join("tid"))
        .unwrap()
        .parse()
        .unwrap();
    let (main_before, other_before) = (creds(pid, pid), creds(pid, tid));
    assert_eq!(main_before[0], "Uid: 3000 3000 3000 3000");
    assert_eq!(main_before[2], "Groups: 4000 4001");
    assert_eq!(other_before[0], "Uid: 2001 2002 2003 2002");
    assert_ne!(main_before, other_before);

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let n = count(&ctl);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(creds(r.pid, pid), main_before, "the main thread's");
    assert_eq!(creds(r.pid, tid), other_before, "the other thread's");
    counts_past(&ctl, n);
}
