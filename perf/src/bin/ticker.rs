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
//! Usage: `ticker FILE [MIB] [TICK_MS]`

use std::io::Write as _;

use cr_ebpf_perf::xorshift;

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: ticker FILE [MIB] [TICK_MS]");
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let tick_ms: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let words = mib << 17; // u64 words
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut mem: Vec<u64> = (0..words).map(|_| xorshift(&mut seed)).collect();
    let mut want: u64 = mem.iter().fold(0u64, |a, &w| a.wrapping_add(w));
    for n in 1u64.. {
        // Change 8 words on pages spread over the area.
        for k in 0..8u64 {
            let i = (xorshift(&mut seed) as usize) % words;
            let v = xorshift(&mut seed) ^ n ^ k;
            want = want.wrapping_sub(mem[i]).wrapping_add(v);
            mem[i] = v;
        }
        let got = mem.iter().fold(0u64, |a, &w| a.wrapping_add(w));
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
