//! Bench: continuous incremental checkpoints of a busy process.
//!
//! A workload keeps `MIB` MiB resident, writes `--rate` ‰ (default 10, 1%)
//! of its pages per second
//! (spread evenly, every millisecond) and otherwise does fixed units of CPU
//! work, counting them, and records the longest gap between two of its own
//! loop iterations in every second (the stall it observes). It runs untracked, then under
//! `cr-ebpf track --interval 1s` for `N` checkpoints, then untracked again;
//! its throughput while tracked is compared with the mean of the two
//! untracked phases measured in the same run.
//!
//! Reports freeze time p50/p99/max as `track` measures it, the workload's
//! own stall (the longest gap of each second: p50/p99/max, tracked and
//! untracked), checkpoint sizes, and the throughput ratio.
//!
//! With `--load syscalls` a unit of work is a round of system calls instead
//! (open, read and close a file, write and read back a pipe, getppid: two of
//! the six are ones the eBPF programs log), for the overhead tracking adds
//! to a syscall-heavy process.
//!
//! Usage: `incremental-bench [--quick] [--out FILE] [--bin DIR] [--mib N]
//! [--checkpoints N] [--base-secs S] [--rate PERMILLE] [--no-precopy]
//! [--load memory|syscalls]`
//! (internally also `incremental-bench --workload LOG MIB PERMILLE LOAD`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_perf::{median, percentile, xorshift};

static PHASE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    PHASE.store(true, Ordering::SeqCst);
}

/// The workload: prints one line per phase on SIGUSR1:
/// `phase SECS units UNITS maxgap_us G windows W1,W2,...` where `Wi` is the
/// longest gap (µs) between two loop iterations in the phase's i-th second.
fn workload(log: &str, mib: usize, permille: f64, load: Load) -> Result<()> {
    // SAFETY: a handler that only stores an atomic.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let mut sys = match load {
        Load::Syscalls => Some(SyscallRound::new(log_path_dir(log))?),
        Load::Memory => None,
    };
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
    let (mut windows, mut window_gap) = (Vec::<u128>::new(), Duration::ZERO);
    let mut window_start = Instant::now();
    let mut phase_start = Instant::now();
    let mut last = Instant::now();
    let mut owed = 0.0f64;
    let mut last_ms = Instant::now();
    loop {
        match &mut sys {
            Some(round) => round.run()?,
            // One unit of CPU work (~10 µs).
            None => {
                for w in scratch.iter_mut() {
                    *w = w.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7);
                }
            }
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
        let gap = now.duration_since(last);
        max_gap = max_gap.max(gap);
        window_gap = window_gap.max(gap);
        last = now;
        if now.duration_since(window_start) >= Duration::from_secs(1) {
            windows.push(window_gap.as_micros());
            window_gap = Duration::ZERO;
            window_start = now;
        }
        if PHASE.swap(false, Ordering::SeqCst) {
            let list: Vec<String> = windows.iter().map(u128::to_string).collect();
            let line = format!(
                "phase {:.3} units {units} maxgap_us {} windows {}\n",
                phase_start.elapsed().as_secs_f64(),
                max_gap.as_micros(),
                if list.is_empty() {
                    "-".to_string()
                } else {
                    list.join(",")
                }
            );
            log.write_all(line.as_bytes())?;
            units = 0;
            max_gap = Duration::ZERO;
            windows.clear();
            window_gap = Duration::ZERO;
            window_start = Instant::now();
            phase_start = Instant::now();
            last = Instant::now();
        }
        std::hint::black_box(&scratch);
    }
}

/// One phase as the workload reports it.
#[derive(Debug, Clone, Default)]
struct Phase {
    /// Workload units per second.
    rate: f64,
    /// Longest gap of each second, in ms.
    windows_ms: Vec<f64>,
}

/// What a unit of the workload's work is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// CPU work, plus the page writes.
    Memory,
    /// A round of system calls, plus the page writes.
    Syscalls,
}

impl Load {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "memory" => Ok(Self::Memory),
            "syscalls" => Ok(Self::Syscalls),
            _ => bail!("unknown --load {s:?}: use memory or syscalls"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Syscalls => "syscalls",
        }
    }
}

fn log_path_dir(log: &str) -> PathBuf {
    Path::new(log)
        .parent()
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
}

/// One round of the syscall load: six system calls, two of them logged
/// (openat and close) by the eBPF programs.
struct SyscallRound {
    file: std::ffi::CString,
    pipe: [libc::c_int; 2],
    buf: [u8; 64],
}

impl SyscallRound {
    fn new(dir: PathBuf) -> Result<Self> {
        let path = dir.join("syscall-load.dat");
        std::fs::write(&path, [7u8; 4096])?;
        let mut pipe = [0; 2];
        // SAFETY: `pipe` is a valid two-element array.
        if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            file: std::ffi::CString::new(path.into_os_string().into_encoded_bytes())?,
            pipe,
            buf: [0; 64],
        })
    }

    fn run(&mut self) -> Result<()> {
        // SAFETY: plain syscalls on our own descriptors and buffers.
        unsafe {
            let fd = libc::open(self.file.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                bail!("open: {}", std::io::Error::last_os_error());
            }
            libc::pread(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0);
            libc::close(fd);
            libc::write(self.pipe[1], self.buf.as_ptr().cast(), self.buf.len());
            libc::read(self.pipe[0], self.buf.as_mut_ptr().cast(), self.buf.len());
            libc::getppid();
        }
        Ok(())
    }
}

