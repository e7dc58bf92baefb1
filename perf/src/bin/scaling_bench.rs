//! Bench: what the checkpoint time grows with. A workload with T threads,
//! M mappings, F open descriptors and P processes (itself and P - 1
//! children; one dimension varied at a time, the others at their minimum)
//! is checkpointed: a full dump that leaves it running, and an incremental
//! checkpoint after a first one (uffd-wp, a tracker per process). Reports
//! the freeze and the total of each, medians of rounds.
//!
//! Usage: `scaling-bench [--quick] [--out FILE]`
//! (internally also `scaling-bench --workload T M F P`).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_checkpoint::{dump, Changes, DumpOptions, Session, SessionOptions};
use cr_ebpf_perf::median;

/// The workload: prints `ready` once everything exists, then sleeps.
fn workload(threads: usize, mappings: usize, fds: usize, processes: usize) -> Result<()> {
    for _ in 1..threads {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(3600));
        });
    }
    let mut kept = Vec::with_capacity(mappings);
    for i in 0..mappings {
        // Alternating protections keep neighbours from merging into one mapping.
        let prot = if i % 2 == 0 {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh private anonymous page, kept for the process's life.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap {i}: {}", std::io::Error::last_os_error());
        }
        if i % 2 == 0 {
            // SAFETY: a writable page just mapped.
            unsafe { (p as *mut u64).write(i as u64) };
        }
        kept.push(p as usize);
    }
    let mut files = Vec::with_capacity(fds);
    for _ in 0..fds {
        files.push(std::fs::File::open("/dev/null").context("open /dev/null")?);
    }
    for _ in 1..processes {
        // SAFETY: plain syscall.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child only sleeps (and dies with its parent).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: plain syscalls in the child.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The parent may have died before the line above.
                if libc::getppid() != parent {
                    libc::_exit(0);
                }
                loop {
                    libc::sleep(3600);
                }
            }
        }
    }
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Waits for the workload, then a full dump (left running) and an
/// incremental checkpoint after a first one.
fn measure(
    pid: i32,
    stdout: Option<std::process::ChildStdout>,
    key: &str,
    dir: &std::path::Path,
    round: usize,
    (t, m, f, p): (usize, usize, usize, usize),
) -> Result<(
    cr_ebpf_checkpoint::DumpReport,
    cr_ebpf_checkpoint::CheckpointReport,
)> {
    let mut line = String::new();
    BufReader::new(stdout.context("workload output")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("the workload ({key}) did not start: {line:?}");
    }
    let full = dump(
        pid,
        &dir.join(format!("full-{round}-{t}-{m}-{f}-{p}")),
        &DumpOptions {
            leave_running: true,
            threads: 0,
            shell_job: false,
            ghost_limit: 0,
            shm_limit: 0,
            freeze_limit: None,
            no_precopy: false,
            network_lock: None,
            ext_unix_sk: false,
        },
    )
    .with_context(|| format!("dump of {key}"))?;
    let tracker = cr_ebpf_dirty_tracker::attach::attach(pid)?;
    let images = dir.join(format!("incr-{round}-{t}-{m}-{f}-{p}"));
    let mut s = Session::new(pid, &images, Some(tracker), SessionOptions::default())?;
    // The children get trackers of their own.
    s.follow(Duration::ZERO);
    s.checkpoint(&Changes::all())?;
    let incr = s.checkpoint(&Changes::none())?;
    Ok((full, incr))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--workload") {
        let n = |i: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(1);
        return workload(n(2), n(3), n(4), n(5));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let exe = std::env::current_exe()?;
    let rounds = if quick { 1 } else { 3 };
    let configs: Vec<(&str, usize, usize, usize, usize)> = if quick {
        vec![
            ("threads", 8, 10, 10, 1),
            ("mappings", 1, 1000, 10, 1),
            ("fds", 1, 10, 1000, 1),
            ("processes", 1, 10, 10, 4),
        ]
    } else {
        vec![
            ("base", 1, 10, 10, 1),
            ("threads", 8, 10, 10, 1),
            ("threads", 64, 10, 10, 1),
            ("mappings", 1, 1000, 10, 1),
            ("mappings", 1, 10000, 10, 1),
            ("fds", 1, 10, 1000, 1),
            ("fds", 1, 10, 10000, 1),
            ("processes", 1, 10, 10, 4),
            ("processes", 1, 10, 10, 16),
        ]
    };
    let dir = std::env::temp_dir().join(format!("cr-ebpf-scaling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut results: BTreeMap<String, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for round in 0..rounds {
        for &(what, t, m, f, p) in &configs {
            let mut key = format!("{what}: {t} threads, {m} mappings, {f} fds");
            if p > 1 {
                key += &format!(", {p} processes");
            }
            let mut child = cr_ebpf_perf::spawn_clean(
                Command::new(&exe)
                    .args(["--workload", &t.to_string(), &m.to_string(), &f.to_string()])
                    .arg(p.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped()),
            );
            let pid = child.id() as i32;
            let stdout = child.stdout.take();
            let measured = measure(pid, stdout, &key, &dir, round, (t, m, f, p));
            cr_ebpf_perf::stop(pid);
            let _ = child.wait();
            let (full, incr) = measured?;
            let r = results.entry(key).or_default();
            r.entry("full_freeze_ms")
                .or_default()
                .push(full.freeze.as_secs_f64() * 1e3);
            r.entry("full_total_ms")
                .or_default()
                .push(full.total.as_secs_f64() * 1e3);
            r.entry("incremental_freeze_ms")
                .or_default()
                .push(incr.freeze.as_secs_f64() * 1e3);
            r.entry("incremental_collect_ms")
                .or_default()
                .push(incr.phases.collect.as_secs_f64() * 1e3);
            r.entry("incremental_scan_ms")
                .or_default()
                .push(incr.phases.scan.as_secs_f64() * 1e3);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "checkpoint time against threads, mappings, descriptors, processes (medians of {rounds})"
    );
    println!(
        "{:<58} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "workload", "full freeze", "full total", "incr freeze", "incr collect", "incr scan"
    );
    let mut med: BTreeMap<String, BTreeMap<&str, f64>> = BTreeMap::new();
    for (k, m) in &results {
        let g = |n: &str| median(&m[n]);
        println!(
            "{k:<58} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>9.2} ms",
            g("full_freeze_ms"),
            g("full_total_ms"),
            g("incremental_freeze_ms"),
            g("incremental_collect_ms"),
            g("incremental_scan_ms"),
        );
        med.insert(k.clone(), m.iter().map(|(n, v)| (*n, median(v))).collect());
    }
    if let Some(path) = cr_ebpf_perf::arg_value(&args, "--out") {
        let json = serde_json::json!({
            "bench": "scaling", "rounds": rounds, "median": med, "samples": results,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
