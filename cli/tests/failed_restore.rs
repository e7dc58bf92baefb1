//! A failed restore of a process tree leaves nothing holding its pids: a
//! stub whose parent stub the failure killed first went to init as a
//! `[cr-ebpf] <defunct>` zombie, which held the pid where init does not
//! reap. This test is a child subreaper, so what `cr-ebpf restore` leaves
//! behind comes to it (and stays, unreaped) wherever init reaps.

use std::process::{Command, Stdio};

mod common;

use common::{clean, root, BIN};

#[test]
fn a_failed_tree_restore_leaves_no_stub_holding_a_pid() {
    if !root("a_failed_tree_restore_leaves_no_stub_holding_a_pid") {
        return;
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = std::env::temp_dir().join(format!("cr-ebpf-failed-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut w = clean("/usr/bin/python3")
        .args(["-c", cr_ebpf_perf::PARENT_AND_CHILD])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("pids"));
    let pids: Vec<i32> = std::fs::read_to_string(ctl.join("pids"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let img = dir.join("image");
    let out = Command::new(BIN)
        .args(["dump", "--pid", &pids[0].to_string(), "--images-dir"])
        .arg(&img)
        .output()
        .unwrap();
    let kill_all = || {
        for &p in &pids {
            cr_ebpf_perf::stop(p);
        }
    };
    if !out.status.success() {
        kill_all();
        panic!("dump: {}", String::from_utf8_lossy(&out.stderr));
    }
    w.wait().unwrap();
    // SAFETY: reaping the child, ours now (we are its subreaper).
    unsafe { libc::waitpid(pids[1], std::ptr::null_mut(), 0) };
    // The child's pages damaged: found as its memory is filled, once both
    // stubs exist.
    let pages = img.join(format!("proc-{}", pids[1])).join("pages.img");
    let mut b = std::fs::read(&pages).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&pages, &b).unwrap();
    let out = Command::new(BIN)
        .args(["restore", "--images-dir"])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("damaged page data"), "{err}");
    // cr-ebpf has ended: whatever it left would be ours now.
    let held: Vec<String> = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .collect();
    kill_all();
    assert!(
        held.is_empty(),
        "pids held after the failed restore: {held:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
