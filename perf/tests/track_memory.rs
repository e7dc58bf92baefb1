//! A tracked process's full checkpoint holds the pages it has, not every
//! page its mappings could hold: 64 threads (64 stacks of 8 MiB, almost
//! all untouched) checkpointed by a tracked session, and restored, take
//! about the memory they took before.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{Changes, Method, Session, SessionOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const THREADS: &str = r#"
import os, sys, threading, time
ts = [threading.Thread(target=time.sleep, args=(600,)) for _ in range(64)]
for t in ts:
    t.start()
open(os.path.join(sys.argv[1], "ready"), "w").close()
time.sleep(600)
"#;

/// `VmRSS` of `pid`, in pages.
fn rss_pages(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kb / 4
}

#[test]
fn a_tracked_full_checkpoint_stores_the_pages_there_are_not_whole_stacks() {
    if !cr_ebpf_perf::privileged(
        "a_tracked_full_checkpoint_stores_the_pages_there_are_not_whole_stacks",
    ) {
        return;
    }
    let s = Scratch::new("track-memory");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", THREADS])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let before = rss_pages(pid);
    let images = s.0.join("images");
    let tracker = cr_ebpf_dirty_tracker::attach::attach(pid).expect("attach");
    let mut session =
        Session::new(pid, &images, Some(tracker), SessionOptions::default()).expect("session");
    let pre = session.prime().expect("prime (as track does first)");
    let r = session.checkpoint(&Changes::all()).expect("checkpoint");
    assert_eq!(r.method, Method::Full);
    eprintln!(
        "rss {before} pages; pre-copied {}, stored {}",
        pre.pages, r.pages
    );
    // 64 stacks of 8 MiB are 131072 pages: only what is there is stored.
    assert!(
        r.pages * 10 <= before * 11,
        "stored {} pages for an RSS of {before}",
        r.pages
    );
    drop(session);
    // SAFETY: plain kill; then reaping our child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
    let back = restore(&r.dir, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(back.pid);
    let after = rss_pages(back.pid);
    eprintln!("rss after restore {after} pages");
    assert!(
        after * 10 <= before * 11,
        "RSS {after} pages after the restore, {before} before"
    );
}
