//! Bench: continuous incremental checkpoints of a busy process.
//!
//! A workload keeps `MIB` MiB resident, writes `--rate` ‰ (default 10, 1%)
//! of its pages per second
//! (spread evenly, every millisecond) and otherwise does fixed units of CPU
//! work, counting them, and records the longest gap between two of its own
//! loop iterations (the stall it observes). It runs untracked, then under
//! `cr-ebpf track --interval 1s` for `N` checkpoints, then untracked again;
//! its throughput while tracked is compared with the mean of the two
//! untracked phases measured in the same run.
//!
//! Reports freeze time p50/p99/max as `track` measures it, the workload's
//! own longest stall, checkpoint sizes, and the throughput ratio.
//!
//! Usage: `incremental-bench [--quick] [--out FILE] [--bin DIR] [--mib N]
//! [--checkpoints N] [--base-secs S] [--rate PERMILLE] [--no-precopy]`
//! (internally also `incremental-bench --workload LOG MIB`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_perf::{median, xorshift};

static PHASE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    PHASE.store(true, Ordering::SeqCst);
}

/// The workload: prints one line per phase on SIGUSR1:
/// `phase SECS units UNITS maxgap_us G`.
fn workload(log: &str, mib: usize, permille: f64) -> Result<()> {
    // SAFETY: a handler that only stores an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut mem: Vec<u64> = (0..mib << 17).map(|_| xorshift(&mut seed)).collect();
    let pages = mem.len() / 512;
    let per_ms = pages as f64 * permille / 1000.0 / 1000.0;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    log.write_all(format!("ready {}\n", std::process::id()).as_bytes())?;
    let mut scratch = vec![1u64; 2048];
    let (mut units, mut max_gap) = (0u64, Duration::ZERO);
    let mut phase_start = Instant::now();
    let mut last = Instant::now();
    let mut owed = 0.0f64;
    let mut last_ms = Instant::now();
    loop {
        // One unit of CPU work (~10 µs).
        for w in scratch.iter_mut() {
            *w = w.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7);
        }
        units += 1;
        // Page writes at 1% of the pages per second.
        let now = Instant::now();
        if now.duration_since(last_ms) >= Duration::from_millis(1) {
            owed += per_ms * now.duration_since(last_ms).as_secs_f64() * 1000.0;
            last_ms = now;
            while owed >= 1.0 {
                let p = xorshift(&mut seed) as usize % pages;
                mem[p * 512] = mem[p * 512].wrapping_add(units);
                owed -= 1.0;
            }
        }
        max_gap = max_gap.max(now.duration_since(last));
        last = now;
        if PHASE.swap(false, Ordering::SeqCst) {
            let line = format!(
                "phase {:.3} units {units} maxgap_us {}\n",
                phase_start.elapsed().as_secs_f64(),
                max_gap.as_micros()
            );
            log.write_all(line.as_bytes())?;
            units = 0;
            max_gap = Duration::ZERO;
            phase_start = Instant::now();
            last = Instant::now();
        }
        std::hint::black_box(&scratch);
    }
}

fn phase_lines(log: &Path) -> Vec<(f64, u64, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.first() == Some(&"phase") && f.len() == 6).then(|| {
                (
                    f[1].parse().unwrap_or(0.0),
                    f[3].parse().unwrap_or(0),
                    f[5].parse().unwrap_or(0),
                )
            })
        })
        .collect()
}

