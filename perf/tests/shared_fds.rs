//! A descriptor table shared with a child (`CLONE_FILES`) is shared again
//! after a restore: a descriptor the parent opens afterwards is the
//! child's too, and not that of a child with a table of its own.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const WORKLOAD: &str = r#"
import ctypes, os, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
def answer(name):
    # Says whether descriptor 77 is open here, when asked.
    while True:
        if os.path.exists(os.path.join(ctl, 'check')):
            try:
                os.fstat(77); seen = '1'
            except OSError:
                seen = '0'
            with open(os.path.join(ctl, name + '.tmp'), 'w') as f:
                f.write(seen)
            os.rename(os.path.join(ctl, name + '.tmp'), os.path.join(ctl, name))
            time.sleep(60)
        time.sleep(0.02)
# clone(CLONE_FILES | SIGCHLD) without a new stack: a fork that shares
# the descriptor table.
pid = libc.syscall(56, 0x400 | 17, 0, 0, 0, 0)
if pid == 0:
    answer('shared')
if os.fork() == 0:
    answer('own')
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'open')):
    time.sleep(0.02)
os.dup2(os.open('/dev/null', os.O_RDONLY), 77)
open(os.path.join(ctl, 'check'), 'w').close()
time.sleep(120)
"#;

fn wait(path: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(v) = std::fs::read_to_string(path) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_descriptor_table_shared_with_a_child_is_shared_again() {
    if !cr_ebpf_perf::privileged("a_descriptor_table_shared_with_a_child_is_shared_again") {
        return;
    }
    // SAFETY: plain prctl; the restored tree's processes are our children
    // only through this (they are reaped by the guards' kills below).
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let s = Scratch::new("shared-fds");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    wait(&ctl.join("ready"));
    let kids: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    let _k: Vec<KillOnDrop> = kids.iter().map(|&k| KillOnDrop(k)).collect();

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    for k in &kids {
        // SAFETY: reaping the killed children (we are their subreaper).
        unsafe { libc::waitpid(*k, std::ptr::null_mut(), 0) };
    }
    let tree = cr_ebpf_image::tree::Tree::read(&img).unwrap();
    let sharing: Vec<bool> = tree.processes.iter().map(|p| p.shares_files).collect();
    assert_eq!(
        sharing,
        [false, true, false],
        "recorded: {:?}",
        tree.processes
    );

    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    std::fs::write(ctl.join("open"), "").unwrap();
    assert_eq!(wait(&ctl.join("shared")), "1", "the sharing child sees it");
    assert_eq!(wait(&ctl.join("own")), "0", "the other one does not");
    for p in [pid, kids[0], kids[1]] {
        // SAFETY: killing and reaping the restored tree.
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
    for p in [kids[0], kids[1], pid] {
        // SAFETY: as above.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
    }
}
