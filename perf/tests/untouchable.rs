//! Processes cr-ebpf must be careful with: one in seccomp strict mode (its
//! first other syscall would kill it, so cr-ebpf's injected calls run with
//! its seccomp suspended) is checkpointed and runs on; one another process
//! traces with ptrace (a thread has one tracer) is refused before anything
//! is done to it, and runs on.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};

/// A python3 parent with one child: `CHILD` runs in the child after the
/// fork; the parent writes the child's pid to `ctl/child` and `PARENT`
/// runs, then it sleeps.
const TREE: &str = r#"
import ctypes, os, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    CHILD
    os._exit(0)
PARENT
with open(os.path.join(ctl, 'child.tmp'), 'w') as f:
    f.write(str(pid))
os.rename(os.path.join(ctl, 'child.tmp'), os.path.join(ctl, 'child'))
while True:
    time.sleep(0.05)
"#;

fn start(s: &Scratch, child: &str, parent: &str) -> (std::process::Child, i32, i32) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let code = TREE.replace("CHILD", child).replace("PARENT", parent);
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", &code])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let p = spawn_clean(&mut cmd);
    cr_ebpf_perf::wait_for_file(&ctl.join("child"));
    let kid: i32 = std::fs::read_to_string(ctl.join("child"))
        .unwrap()
        .parse()
        .unwrap();
    let pid = p.id() as i32;
    (p, pid, kid)
}

/// The process's state letter, `None` once it is gone.
fn state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].chars().next()
}

/// `pid` stays alive (not a zombie, not gone) for a while.
fn runs_on(pid: i32, what: &str) {
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let st = state(pid);
        assert!(st.is_some_and(|c| c != 'Z' && c != 'X'), "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_child_in_seccomp_strict_mode_survives_a_checkpoint() {
    if !cr_ebpf_perf::privileged("a_child_in_seccomp_strict_mode_survives_a_checkpoint") {
        return;
    }
    let s = Scratch::new("untouch-strict");
    // PR_SET_SECCOMP (22), SECCOMP_MODE_STRICT (1): then only read, write,
    // exit and sigreturn; it blocks reading a pipe nobody writes.
    let (mut p, pid, kid) = start(&s, "libc.prctl(22, 1, 0, 0, 0)\n    os.read(r, 1)", "");
    let _k = KillOnDrop(kid);
    let _g = KillOnDrop(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{kid}/status"))
        .unwrap_or_default()
        .contains("Seccomp:\t1")
    {
        assert!(
            Instant::now() < deadline,
            "the child never entered strict mode"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = s.0.join("img");
    dump(
        pid,
        &img,
        &DumpOptions {
            leave_running: true,
            ..DumpOptions::default()
        },
    )
    .expect("dump");
    let tree = cr_ebpf_image::tree::Tree::read(&img).expect("a tree image");
    let child = tree.processes.iter().find(|p| p.pid == kid).unwrap();
    let m = cr_ebpf_image::Manifest::read(&img.join(&child.dir)).unwrap();
    let creds = m.threads[0].creds.as_ref().unwrap();
    assert_eq!(creds.seccomp_mode, 1, "strict mode recorded");
    runs_on(kid, "the strict-mode child");
    runs_on(pid, "the parent");
    assert!(p.try_wait().unwrap().is_none());
}

/// A second child, forked after the first (so checkpointed after it),
/// with a sealed mapping (`mseal`), which a checkpoint refuses; its pid in
/// `ctl/sealed`.
const SEALED_SIBLING: &str = r#"
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
sib = os.fork()
if sib == 0:
    at = libc.mmap(None, 4096, 3, 0x22, -1, 0)
    assert libc.syscall(462, ctypes.c_void_p(at), ctypes.c_size_t(4096), ctypes.c_ulong(0)) == 0, ctypes.get_errno()
    with open(os.path.join(ctl, 'sealed.tmp'), 'w') as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(ctl, 'sealed.tmp'), os.path.join(ctl, 'sealed'))
    while True:
        time.sleep(0.05)
"#;

/// A dump that fails after it asked the strict-mode child its state (its
/// sibling, checkpointed after it, is refused) lets it go alive, still in
/// strict mode: a failed dump used to kill it (ZDTM `seccomp_strict`).
#[test]
fn a_failed_dump_leaves_a_child_in_seccomp_strict_mode_running() {
    if !cr_ebpf_perf::privileged("a_failed_dump_leaves_a_child_in_seccomp_strict_mode_running") {
        return;
    }
    let s = Scratch::new("untouch-strict-failed");
    let (mut p, pid, kid) = start(
        &s,
        "libc.prctl(22, 1, 0, 0, 0)\n    os.read(r, 1)",
        SEALED_SIBLING,
    );
    let _k = KillOnDrop(kid);
    let _g = KillOnDrop(pid);
    let sealed_at = s.0.join("ctl").join("sealed");
    cr_ebpf_perf::wait_for_file(&sealed_at);
    let sib: i32 = std::fs::read_to_string(&sealed_at)
        .unwrap()
        .parse()
        .unwrap();
    let _s = KillOnDrop(sib);
    let strict = || {
        std::fs::read_to_string(format!("/proc/{kid}/status"))
            .unwrap_or_default()
            .contains("Seccomp:\t1")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !strict() {
        assert!(
            Instant::now() < deadline,
            "the child never entered strict mode"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    assert_eq!(
        children.split_whitespace().collect::<Vec<_>>(),
        [kid.to_string(), sib.to_string()],
        "the strict-mode child is checkpointed first"
    );
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not supported: a sealed mapping"), "{err}");
    assert!(!img.exists(), "no image published");
    runs_on(kid, "the strict-mode child");
    assert!(strict(), "still in strict mode");
    runs_on(sib, "the sealed sibling");
    runs_on(pid, "the parent");
    assert!(p.try_wait().unwrap().is_none());
}

#[test]
fn a_child_traced_by_its_parent_is_refused_and_both_run_on() {
    if !cr_ebpf_perf::privileged("a_child_traced_by_its_parent_is_refused") {
        return;
    }
    let s = Scratch::new("untouch-traced");
    // PTRACE_SEIZE (0x4206) of the child by the parent.
    let (mut p, pid, kid) = start(
        &s,
        "while True:\n        time.sleep(0.05)",
        "assert libc.ptrace(0x4206, pid, 0, 0) == 0, ctypes.get_errno()",
    );
    let _k = KillOnDrop(kid);
    let _g = KillOnDrop(pid);
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not supported: a traced thread")
            && err.contains(&format!("traced by process {pid}")),
        "{err}"
    );
    assert!(!img.exists(), "no image published");
    runs_on(kid, "the traced child");
    runs_on(pid, "the tracing parent");
    assert!(p.try_wait().unwrap().is_none());
}
