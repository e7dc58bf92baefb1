//! Writes pages on command, for dirty-tracking tests.
//!
//! Maps `PAGES` anonymous pages, touches them all, prints `ready ADDR`;
//! then for each line `w I J ...` on stdin writes pages I, J, … and prints
//! `ok`; `q` exits. Each write stores a per-page counter, incremented at
//! every write (a page named twice in a line is written twice), so every
//! write changes the page's contents and content hashing sees it too.
//!
//! Usage: `pagewriter [PAGES]`

use std::io::{BufRead as _, Write as _};

fn main() {
    let pages: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut mem = vec![0u8; pages * 4096 + 4096];
    // Page-aligned start inside the buffer.
    let off = mem.as_ptr().align_offset(4096);
    let area = &mut mem[off..off + pages * 4096];
    for i in 0..pages {
        area[i * 4096] = 1;
    }
    let mut counters = vec![0u64; pages];
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {:#x}", area.as_ptr() as usize);
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut it = line.split_whitespace();
        match it.next() {
            Some("w") => {
                for i in it.filter_map(|s| s.parse::<usize>().ok()) {
                    if i < pages {
                        counters[i] += 1;
                        // SAFETY: in bounds and 8-aligned (the area is
                        // page-aligned); volatile so the write happens.
                        unsafe {
                            area.as_mut_ptr()
                                .add(i * 4096 + 8)
                                .cast::<u64>()
                                .write_volatile(counters[i])
                        };
                    }
                }
                let _ = writeln!(out, "ok");
                let _ = out.flush();
            }
            Some("q") | None => break,
            Some(_) => {}
        }
    }
}