/// Ends the current phase and returns (units per second, max gap µs).
fn end_phase(pid: i32, log: &Path) -> Result<(f64, u64)> {
    let before = phase_lines(log).len();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = phase_lines(log);
        if l.len() > before {
            let (secs, units, gap) = l[before];
            return Ok((units as f64 / secs, gap));
        }
        if Instant::now() > deadline {
            bail!("the workload does not answer");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--workload") {
        let log = args.get(2).context("--workload LOG MIB PERMILLE")?;
        let mib = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
        let permille = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10.0);
        return workload(log, mib, permille);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let opt = |name: &str| cr_ebpf_perf::arg_value(&args, name);
    let exe = std::env::current_exe()?;
    let bin = opt("--bin").map_or_else(|| exe.with_file_name(""), PathBuf::from);
    let cr = bin.join("cr-ebpf");
    if !cr.exists() {
        bail!(
            "{} not found (build the workspace, or pass --bin DIR)",
            cr.display()
        );
    }
    let (mut mib, mut checkpoints, mut base_secs) =
        if quick { (128, 5, 3) } else { (1024, 60, 15) };
    if let Some(v) = opt("--mib").and_then(|v| v.parse().ok()) {
        mib = v;
    }
    if let Some(v) = opt("--checkpoints").and_then(|v| v.parse().ok()) {
        checkpoints = v;
    }
    if let Some(v) = opt("--base-secs").and_then(|v| v.parse().ok()) {
        base_secs = v;
    }
    // Pages written per second, in per mille of the resident pages.
    let permille: f64 = opt("--rate").and_then(|v| v.parse().ok()).unwrap_or(10.0);
    let memcpy = cr_ebpf_perf::memcpy_rate(256 << 20);
    let extra: Vec<&str> = if args.iter().any(|a| a == "--no-precopy") {
        vec!["--no-precopy"]
    } else {
        Vec::new()
    };
    let dir = std::env::temp_dir().join(format!("cr-ebpf-incr-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("workload.log");
    // Reaped by `stop` (waitpid on its pid), also on early returns via the guard.
    let pid = cr_ebpf_perf::spawn_clean(
        Command::new(&exe)
            .arg("--workload")
            .arg(&log)
            .arg(mib.to_string())
            .arg(permille.to_string())
            .stdin(Stdio::null()),
    )
    .id() as i32;
    let _guard = cr_ebpf_perf::KillOnDrop(pid);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("ready")
    {
        if Instant::now() > deadline {
            bail!("the workload did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    end_phase(pid, &log)?; // discard the start-up
    std::thread::sleep(Duration::from_secs(base_secs));
    let (before, gap_before) = end_phase(pid, &log)?;

    let images = dir.join("images");
    let mut track = cr_ebpf_perf::spawn_clean(
        Command::new(&cr)
            .args([
                "track",
                "--pid",
                &pid.to_string(),
                "--interval",
                "1s",
                "--json",
            ])
            .args(["--count", &(checkpoints + 1).to_string()])
            .args(&extra)
            .arg("--images-dir")
            .arg(&images)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = track.stdout.take().map(BufReader::new);
    let mut reports = Vec::new();
    let read = read_reports(out, pid, &log, &mut reports);
    let status = track.wait()?;
    read?;
    let (tracked, gap_tracked) = end_phase(pid, &log)?;
    if !status.success() || reports.len() < checkpoints as usize {
        bail!(
            "cr-ebpf track ended with {status} after {} checkpoints",
            reports.len()
        );
    }
    std::thread::sleep(Duration::from_secs(base_secs));
    let (after, gap_after) = end_phase(pid, &log)?;
    cr_ebpf_perf::stop(pid);
    // Bounding the chain afterwards: keep the newest 10, the oldest of
    // them rewritten as a full base (the process is not involved).
    let t = Instant::now();
    let status = Command::new(&cr)
        .args(["compact", "--keep", "10", "--images-dir"])
        .arg(&images)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("cr-ebpf compact --keep 10 failed");
    }
    let compact_s = t.elapsed().as_secs_f64();
    let outcome = Outcome {
        mib,
        permille,
        memcpy_gb_s: memcpy,
        compact_s,
        before: (before, gap_before),
        tracked: (tracked, gap_tracked),
        after: (after, gap_after),
    };
    report(&outcome, &reports, opt("--out"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Reads `track --json` lines; the first (the full base) ends the untracked phase.
fn read_reports(
    out: Option<BufReader<std::process::ChildStdout>>,
    pid: i32,
    log: &Path,
    reports: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let out = out.context("track output")?;
    let mut first = true;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if first {
            // The first checkpoint is the full base: its phase starts after it.
            first = false;
            end_phase(pid, log)?;
            println!(
                "base checkpoint: {} pages, {:.1} MiB, freeze {:.1} ms",
                v["pages"],
                v["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                v["freeze_ms"].as_f64().unwrap_or(0.0)
            );
            continue;
        }
        reports.push(v);
    }
    Ok(())
}

/// One run's measurements besides the per-checkpoint reports.
struct Outcome {
    mib: usize,
    permille: f64,
    memcpy_gb_s: f64,
    compact_s: f64,
    /// (workload units per second, longest stall µs) per phase.
    before: (f64, u64),
    tracked: (f64, u64),
    after: (f64, u64),
}

fn report(o: &Outcome, reports: &[serde_json::Value], out: Option<String>) -> Result<()> {
    let Outcome {
        mib,
        permille,
        memcpy_gb_s,
        compact_s,
        before: (before, gap_before),
        tracked: (tracked, gap_tracked),
        after: (after, gap_after),
    } = *o;
    let freeze: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["freeze_ms"].as_f64())
        .collect();
    let kib: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["bytes"].as_f64().map(|b| b / 1024.0))
        .collect();
    let pages: Vec<f64> = reports.iter().filter_map(|r| r["pages"].as_f64()).collect();
    let untracked = (before + after) / 2.0;
    let ratio = tracked / untracked;
    println!(
        "incremental checkpoints of a {mib} MiB process writing {:.1}% of its pages per second, \
         every 1 s, {} checkpoints",
        permille / 10.0,
        reports.len()
    );
    println!(
        "  freeze ms: p50 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&freeze, 0.5),
        percentile(&freeze, 0.99),
        percentile(&freeze, 1.0)
    );
    println!(
        "  longest stall the workload saw: {:.2} ms tracked, {:.2} / {:.2} ms untracked (before / after)",
        gap_tracked as f64 / 1e3,
        gap_before as f64 / 1e3,
        gap_after as f64 / 1e3
    );
    println!(
        "  checkpoint size: median {:.0} KiB ({:.0} pages), max {:.0} KiB",
        median(&kib),
        median(&pages),
        percentile(&kib, 1.0)
    );
    println!(
        "  workload throughput: {:.0} units/s tracked, {:.0} untracked (mean of {:.0} before, {:.0} after): ratio {:.3} ({:+.1}%)",
        tracked,
        untracked,
        before,
        after,
        ratio,
        (ratio - 1.0) * 100.0
    );
    println!("  retention to 10 checkpoints afterwards (the oldest kept rewritten as a full base): {compact_s:.2} s");
    if let Some(path) = out {
        let json = serde_json::json!({
            "bench": "incremental", "mib": mib, "checkpoints": reports.len(), "interval_s": 1,
            "write_rate_permille_per_s": permille, "memcpy_gb_s": memcpy_gb_s,
            // The freeze against the time memcpy takes for the median checkpoint's bytes.
            "freeze_p99_over_memcpy": percentile(&freeze, 0.99) / 1e3
                / (median(&kib) * 1024.0 / (memcpy_gb_s * 1e9)),
            "freeze_ms": {"p50": percentile(&freeze, 0.5), "p99": percentile(&freeze, 0.99), "max": percentile(&freeze, 1.0), "all": freeze},
            "stall_ms": {"tracked": gap_tracked as f64 / 1e3, "untracked_before": gap_before as f64 / 1e3, "untracked_after": gap_after as f64 / 1e3},
            "size_kib": {"median": median(&kib), "max": percentile(&kib, 1.0)},
            "throughput": {"tracked": tracked, "untracked_before": before, "untracked_after": after, "ratio": ratio},
            "retention_to_10_s": compact_s,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
