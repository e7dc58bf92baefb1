//! A restore from a page store that is not in the page cache (after a
//! reboot, on another machine) reads it with `O_DIRECT` in file order: what
//! it restores is the frozen memory, page for page (its report counts
//! every page as read that way; from a store in the page cache, none), and
//! a damaged chunk is still refused before anything runs.

use std::{os::fd::AsRawFd as _, path::Path, process::Command};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, stop, wait_line, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const CHURN: &str = env!("CARGO_BIN_EXE_churn");

/// Pages of each of the churn workload's two regions (32 MiB each).
const PAGES: usize = 8192;

/// Drops the page store of the image at `img` from the page cache (it was
/// fsynced by the dump: its pages are clean and go).
fn evict(img: &Path) {
    let f = std::fs::File::open(img.join(cr_ebpf_image::PAGES_FILE)).unwrap();
    // SAFETY: advice on a descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
    let store = cr_ebpf_image::pages::PageStore::open(img).unwrap();
    assert!(store.resident() < 0.5, "evicted: {}", store.resident());
}

/// A churn workload dumped (killed) into `img`; its pid.
fn dumped(s: &Scratch, name: &str) -> (i32, std::path::PathBuf, std::path::PathBuf) {
    let log = s.0.join(format!("log-{name}"));
    let mut w = spawn_clean(Command::new(CHURN).arg(&log).arg(PAGES.to_string()));
    let pid = w.id() as i32;
    let _g = KillOnDrop(pid);
    wait_line(&log, 0, "ready");
    let img = s.0.join(format!("img-{name}"));
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = w.wait();
    (pid, img, log)
}

#[test]
fn a_restore_from_a_cold_store_brings_back_the_frozen_memory() {
    if !cr_ebpf_perf::privileged("a_restore_from_a_cold_store_brings_back_the_frozen_memory") {
        return;
    }
    let s = Scratch::new("cold-restore");
    // Two rounds from an evicted store, the last from one in the page cache.
    for round in 0..3 {
        let (pid, img, log) = dumped(&s, &round.to_string());
        evict(&img);
        let cold = round < 2;
        if !cold {
            std::fs::read(img.join(cr_ebpf_image::PAGES_FILE)).unwrap();
        }
        let back = restore(&img, &RestoreOptions::default()).expect("restore");
        assert_eq!(back.pid, pid);
        let direct = if cold { back.pages } else { 0 };
        assert_eq!(
            back.direct_pages, direct,
            "round {round}: pages read past the page cache (cold: {cold})"
        );
        // SAFETY: a signal to the restored process, our child now.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let line = wait_line(&log, 1, "");
        stop(pid);
        assert_eq!(line, format!("ok {}", 2 * PAGES), "round {round}");
    }
}

#[test]
fn a_damaged_chunk_of_a_cold_store_is_refused_before_anything_runs() {
    if !cr_ebpf_perf::privileged("a_damaged_chunk_of_a_cold_store_is_refused_before_anything_runs")
    {
        return;
    }
    let s = Scratch::new("cold-damaged");
    let (pid, img, _log) = dumped(&s, "d");
    // A byte of a chunk early in the store flipped (its 4 KiB after the
    // header: chunk data), with many windows still to read after it: the
    // reader must not be left waiting for a buffer the failed fill holds.
    let p = img.join(cr_ebpf_image::PAGES_FILE);
    let mut b = std::fs::read(&p).unwrap();
    assert!(b.len() > 32 << 20, "several windows");
    b[4096] ^= 0x5a;
    std::fs::write(&p, &b).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    f.sync_all().unwrap();
    drop(f);
    evict(&img);
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    let e = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(
        e.contains("damaged page data") && e.contains("checksum mismatch"),
        "{e}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nothing of it runs"
    );
}
