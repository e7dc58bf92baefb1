//! Full dump and restore throughput, one worker thread vs all cores, with
//! the machine's copy rates measured in the same run for comparison.
//!
//! For each size and kind of data (random, incompressible; and low-entropy,
//! compressible), the `ticker` workload is
//! started, dumped (and killed), and restored from a cold page cache (the
//! cache is written back and dropped before each restore); rounds
//! interleave the worker counts and medians are reported. A dump's time is
//! given three ways: frozen (until its state and pages were read), stopped
//! (until it was killed, after the image was on disk) and wall. Writes JSON
//! to `--out`.
//!
//! With `--criu PATH`, that CRIU also dumps and restores the same workload
//! (random data) in the same rounds, and its times are reported next to
//! ours (its frozen time as it reports it with `--display-stats`). A CRIU that fails is reported with its error, not fatal.
//!
//! Usage: `dump-restore [--quick] [--out FILE] [--bin DIR] [--criu PATH]`

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_restore::{restore, RestoreOptions};

use cr_ebpf_perf::median;

/// Buffered write + fsync GB/s of `bytes` into `dir`.
fn disk_rate(dir: &Path, bytes: usize) -> Result<f64> {
    use std::io::Write as _;
    let p = dir.join("disk-rate");
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&p)?;
    for _ in 0..bytes >> 20 {
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    let r = bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    std::fs::remove_file(&p)?;
    Ok(r)
}

