//! The demo workload: a small "service" that counts forever.
//!
//! Every tick (default 250 ms) it increments a counter, writes a few pages
//! of a 4 MiB working set, prints `tick N sum=S` and, now and then, appends
//! to a log file (open/write/close) and forks a short-lived helper. Its
//! output lets a viewer see that it keeps going and where it is.
//!
//! Usage: `counter [TICK_MS] [LOG_FILE]`

use std::{io::Write as _, time::Duration};

fn main() {
    let mut args = std::env::args().skip(1);
    let tick_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(250);
    let log = args
        .next()
        .unwrap_or_else(|| format!("/tmp/cr-ebpf-counter-{}.log", std::process::id()));
    let mut pages = vec![0u64; 4 << 20 >> 3];
    let words_per_page = 4096 / 8;
    let npages = pages.len() / words_per_page;
    let mut out = std::io::stdout().lock();
    for n in 1u64.. {
        for k in 0..4 {
            let p = ((n * 7 + k * 13) as usize) % npages;
            pages[p * words_per_page] = n;
        }
        let sum: u64 = pages.iter().step_by(words_per_page).sum();
        let _ = writeln!(out, "tick {n} sum={sum}");
        let _ = out.flush();
        if n % 5 == 0 {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
            {
                let _ = writeln!(f, "tick {n}");
            }
        }
        if n % 10 == 0 {
            if let Ok(mut c) = std::process::Command::new("true").spawn() {
                let _ = c.wait();
            }
        }
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
