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
