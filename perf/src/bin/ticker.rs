//! A self-checking workload for checkpoint/restore tests.
//!
//! Fills `MIB` MiB with a seeded pattern, then every `TICK_MS` changes a few
//! pages, recomputes a checksum of the whole area and compares it with the
//! value it tracked as it went. Each tick appends one line to `FILE`
//! (opening and closing it, so no descriptor stays open):
//! `tick N ok SUM` or `tick N MISMATCH got G want W`.
//!
//! After a restore the lines must continue with the next N, all `ok`.
//!
//! Usage: `ticker FILE [MIB] [TICK_MS] [compressible]` (default: random,
//! incompressible data)

use std::io::Write as _;

use cr_ebpf_perf::Pattern;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: ticker FILE [MIB] [TICK_MS]");
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let tick_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let compressible = args.next().as_deref() == Some("compressible");
    let mut pattern = if compressible {
        Pattern::compressible(mib)
    } else {
        Pattern::new(mib)
    };
    for n in 1u64.. {
        let (got, want) = pattern.step(n);
        let line = if got == want {
            format!("tick {n} ok {got:x}\n")
        } else {
            format!("tick {n} MISMATCH got {got:x} want {want:x}\n")
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            let _ = f.write_all(line.as_bytes());
        }
        std::thread::sleep(std::time::Duration::from_millis(tick_ms));
    }
}
