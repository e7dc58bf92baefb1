//! A restored process has exactly the descriptors it had, each open file as
//! it was: none of the restorer's standard descriptors where the process
//! had closed its own (ZDTM `fd`), and a memfd's open files at their
//! positions and access modes, a read-only one reopened through `/proc`
//! apart from the read-write one `memfd_create` made (ZDTM `memfd00`,
//! `memfd01`).

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Closes its standard descriptors, holds a memfd read-write at 7 (at
/// position 3) and read-only (opened again through /proc) at 8 (at 1), then
/// sleeps.
const WORKLOAD: &str = r#"
import os, sys, time
ctl = sys.argv[1]
rw = os.memfd_create("cr-ebpf-exact", 0)
os.write(rw, b"hello")
os.lseek(rw, 3, os.SEEK_SET)
ro = os.open("/proc/self/fd/%d" % rw, os.O_RDONLY)
os.read(ro, 1)
for n in (0, 1, 2):
    os.close(n)
os.dup2(rw, 7), os.dup2(ro, 8)
os.close(rw), os.close(ro)
open(os.path.join(ctl, "ready"), "w").close()
while True:
    time.sleep(0.05)
"#;

fn fds(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    v.sort();
    v
}

/// `pos` and the access mode of `fd` of `pid`, from its fdinfo.
fn pos_mode(pid: i32, fd: i32) -> (u64, i32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    let flags = i32::from_str_radix(&field("flags:"), 8).unwrap();
    (field("pos:").parse().unwrap(), flags & libc::O_ACCMODE)
}

/// Whether descriptors `a` and `b` of `pid` are one open file (`kcmp`).
fn same_open_file(pid: i32, a: i32, b: i32) -> bool {
    // SAFETY: kcmp with integer arguments only (KCMP_FILE = 0).
    unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, 0, a, b) == 0 }
}

#[test]
fn closed_stdio_stays_closed_and_memfd_open_files_keep_position_and_mode() {
    if !cr_ebpf_perf::privileged(
        "closed_stdio_stays_closed_and_memfd_open_files_keep_position_and_mode",
    ) {
        return;
    }
    let s = Scratch::new("exact-fds");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let before = fds(pid);
    assert_eq!(before, [7, 8], "the workload's own descriptors");
    assert_eq!(pos_mode(pid, 7), (3, libc::O_RDWR));
    assert_eq!(pos_mode(pid, 8), (1, libc::O_RDONLY));
    assert!(!same_open_file(pid, 7, 8));

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(
        fds(r.pid),
        before,
        "exactly its descriptors, no stdio of ours"
    );
    assert_eq!(pos_mode(r.pid, 7), (3, libc::O_RDWR), "read-write at 3");
    assert_eq!(pos_mode(r.pid, 8), (1, libc::O_RDONLY), "read-only at 1");
    assert!(
        !same_open_file(r.pid, 7, 8),
        "two open files: reading one does not move the other"
    );
    let link = std::fs::read_link(format!("/proc/{}/fd/8", r.pid)).unwrap();
    assert!(
        link.to_string_lossy().contains("memfd:cr-ebpf-exact"),
        "{link:?}"
    );
}

/// Opens a file read-write at 5 (at position 3), `flock`s it, dups it to
/// 6, opens it again at 7, forks a child that sleeps, writes the child's
/// pid, sleeps.
const SHARING: &str = r#"
import fcntl, os, sys, time
ctl = sys.argv[1]
path = os.path.join(ctl, "data")
with open(path, "wb") as f:
    f.write(b"0123456789")
a = os.open(path, os.O_RDWR)
os.lseek(a, 3, os.SEEK_SET)
fcntl.flock(a, fcntl.LOCK_EX)
os.dup2(a, 5), os.dup2(a, 6)
os.dup2(os.open(path, os.O_RDONLY), 7)
pid = os.fork()
if pid == 0:
    while True:
        time.sleep(0.05)
with open(os.path.join(ctl, "child.tmp"), "w") as f:
    f.write(str(pid))
os.rename(os.path.join(ctl, "child.tmp"), os.path.join(ctl, "child"))
while True:
    time.sleep(0.05)
"#;

/// Whether descriptor `a` of `pa` and `b` of `pb` are one open file.
fn one_description(pa: i32, a: i32, pb: i32, b: i32) -> bool {
    // SAFETY: kcmp with integer arguments only (KCMP_FILE = 0).
    unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, 0, a, b) == 0 }
}

#[test]
fn an_open_file_shared_by_dup_and_fork_is_one_open_file_again() {
    if !cr_ebpf_perf::privileged("an_open_file_shared_by_dup_and_fork_is_one_open_file_again") {
        return;
    }
    // The child comes to us when the dump kills its parent: reaped here.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let s = Scratch::new("shared-desc");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut parent = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", SHARING])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = parent.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("child"));
    let kid: i32 = std::fs::read_to_string(ctl.join("child"))
        .unwrap()
        .parse()
        .unwrap();
    let kid_guard = KillOnDrop(kid);
    let shape = |p: i32, k: i32| {
        (
            one_description(p, 5, p, 6),
            one_description(p, 5, k, 5),
            one_description(p, 6, k, 6),
            one_description(p, 5, p, 7),
            one_description(p, 7, k, 7),
        )
    };
    assert_eq!(shape(pid, kid), (true, true, true, false, true));

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = parent.wait();
    // SAFETY: reaping the killed child, ours as its subreaper.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    drop((guard, kid_guard));
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = (KillOnDrop(kid), KillOnDrop(r.pid));
    assert_eq!(r.pid, pid);
    assert_eq!(
        shape(pid, kid),
        (true, true, true, false, true),
        "dup'd and inherited descriptors share one open file again; the second open is its own"
    );
    assert_eq!(pos_mode(pid, 5), (3, libc::O_RDWR));
    assert_eq!(pos_mode(kid, 6), (3, libc::O_RDWR));
    assert_eq!(pos_mode(kid, 7), (0, libc::O_RDONLY));
    // The flock of that shared open file is held again, once.
    let other = std::fs::File::open(ctl.join("data")).unwrap();
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a descriptor of ours.
    let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, -1, "the lock is held again");
}
