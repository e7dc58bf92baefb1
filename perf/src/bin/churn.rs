//! A workload that changes its memory every way a copy taken while it runs
//! can go stale, and checks itself: it writes pages, drops pages
//! (`MADV_DONTNEED`) and reads them back as zeroes, and swaps two regions
//! with `mremap` (pages move, keeping their frames), without pause.
//!
//! Every page says what it is: region, index and version, in every word.
//! The tables of versions live in the heap. On SIGUSR1 it checks, between
//! two operations (an operation a freeze stopped half-way is finished by
//! then), that each page of both regions holds in every word the version
//! its table says and appears exactly once, and appends `ok PAGES` or
//! `bad WHAT` to LOG. On SIGUSR2 it forks a child that makes the same check
//! of its copy and appends `child ok PAGES` or `child bad WHAT`.
//!
//! Usage: `churn LOG PAGES`

use std::{
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
};

static CHECK: AtomicBool = AtomicBool::new(false);
static FORK: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    FORK.store(true, Ordering::SeqCst);
}

/// Marks a page dropped: it reads as zeroes.
const DROPPED: u64 = u64::MAX;

/// Word `k` of page `i` of region `r` at version `v`: the first says which
/// page it is, the others mix all four.
fn word(r: u64, i: u64, v: u64, k: u64) -> u64 {
    if k == 0 {
        (r << 62) | (i << 32) | (v & 0xffff_ffff)
    } else {
        ((r << 62) ^ (i << 32) ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k).rotate_left(k as u32)
    }
}

fn map(len: usize) -> *mut u64 {
    // SAFETY: a new private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p.cast()
}

struct Regions {
    at: [*mut u64; 2],
    /// Which region is at each address now.
    holds: [u64; 2],
    ver: [Vec<u64>; 2],
    pages: usize,
}

impl Regions {
    fn page(&self, slot: usize, i: usize) -> &[u64] {
        // SAFETY: page `i` of a mapping of `pages` pages, ours alone.
        unsafe { std::slice::from_raw_parts(self.at[slot].add(i * 512), 512) }
    }

    fn page_mut(&mut self, slot: usize, i: usize) -> &mut [u64] {
        // SAFETY: as for `page`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.at[slot].add(i * 512), 512) }
    }

    fn write(&mut self, slot: usize, i: usize) {
        let r = self.holds[slot] as usize;
        let v = match self.ver[r][i] {
            DROPPED => 0,
            v => v + 1,
        };
        for (k, w) in self.page_mut(slot, i).iter_mut().enumerate() {
            // SAFETY: a valid, aligned word of the page.
            unsafe { std::ptr::write_volatile(w, word(r as u64, i as u64, v, k as u64)) };
        }
        self.ver[r][i] = v;
    }

    fn drop_page(&mut self, slot: usize, i: usize) {
        let r = self.holds[slot] as usize;
        let p = self.page_mut(slot, i).as_mut_ptr();
        // SAFETY: one page of our own mapping.
        let rc = unsafe { libc::madvise(p.cast(), 4096, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0, "madvise");
        self.ver[r][i] = DROPPED;
        // Read back: the zero page is mapped, no write.
        // SAFETY: a valid word of the page.
        assert_eq!(unsafe { std::ptr::read_volatile(p) }, 0);
    }

    /// Swaps the two regions' places by moving their pages.
    fn swap(&mut self, spare: *mut u64) {
        let len = self.pages * 4096;
        let mv = |from: *mut u64, to: *mut u64| {
            // SAFETY: moves a whole mapping of ours onto another of ours.
            let p = unsafe {
                libc::mremap(
                    from.cast(),
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    to,
                )
            };
            assert_eq!(p, to.cast(), "mremap");
        };
        mv(self.at[0], spare);
        mv(self.at[1], self.at[0]);
        mv(spare, self.at[1]);
        self.holds.swap(0, 1);
        // The spare place is free again: reserved for the next swap.
        // SAFETY: a fixed mapping at a place nothing else uses.
        let p = unsafe {
            libc::mmap(
                spare.cast(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        assert_eq!(p, spare.cast(), "reserving the spare place");
    }

    fn check(&self) -> Result<usize, String> {
        let mut seen = [vec![false; self.pages], vec![false; self.pages]];
        for slot in 0..2 {
            #[allow(clippy::needless_range_loop, reason = "i names the page")]
            for i in 0..self.pages {
                let p = self.page(slot, i);
                if p.iter().all(|&w| w == 0) {
                    let r = self.holds[slot] as usize;
                    if self.ver[r][i] != DROPPED {
                        return Err(format!("page {i} of region {r} is zeroes"));
                    }
                    seen[r][i] = true;
                    continue;
                }
                let r = (p[0] >> 62) as usize;
                let idx = ((p[0] >> 32) & 0x3fff_ffff) as usize;
                if r > 1 || idx != i || r != self.holds[slot] as usize {
                    return Err(format!("slot {slot} page {i} holds region {r} page {idx}"));
                }
                let v = self.ver[r][i];
                if (0..512).any(|k| p[k] != word(r as u64, i as u64, v, k as u64)) {
                    return Err(format!(
                        "region {r} page {i} is not version {} throughout",
                        v as i64
                    ));
                }
                if std::mem::replace(&mut seen[r][i], true) {
                    return Err(format!("region {r} page {i} seen twice"));
                }
            }
        }
        Ok(2 * self.pages)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let log = &args[1];
    let pages: usize = args[2].parse().expect("PAGES");
    // SAFETY: a handler that only stores an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t) };
    let len = pages * 4096;
    let mut g = Regions {
        at: [map(len), map(len)],
        holds: [0, 1],
        ver: [vec![DROPPED; pages], vec![DROPPED; pages]],
        pages,
    };
    let spare = map(len);
    for slot in 0..2 {
        for i in 0..pages {
            g.write(slot, i);
        }
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    writeln!(out, "ready").unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    loop {
        if CHECK.swap(false, Ordering::SeqCst) {
            let line = match g.check() {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("bad {e}"),
            };
            writeln!(out, "{line}").unwrap();
        }
        if FORK.swap(false, Ordering::SeqCst) {
            // SAFETY: one thread; the child only checks, writes and exits.
            match unsafe { libc::fork() } {
                0 => {
                    let line = match g.check() {
                        Ok(n) => format!("child ok {n}"),
                        Err(e) => format!("child bad {e}"),
                    };
                    writeln!(out, "{line}").unwrap();
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(0) };
                }
                -1 => panic!("fork"),
                _ => {}
            }
        }
        // SAFETY: reaps a child that finished, if any.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        x = cr_ebpf_perf::xorshift(&mut x);
        let (slot, i) = ((x >> 8) as usize & 1, (x >> 16) as usize % pages);
        match x & 1023 {
            0 => g.swap(spare),
            1..=15 => g.drop_page(slot, i),
            _ => g.write(slot, i),
        }
    }
}
