//! A workload that changes its state in numbered epochs, on request, and
//! reports that state, so tests can tell exactly which epoch a restored
//! process is in.
//!
//! Fills `MIB` MiB with a seeded pattern. On `SIGUSR1` it runs the next
//! epoch: writes a new value into `PCT`‰ (per mille) of its pages, chosen
//! from the epoch number, and (with `layout`) maps or unmaps a small region
//! and opens or closes a file. It then appends to `LOG` one line
//! `epoch K STATE pages P1,P2,…` (page indices written; omitted above 4096).
//! On `SIGUSR2` it appends `now K STATE`, computed afresh. `STATE` is
//! `sum S maps [ADDR+LEN=SUM …] fds [FD=OFFSET …]`: a restored process
//! must report exactly the state of the epoch its checkpoint was taken in.
//!
//! Usage: `epochs LOG MIB PERMILLE [layout]`

use std::{
    io::Write as _,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU32, Ordering},
};

use cr_ebpf_perf::xorshift;

static NEXT: AtomicU32 = AtomicU32::new(0);
static REPORT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    NEXT.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    REPORT.fetch_add(1, Ordering::SeqCst);
}

fn sum(words: &[u64]) -> u64 {
    words.iter().enumerate().fold(0u64, |a, (i, &w)| {
        a.wrapping_add(w.rotate_left(i as u32 & 63))
    })
}

struct Extra {
    addr: *mut u64,
    len: usize,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let log_path = args
        .next()
        .expect("usage: epochs LOG MIB PERMILLE [layout]");
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let permille: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let layout = args.next().as_deref() == Some("layout");
    let dir = std::path::Path::new(&log_path)
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    // Page-aligned, so page indices in the log are pages of the mapping.
    // SAFETY: a fresh private anonymous mapping, never unmapped.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mib << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap {mib} MiB");
    // SAFETY: the mapping is `mib` MiB, readable and writable, ours alone.
    let mem: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(base as *mut u64, mib << 17) };
    for w in mem.iter_mut() {
        *w = xorshift(&mut seed);
    }
    let pages = mem.len() / 512;
    let mut extras: Vec<Extra> = Vec::new();
    let mut files: Vec<std::fs::File> = Vec::new();
    // SAFETY: installing plain handlers that only touch atomics.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t);
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open log");
    let state = |mem: &[u64], extras: &[Extra], files: &[std::fs::File]| -> String {
        let mut s = format!("sum {:x} maps [", sum(mem));
        for e in extras {
            // SAFETY: each extra region is a live mapping of `len` words.
            let w = unsafe { std::slice::from_raw_parts(e.addr, e.len) };
            s.push_str(&format!("{:x}+{}={:x} ", e.addr as u64, e.len * 8, sum(w)));
        }
        s.push_str("] fds [");
        for f in files {
            // SAFETY: lseek on a descriptor we own.
            let off = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_CUR) };
            s.push_str(&format!("{}={off} ", f.as_raw_fd()));
        }
        s.push(']');
        s
    };
    let ready = format!(
        "ready pid {} base {:x} pages {pages}\n",
        std::process::id(),
        base as u64
    );
    log.write_all(ready.as_bytes()).expect("log");
    let mut epoch = 0u64;
    loop {
        if NEXT.load(Ordering::SeqCst) > 0 {
            NEXT.fetch_sub(1, Ordering::SeqCst);
            epoch += 1;
            let n = (pages * permille / 1000).max(1);
            let mut r = epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut written = Vec::with_capacity(n);
            for _ in 0..n {
                let p = xorshift(&mut r) as usize % pages;
                mem[p * 512] = epoch << 32 | p as u64;
                mem[p * 512 + 511] ^= epoch;
                written.push(p);
            }
            written.sort_unstable();
            written.dedup();
            if layout {
                match epoch % 3 {
                    0 => {
                        let len = (epoch as usize % 5 + 1) * 512;
                        // SAFETY: a fresh anonymous mapping, owned by `extras`.
                        let a = unsafe {
                            libc::mmap(
                                std::ptr::null_mut(),
                                len * 8,
                                libc::PROT_READ | libc::PROT_WRITE,
                                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                                -1,
                                0,
                            )
                        };
                        assert_ne!(a, libc::MAP_FAILED);
                        let a = a as *mut u64;
                        for i in 0..len {
                            // SAFETY: inside the mapping just made.
                            unsafe { a.add(i).write(epoch ^ i as u64) };
                        }
                        extras.push(Extra { addr: a, len });
                    }
                    1 => {
                        if !extras.is_empty() {
                            let e = extras.remove(0);
                            // SAFETY: unmapping a region this program mapped.
                            unsafe { libc::munmap(e.addr as *mut _, e.len * 8) };
                        }
                    }
                    _ => {
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .truncate(true)
                            .read(true)
                            .write(true)
                            .open(dir.join(format!("epoch-file-{epoch}")))
                            .expect("open epoch file");
                        f.write_all(&vec![b'x'; epoch as usize]).expect("write");
                        files.push(f);
                        if files.len() > 2 {
                            files.remove(0);
                        }
                    }
                }
            }
            let list = if written.len() <= 4096 {
                written
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                "many".to_string()
            };
            // One write per line: readers never see half a line.
            let line = format!(
                "epoch {epoch} {} pages {list}\n",
                state(mem, &extras, &files)
            );
            log.write_all(line.as_bytes()).expect("log");
        }
        if REPORT.load(Ordering::SeqCst) > 0 {
            REPORT.fetch_sub(1, Ordering::SeqCst);
            let line = format!("now {epoch} {}\n", state(mem, &extras, &files));
            log.write_all(line.as_bytes()).expect("log");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
