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
const TICKER: &str = env!("CARGO_BIN_EXE_ticker");

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

/// A chunk damaged on disk in memory the process has not touched when it
/// runs: the fill fails naming the damage and the process is killed, never
/// left to run on with pages it did not have. Random data (chunks stored as
/// they are, checked where they lie in the page store) and compressible
/// data (checked as they are decompressed).
#[test]
fn a_lazily_restored_process_whose_image_is_damaged_is_killed() {
    if !cr_ebpf_perf::privileged("a_lazily_restored_process_whose_image_is_damaged_is_killed") {
        return;
    }
    let s = Scratch::new("lazy-damaged");
    for data in ["random", "compressible"] {
        let log = s.0.join(format!("log-{data}"));
        let mut cmd = Command::new(TICKER);
        cmd.arg(&log).arg("64").arg("60000");
        if data == "compressible" {
            cmd.arg("compressible");
        }
        let mut w = spawn_clean(&mut cmd);
        let pid = w.id() as i32;
        let _g = KillOnDrop(pid);
        wait_line(&log, 0, "tick 1 ok");
        let img = s.0.join(format!("img-{data}"));
        dump(pid, &img, &DumpOptions::default()).expect("dump");
        let _ = w.wait();
        // One byte flipped in the middle of the page store: in the 64 MiB
        // the workload filled, which a lazy restore loads after it runs.
        let store = find(&img, cr_ebpf_image::PAGES_FILE).expect("a page store");
        let mut bytes = std::fs::read(&store).expect("read the page store");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x5a;
        std::fs::write(&store, &bytes).expect("damage the page store");
        let r = restore(
            &img,
            &RestoreOptions {
                lazy: true,
                ..Default::default()
            },
        )
        .expect("the process runs: the damage is in memory it has not touched");
        let err = r
            .lazy
            .expect("a lazy fill")
            .wait()
            .expect_err("the damaged chunk fails the fill");
        assert!(
            err.to_string().contains("damaged page data"),
            "{data}: {err}"
        );
        let mut status = 0;
        // SAFETY: waits for the restored process, our child.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(got, pid, "{data}");
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "{data}: the process was not killed (status {status:#x})"
        );
    }
}

/// The file named `name` under `dir`.
fn find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}
