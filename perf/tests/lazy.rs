//! Lazy restore: the process runs before its memory is in, and must see
//! exactly the memory of its checkpoint all the same, while it goes on
//! writing, dropping pages (`MADV_DONTNEED`: zeroes, never the image) and
//! moving regions (`mremap`: the pages still due follow them), and in a
//! child it forks before every page is in.

use std::process::Command;

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, stop, wait_line, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const CHURN: &str = env!("CARGO_BIN_EXE_churn");

/// Pages of each of the two regions (64 MiB each).
const PAGES: usize = 16384;

#[test]
fn a_lazily_restored_process_sees_its_memory_while_it_changes_it_and_forks() {
    if !cr_ebpf_perf::privileged("a_lazily_restored_process_sees_its_memory") {
        return;
    }
    let s = Scratch::new("lazy");
    for round in 0..3 {
        let log = s.0.join(format!("log-{round}"));
        let mut w = spawn_clean(Command::new(CHURN).arg(&log).arg(PAGES.to_string()));
        let pid = w.id() as i32;
        let _g = KillOnDrop(pid);
        wait_line(&log, 0, "ready");
        let img = s.0.join(format!("img-{round}"));
        dump(pid, &img, &DumpOptions::default()).expect("dump");
        let _ = w.wait();
        let r = restore(
            &img,
            &RestoreOptions {
                lazy: true,
                ..Default::default()
            },
        )
        .expect("lazy restore");
        let fill = r.lazy.clone().expect("a lazy fill");
        // Checked at once, then forked, while pages are still due (round
        // 0 forks first).
        let signals = if round == 0 {
            [libc::SIGUSR2, libc::SIGUSR1]
        } else {
            [libc::SIGUSR1, libc::SIGUSR2]
        };
        for sig in signals {
            // SAFETY: a signal to the restored process, our child.
            unsafe { libc::kill(pid, sig) };
        }
        let report = fill.wait().expect("the fill completes");
        // Most pages are copied; those it dropped meanwhile
        // (`MADV_DONTNEED`) are not, and must read as zeroes: its check.
        assert!(report.pages > PAGES as u64, "{report:?}");
        let own = wait_line(&log, 1, "ok");
        let child = wait_line(&log, 1, "child");
        // And once everything is in.
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let after = wait_line(&log, 3, "ok");
        stop(pid);
        let want = format!("ok {}", 2 * PAGES);
        assert_eq!(own, want, "round {round}, during the fill ({report:?})");
        assert_eq!(child, format!("child {want}"), "round {round}: the child");
        assert_eq!(after, want, "round {round}, after the fill");
    }
}