fn phase_lines(log: &Path) -> Vec<Phase> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.first() == Some(&"phase") && f.len() == 8).then(|| {
                let secs: f64 = f[1].parse().unwrap_or(0.0);
                let units: u64 = f[3].parse().unwrap_or(0);
                Phase {
                    rate: units as f64 / secs,
                    windows_ms: f[7]
                        .split(',')
                        .filter_map(|w| w.parse::<f64>().ok())
                        .map(|us| us / 1e3)
                        .collect(),
                }
            })
        })
        .collect()
}

/// Ends the current phase and returns what the workload saw in it.
fn end_phase(pid: i32, log: &Path) -> Result<Phase> {
    let before = phase_lines(log).len();
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = phase_lines(log);
        if let Some(p) = l.into_iter().nth(before) {
            return Ok(p);
        }
        if Instant::now() > deadline {
            bail!("the workload does not answer");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--workload") {
        let log = args.get(2).context("--workload LOG MIB PERMILLE")?;
        let mib = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
        let permille = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(10.0);
        let load = Load::parse(args.get(5).map_or("memory", String::as_str))?;
        return workload(log, mib, permille, load);
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
    let load = Load::parse(opt("--load").as_deref().unwrap_or("memory"))?;
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
            .arg(load.name())
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
    let before = end_phase(pid, &log)?;

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
            // Every checkpoint kept: the numbers are of checkpointing
            // alone, comparable with earlier runs (no merging meanwhile).
            .args(["--keep", "all"])
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
    let tracked = end_phase(pid, &log)?;
    if !status.success() || reports.len() < checkpoints as usize {
        bail!(
            "cr-ebpf track ended with {status} after {} checkpoints",
            reports.len()
        );
    }
    std::thread::sleep(Duration::from_secs(base_secs));
    let after = end_phase(pid, &log)?;
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
        load,
        mib,
        permille,
        memcpy_gb_s: memcpy,
        compact_s,
        before,
        tracked,
        after,
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
    load: Load,
    mib: usize,
    permille: f64,
    memcpy_gb_s: f64,
    compact_s: f64,
    /// What the workload saw untracked, tracked, untracked again.
    before: Phase,
    tracked: Phase,
    after: Phase,
}

fn report(o: &Outcome, reports: &[serde_json::Value], out: Option<String>) -> Result<()> {
    let Outcome {
        load,
        mib,
        permille,
        memcpy_gb_s,
        compact_s,
        ..
    } = *o;
    let (before, tracked, after) = (o.before.rate, o.tracked.rate, o.after.rate);
    let stall_tracked = &o.tracked.windows_ms;
    let stall_untracked: Vec<f64> = [&o.before.windows_ms[..], &o.after.windows_ms[..]].concat();
    let stats = |v: &[f64]| {
        serde_json::json!({
            "p50": percentile(v, 0.5), "p99": percentile(v, 0.99), "max": percentile(v, 1.0),
            "seconds": v.len(),
        })
    };
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
        "incremental checkpoints of a {mib} MiB process ({} load) writing {:.1}% of its pages per second, \
         every 1 s, {} checkpoints",
        load.name(),
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
        "  stall the workload saw (longest gap of each second) ms: tracked p50 {:.2}  p99 {:.2}  max {:.2}; \
         untracked p50 {:.2}  p99 {:.2}  max {:.2}",
        percentile(stall_tracked, 0.5),
        percentile(stall_tracked, 0.99),
        percentile(stall_tracked, 1.0),
        percentile(&stall_untracked, 0.5),
        percentile(&stall_untracked, 0.99),
        percentile(&stall_untracked, 1.0),
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
            "bench": "incremental", "load": load.name(), "mib": mib, "checkpoints": reports.len(), "interval_s": 1,
            "write_rate_permille_per_s": permille, "memcpy_gb_s": memcpy_gb_s,
            // The freeze against the time memcpy takes for the median checkpoint's bytes.
            "freeze_p99_over_memcpy": percentile(&freeze, 0.99) / 1e3
                / (median(&kib) * 1024.0 / (memcpy_gb_s * 1e9)),
            "freeze_ms": {"p50": percentile(&freeze, 0.5), "p99": percentile(&freeze, 0.99), "max": percentile(&freeze, 1.0), "all": freeze},
            "stall_ms": {"tracked": stats(stall_tracked), "untracked": stats(&stall_untracked)},
            "size_kib": {"median": median(&kib), "max": percentile(&kib, 1.0)},
            "throughput": {"tracked": tracked, "untracked_before": before, "untracked_after": after, "ratio": ratio},
            "retention_to_10_s": compact_s,
            // Every incremental checkpoint as `track --json` reported it.
            "reports": reports,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