fn start(ticker: &Path, log: &Path, mib: usize, compressible: bool) -> Result<Child> {
    let mut cmd = Command::new(ticker);
    // One tick a minute: the workload sits still while it is measured.
    cmd.arg(log).arg(mib.to_string()).arg("60000");
    if compressible {
        cmd.arg("compressible");
    }
    cr_ebpf_perf::workload(&mut cmd);
    let child = cmd.spawn().context("starting ticker")?;
    let t = Instant::now();
    while std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) == 0 {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("ticker did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Writes back and drops the page cache, so that a restore reads its
/// image from the disk (as after a reboot or on another machine).
fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// One CRIU dump and restore of the ticker: (dump s, frozen s, restore s):
/// the dump's wall time, CRIU's own "Frozen time" (`--display-stats`), and
/// the restore's wall time from a cold page cache (until the process runs).
fn criu_round(criu: &Path, ticker: &Path, scratch: &Path, mib: usize) -> Result<(f64, f64, f64)> {
    let log = scratch.join(format!("criu-log-{mib}"));
    let img = scratch.join(format!("criu-img-{mib}"));
    let _ = std::fs::remove_dir_all(&img);
    std::fs::create_dir_all(&img)?;
    let mut child = start(ticker, &log, mib, false)?;
    let pid = child.id() as i32;
    let run = |args: &[&str]| -> Result<(f64, String)> {
        let t = Instant::now();
        let out = Command::new(criu)
            .args(args)
            .arg("-D")
            .arg(&img)
            .args(["--shell-job", "-v1", "--display-stats"])
            .output()
            .with_context(|| format!("running {}", criu.display()))?;
        let took = t.elapsed().as_secs_f64();
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!("criu {} failed ({}): {last}", args[0], out.status);
        }
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let dumped = run(&["dump", "-t", &pid.to_string()]);
    if dumped.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let (dump_s, stats) = dumped?;
    let frozen_s = stats
        .lines()
        .find_map(|l| l.strip_prefix("Frozen time: ")?.strip_suffix(" us"))
        .and_then(|us| us.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |us| us / 1e6);
    drop_caches();
    let (restore_s, _) = run(&["restore", "--restore-detached"])?;
    let alive = Path::new(&format!("/proc/{pid}")).exists();
    // SAFETY: stopping the restored workload (its pid is the original one).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = std::fs::remove_dir_all(&img);
    let _ = std::fs::remove_file(&log);
    if !alive {
        bail!("criu restore returned but process {pid} is not running");
    }
    Ok((dump_s, frozen_s, restore_s))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let opt = |name: &str| cr_ebpf_perf::arg_value(&args, name);
    let bin = opt("--bin").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("target/release"))
    });
    let ticker = bin.join("ticker");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("dump-restore needs root (ptrace, clone3 set_tid)");
    }
    let sizes: &[usize] = if quick { &[64, 256] } else { &[256, 1024] };
    let rounds = if quick { 1 } else { 3 };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = [1, cores];
    let scratch = std::env::temp_dir().join(format!("cr-ebpf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let memcpy = cr_ebpf_perf::memcpy_rate(256 << 20);
    let pvr = cr_ebpf_perf::process_vm_readv_rate(256 << 20);
    let disk = disk_rate(&scratch, 256 << 20)?;
    let criu = opt("--criu").map(PathBuf::from);
    // CRIU's (dump s, frozen s, restore s) samples per size, or why it failed.
    let mut criu_results: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    let mut criu_error: Option<String> = None;
    let mut results: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    // Restore time by phase, in the restorer's order: per configuration,
    // (phase, samples in ms).
    let mut phases: BTreeMap<String, Vec<(&'static str, Vec<f64>)>> = BTreeMap::new();
    for &mib in sizes {
        for compressible in [false, true] {
            for round in 0..rounds {
                for &w in &workers {
                    let data = if compressible { "-compressible" } else { "" };
                    let key = format!("{mib}MiB{data}/{w}w");
                    let log = scratch.join(format!("log-{mib}{data}-{w}-{round}"));
                    let img = scratch.join(format!("img-{mib}{data}-{w}-{round}"));
                    let mut child = start(&ticker, &log, mib, compressible)?;
                    let pid = child.id() as i32;
                    let d = dump(
                        pid,
                        &img,
                        &DumpOptions {
                            leave_running: false,
                            threads: w,
                            shell_job: false,
                            ghost_limit: 0,
                            shm_limit: 0,
                            freeze_limit: None,
                            no_precopy: false,
                            network_lock: None,
                            ext_unix_sk: false,
                        },
                    )
                    .with_context(|| format!("dump of {mib} MiB"))?;
                    let _ = child.wait();
                    drop_caches();
                    let r = restore(
                        &img,
                        &RestoreOptions {
                            threads: w,
                            ..RestoreOptions::default()
                        },
                    )
                    .with_context(|| format!("restore of {mib} MiB"))?;
                    // SAFETY: stopping the restored workload, our child.
                    unsafe {
                        libc::kill(r.pid, libc::SIGKILL);
                        libc::waitpid(r.pid, std::ptr::null_mut(), 0);
                    }
                    // The same image restored lazily, cold too: when the
                    // process runs, and when all its memory is in.
                    let lazy = (!compressible && w == cores)
                        .then(|| -> Result<(f64, f64, Vec<cr_ebpf_restore::Phase>)> {
                            drop_caches();
                            let t = Instant::now();
                            let r = restore(
                                &img,
                                &RestoreOptions {
                                    threads: w,
                                    lazy: true,
                                    ..RestoreOptions::default()
                                },
                            )
                            .with_context(|| format!("lazy restore of {mib} MiB"))?;
                            let runs = t.elapsed().as_secs_f64();
                            let filled = r.lazy.as_ref().map(|f| f.wait()).transpose();
                            let all = t.elapsed().as_secs_f64();
                            // SAFETY: stopping the restored workload, our child.
                            unsafe {
                                libc::kill(r.pid, libc::SIGKILL);
                                libc::waitpid(r.pid, std::ptr::null_mut(), 0);
                            }
                            filled.with_context(|| format!("lazy fill of {mib} MiB"))?;
                            Ok((runs, all, r.phases))
                        })
                        .transpose()?;
                    let bytes = d.pages as f64 * 4096.0;
                    let ph = phases.entry(key.clone()).or_default();
                    for p in &r.phases {
                        let ms = p.time.as_secs_f64() * 1e3;
                        match ph.iter_mut().find(|(n, _)| *n == p.name) {
                            Some((_, v)) => v.push(ms),
                            None => ph.push((p.name, vec![ms])),
                        }
                    }
                    let e = results.entry(key).or_default();
                    e.entry("dump_s").or_default().push(d.total.as_secs_f64());
                    e.entry("freeze_s")
                        .or_default()
                        .push(d.freeze.as_secs_f64());
                    e.entry("stopped_s")
                        .or_default()
                        .push(d.stopped.as_secs_f64());
                    e.entry("precopy_s")
                        .or_default()
                        .push(d.precopy.as_secs_f64());
                    e.entry("dump_gb_s")
                        .or_default()
                        .push(bytes / d.total.as_secs_f64() / 1e9);
                    e.entry("restore_s")
                        .or_default()
                        .push(r.total.as_secs_f64());
                    if let Some((runs, all, lazy_phases)) = lazy {
                        e.entry("lazy_runs_s").or_default().push(runs);
                        e.entry("lazy_all_s").or_default().push(all);
                        // Until the process runs, by phase.
                        let ph = phases.entry(format!("{mib}MiB/{w}w-lazy")).or_default();
                        for p in &lazy_phases {
                            let ms = p.time.as_secs_f64() * 1e3;
                            match ph.iter_mut().find(|(n, _)| *n == p.name) {
                                Some((_, v)) => v.push(ms),
                                None => ph.push((p.name, vec![ms])),
                            }
                        }
                    }
                    e.entry("fill_gb_s")
                        .or_default()
                        .push(bytes / r.fill.as_secs_f64() / 1e9);
                    e.entry("restore_gb_s")
                        .or_default()
                        .push(bytes / r.total.as_secs_f64() / 1e9);
                    e.entry("image_mib")
                        .or_default()
                        .push(d.page_bytes as f64 / (1 << 20) as f64);
                    let _ = std::fs::remove_dir_all(&img);
                    let _ = std::fs::remove_file(&log);
                }
                if let (Some(c), None, false) = (&criu, &criu_error, compressible) {
                    match criu_round(c, &ticker, &scratch, mib) {
                        Ok((d, f, r)) => {
                            let e = criu_results.entry(format!("{mib}MiB")).or_default();
                            e[0].push(d);
                            e[1].push(f);
                            e[2].push(r);
                        }
                        Err(e) => {
                            println!("criu: {e:#}");
                            criu_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);

    println!("full dump and restore, random and compressible data (medians of {rounds} round(s))");
    println!(
        "machine: memcpy {memcpy:.1} GB/s, process_vm_readv {pvr:.1} GB/s, \
         buffered write + fsync {disk:.2} GB/s"
    );
    println!(
        "{:<26} {:>9} {:>9} {:>10} {:>10} {:>11} {:>12} {:>10} {:>10}",
        "size/workers",
        "dump s",
        "freeze s",
        "stopped s",
        "dump GB/s",
        "restore s",
        "restore GB/s",
        "fill GB/s",
        "image MiB"
    );
    let mut med: BTreeMap<String, BTreeMap<&str, f64>> = BTreeMap::new();
    for (k, m) in &results {
        let g = |n: &str| median(&m[n]);
        println!(
            "{k:<26} {:>9.3} {:>9.3} {:>10.3} {:>10.2} {:>11.3} {:>12.2} {:>10.2} {:>10.1}",
            g("dump_s"),
            g("freeze_s"),
            g("stopped_s"),
            g("dump_gb_s"),
            g("restore_s"),
            g("restore_gb_s"),
            g("fill_gb_s"),
            g("image_mib")
        );
        med.insert(k.clone(), m.iter().map(|(n, v)| (*n, median(v))).collect());
    }
    for &mib in sizes {
        let one = &med[&format!("{mib}MiB/1w")];
        let all = &med[&format!("{mib}MiB/{cores}w")];
        println!(
            "{mib} MiB: all cores vs one: dump {:.2}x faster, restore {:.2}x faster; dump at {:.0}% of disk write rate",
            one["dump_s"] / all["dump_s"],
            one["restore_s"] / all["restore_s"],
            100.0 * all["dump_gb_s"] / disk
        );
    }
    for &mib in sizes {
        let all = &med[&format!("{mib}MiB/{cores}w")];
        if let (Some(runs), Some(done)) = (all.get("lazy_runs_s"), all.get("lazy_all_s")) {
            println!(
                "{mib} MiB lazy restore (cold): runs after {:.0} ms, all memory in after {:.0} ms \
                 ({:.2}x the restore without --lazy)",
                runs * 1e3,
                done * 1e3,
                done / all["restore_s"]
            );
        }
    }
    // Where a restore's time goes: the largest random image, all cores.
    let phase_med: BTreeMap<&String, Vec<(&str, f64)>> = phases
        .iter()
        .map(|(k, v)| (k, v.iter().map(|(n, x)| (*n, median(x))).collect()))
        .collect();
    let biggest = format!("{}MiB/{cores}w", sizes.iter().max().copied().unwrap_or(0));
    if let Some(v) = phase_med.get(&biggest) {
        let parts: Vec<String> = v.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
        println!("restore of {biggest} by phase (ms): {}", parts.join(", "));
    }
    for &mib in sizes {
        if let Some(v) = phase_med.get(&format!("{mib}MiB/{cores}w-lazy")) {
            let parts: Vec<String> = v.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
            println!(
                "lazy restore of {mib} MiB until it runs, by phase (ms): {}",
                parts.join(", ")
            );
        }
    }
    let mut criu_json = serde_json::Map::new();
    if let Some(c) = &criu {
        criu_json.insert("path".into(), c.display().to_string().into());
        if let Some(e) = &criu_error {
            criu_json.insert("error".into(), e.clone().into());
        }
        for (size, [d, f, r]) in &criu_results {
            let ours = &med[&format!("{size}/{cores}w")];
            println!(
                "{size}: CRIU dump {:.3} s (frozen {:.3} s), cold restore {:.3} s; \
                 ours / CRIU: dump {:.2}, frozen {:.2}, restore {:.2}",
                median(d),
                median(f),
                median(r),
                ours["dump_s"] / median(d),
                ours["freeze_s"] / median(f),
                ours["restore_s"] / median(r)
            );
            criu_json.insert(
                size.clone(),
                serde_json::json!({
                    "dump_s": median(d),
                    "frozen_s": median(f),
                    "restore_s": median(r),
                }),
            );
        }
    }
    if let Some(path) = opt("--out") {
        let restore_phases: serde_json::Map<String, serde_json::Value> = phase_med
            .iter()
            .map(|(k, v)| {
                let list: Vec<serde_json::Value> =
                    v.iter().map(|(n, ms)| serde_json::json!([n, ms])).collect();
                ((*k).clone(), list.into())
            })
            .collect();
        let json = serde_json::json!({
            "restore_phases_ms": restore_phases,
            "criu": criu_json,
            "bench": "dump-restore",
            "rounds": rounds,
            "cores": cores,
            "memcpy_gb_s": memcpy,
            "process_vm_readv_gb_s": pvr,
            "disk_write_fsync_gb_s": disk,
            "median": med,
            "samples": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        println!("results written to {path}");
    }
    Ok(())
}
