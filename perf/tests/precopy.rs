//! A full dump pre-copies memory while the process runs: what it restores
//! must still be the memory of the frozen process, page for page, however
//! the process changed it meanwhile (writes, dropped pages read back as
//! zeroes, regions swapped by `mremap`, which keeps the pages' write
//! state). The `churn` workload does all of that without pause and checks
//! itself after the restore.

use std::process::Command;

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, stop, wait_line, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const CHURN: &str = env!("CARGO_BIN_EXE_churn");

/// Pages of each of the two regions (32 MiB each).
const PAGES: usize = 8192;

#[test]
fn a_dump_of_a_process_rewriting_dropping_and_moving_its_memory_restores_it_exactly() {
    if !cr_ebpf_perf::privileged("a_dump_of_a_process_rewriting_dropping_and_moving_its_memory") {
        return;
    }
    let s = Scratch::new("precopy");
    let mut precopied = 0;
    for round in 0..4 {
        let log = s.0.join(format!("log-{round}"));
        let mut w = spawn_clean(Command::new(CHURN).arg(&log).arg(PAGES.to_string()));
        let pid = w.id() as i32;
        let _g = KillOnDrop(pid);
        wait_line(&log, 0, "ready");
        // The checker agrees with the live process.
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let line = wait_line(&log, 1, "ok");
        assert_eq!(line, format!("ok {}", 2 * PAGES));
        std::thread::sleep(std::time::Duration::from_millis(20 * round));
        let img = s.0.join(format!("img-{round}"));
        let r = dump(pid, &img, &DumpOptions::default()).expect("dump");
        precopied += r.precopied;
        let _ = w.wait();
        let back = restore(&img, &RestoreOptions::default()).expect("restore");
        assert_eq!(back.pid, pid);
        // SAFETY: a signal to the restored process, our child now.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let line = wait_line(&log, 2, "");
        stop(pid);
        assert_eq!(
            line,
            format!("ok {}", 2 * PAGES),
            "round {round}: the restored memory is not the frozen one ({r:?})"
        );
    }
    assert!(precopied > 0, "pre-copy took no page");
}

/// The pre-copy makes its stores in a directory of its own next to the
/// image's, made then: one that is there already (another user's, with a
/// link where a store would go) is neither used nor removed, and the dump
/// goes on without pre-copy.
#[test]
fn a_planted_pre_copy_directory_is_not_used() {
    if !cr_ebpf_perf::privileged("a_planted_pre_copy_directory_is_not_used") {
        return;
    }
    use std::os::unix::fs::symlink;
    let s = Scratch::new("precopy-planted");
    let log = s.0.join("log");
    let mut w = spawn_clean(Command::new(CHURN).arg(&log).arg("256"));
    let pid = w.id() as i32;
    let _g = KillOnDrop(pid);
    wait_line(&log, 0, "ready");
    let victim = s.0.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let planted = s.0.join(format!(".img.tmp-{}-precopy", std::process::id()));
    std::fs::create_dir(&planted).unwrap();
    symlink(&victim, planted.join(format!("pages-{pid}.img"))).unwrap();
    let img = s.0.join("img");
    let r = dump(pid, &img, &DumpOptions::default()).expect("dump");
    assert_eq!(r.precopied, 0, "no pre-copy into a directory found there");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(
        planted.join(format!("pages-{pid}.img")).is_symlink(),
        "left as found"
    );
    let _ = w.wait();
    let back = restore(&img, &RestoreOptions::default()).expect("restore");
    stop(back.pid);
}
