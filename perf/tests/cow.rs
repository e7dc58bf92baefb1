//! Copy-on-write sharing between a parent and the child it forked comes
//! back after a dump and restore: the pages they still share are one page
//! again (same frame in `/proc/PID/pagemap`), the pages the child wrote are
//! its own with its contents, the parent's are the parent's.

use std::{
    os::unix::fs::FileExt as _,
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const PAGES: u64 = 256;
const CHILD_WRITES: u64 = 16;

/// A parent fills 256 private pages (page i starts with "parent i"), forks
/// a child that writes "child i" into the first 16, and both wait.
const WORKLOAD: &str = r#"
import ctypes, mmap, os, sys, time
ctl, pages, child_writes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = mmap.mmap(-1, pages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(pages):
    m[i * 4096:i * 4096 + 16] = b"parent %8d" % i + b"\0"
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
pid = os.fork()
if pid == 0:
    for i in range(child_writes):
        m[i * 4096:i * 4096 + 16] = b"child  %8d" % i + b"\0"
    open(os.path.join(ctl, "child-ready"), "w").close()
    while True:
        time.sleep(0.05)
with open(os.path.join(ctl, "info.tmp"), "w") as f:
    f.write("%d %d" % (pid, addr))
os.rename(os.path.join(ctl, "info.tmp"), os.path.join(ctl, "info"))
while True:
    time.sleep(0.05)
"#;

/// The frame of each page of `pid` from `addr` (0: not present).
fn frames(pid: i32, addr: u64) -> Vec<u64> {
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let mut b = vec![0u8; PAGES as usize * 8];
    pm.read_exact_at(&mut b, addr / 4096 * 8).unwrap();
    b.chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
        .map(|e| if e >> 63 == 1 { e & ((1 << 55) - 1) } else { 0 })
        .collect()
}

/// How many of the pages the two processes share (one frame).
fn shared(parent: i32, child: i32, addr: u64) -> usize {
    frames(parent, addr)
        .iter()
        .zip(frames(child, addr))
        .filter(|(a, b)| **a != 0 && **a == *b)
        .count()
}

/// The first 16 bytes of page `i` of `pid`.
fn head(pid: i32, addr: u64, i: u64) -> Vec<u8> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = vec![0u8; 16];
    mem.read_exact_at(&mut b, addr + i * 4096).unwrap();
    b
}

/// Starts the workload; returns it, the child's pid and the mapping.
fn start(s: &Scratch) -> (std::process::Child, i32, u64) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let parent = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .arg(PAGES.to_string())
            .arg(CHILD_WRITES.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    cr_ebpf_perf::wait_for_file(&ctl.join("info"));
    cr_ebpf_perf::wait_for_file(&ctl.join("child-ready"));
    let info = std::fs::read_to_string(ctl.join("info")).unwrap();
    let (kid, addr) = info.split_once(' ').unwrap();
    (parent, kid.parse().unwrap(), addr.parse().unwrap())
}

#[test]
fn pages_a_child_shares_with_its_parent_are_shared_again() {
    if !cr_ebpf_perf::privileged("pages_a_child_shares_with_its_parent_are_shared_again") {
        return;
    }
    // The child comes to us when the dump kills its parent: reaped here.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let s = Scratch::new("cow");
    let (mut parent, kid, addr) = start(&s);
    let pid = parent.id() as i32;
    let g = KillOnDrop(pid);
    let k = KillOnDrop(kid);
    let before = shared(pid, kid, addr);
    assert_eq!(before, (PAGES - CHILD_WRITES) as usize, "shared before");

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = parent.wait();
    // SAFETY: reaping the killed child, ours as its subreaper.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    drop((g, k));
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = (KillOnDrop(kid), KillOnDrop(r.pid));
    assert_eq!(
        shared(pid, kid, addr),
        before,
        "shared again after the restore"
    );
    for i in [0, CHILD_WRITES - 1] {
        assert_eq!(head(kid, addr, i), format!("child  {i:8}\0").into_bytes());
        assert_eq!(head(pid, addr, i), format!("parent {i:8}\0").into_bytes());
    }
    for i in [CHILD_WRITES, PAGES - 1] {
        assert_eq!(head(kid, addr, i), format!("parent {i:8}\0").into_bytes());
    }
}

/// Reading memory must not copy what a running tree shares: a dump that
/// leaves it running, with and without pre-copy, and every checkpoint of a
/// tracked session leave the shared pages shared (`process_vm_readv`, used
/// before, gave the parent a private copy of every page it read).
#[test]
fn checkpoints_of_a_running_tree_leave_its_shared_pages_shared() {
    if !cr_ebpf_perf::privileged("checkpoints_of_a_running_tree_leave_its_shared_pages_shared") {
        return;
    }
    let s = Scratch::new("cow-live");
    let (mut parent, kid, addr) = start(&s);
    let pid = parent.id() as i32;
    let _k = (KillOnDrop(pid), KillOnDrop(kid));
    let before = shared(pid, kid, addr);
    assert_eq!(before, (PAGES - CHILD_WRITES) as usize, "shared before");
    for no_precopy in [false, true] {
        let img = s.0.join(format!("img-{no_precopy}"));
        let opts = DumpOptions {
            leave_running: true,
            no_precopy,
            ..Default::default()
        };
        let r = dump(pid, &img, &opts).expect("dump");
        assert!(r.pages > PAGES, "{r:?}");
        assert_eq!(
            shared(pid, kid, addr),
            before,
            "still shared after a dump (no_precopy: {no_precopy})"
        );
    }
    let tracker = cr_ebpf_dirty_tracker::attach::attach(pid).expect("attach");
    let images = s.0.join("images");
    let mut session = cr_ebpf_checkpoint::Session::new(
        pid,
        &images,
        Some(tracker),
        cr_ebpf_checkpoint::SessionOptions::default(),
    )
    .expect("session");
    session.follow(std::time::Duration::ZERO);
    session.prime().expect("prime");
    for _ in 0..2 {
        let all = cr_ebpf_checkpoint::Changes::all();
        session.checkpoint(&all).expect("checkpoint");
        assert_eq!(
            shared(pid, kid, addr),
            before,
            "still shared after a checkpoint"
        );
    }
    drop(session);
    let _ = parent.kill();
    let _ = parent.wait();
}
