//! Bench: a real service under its own load tool. redis-server (Debian's
//! package) with 200k keys, driven by redis-benchmark (SET and GET, random
//! keys, 8 connections); its requests per second untracked, then under
//! `cr-ebpf track --interval 1s` (incremental checkpoints all along), then
//! untracked again, in one run; and the freeze of those checkpoints.
//!
//! Usage: `redis-bench [--quick] [--out FILE] [--bin DIR]`

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_perf::{median, percentile, spawn_clean, KillOnDrop};

/// Requests per second of one redis-benchmark run (mean of SET and GET).
fn load(port: u16, requests: u64) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "-r", "200000"])
        .args(["-c", "8", "-n", &requests.to_string(), "--csv"])
        .stdin(Stdio::null())
        .output()
        .context("running redis-benchmark (cargo xtask setup installs redis-tools)")?;
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // "SET","114285.72",...
    let rps: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(|x| x.trim_matches('"')).collect();
            matches!(f.first(), Some(&"SET") | Some(&"GET"))
                .then(|| f.get(1)?.parse().ok())
                .flatten()
        })
        .collect();
    if rps.len() != 2 {
        bail!(
            "unexpected redis-benchmark output: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(rps.iter().sum::<f64>() / 2.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
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
    let requests: u64 = if quick { 200_000 } else { 1_000_000 };
    let dir = std::env::temp_dir().join(format!("cr-ebpf-redis-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(dir.join("redis.log"))?;
    let pid = spawn_clean(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--enable-debug-command", "local"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )
    .id() as i32;
    // Killed on every way out; reaped by `stop` at the end.
    let _guard = KillOnDrop(pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admin = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("redis-server did not start (is it installed? cargo xtask setup)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    admin.write_all(b"*3\r\n$5\r\nDEBUG\r\n$8\r\nPOPULATE\r\n$6\r\n200000\r\n")?;
    let mut line = String::new();
    BufReader::new(admin.try_clone()?).read_line(&mut line)?;
    if !line.starts_with("+OK") {
        bail!("DEBUG POPULATE: {line}");
    }
    drop(admin);

    let before = load(port, requests)?;
    let images = dir.join("images");
    let mut track = spawn_clean(
        Command::new(&cr)
            .args([
                "track",
                "--pid",
                &pid.to_string(),
                "--interval",
                "1s",
                "--json",
                // Every checkpoint kept: checkpointing alone is measured.
                "--keep",
                "all",
            ])
            .arg("--images-dir")
            .arg(&images)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = track.stdout.take().map(BufReader::new);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for l in out
            .into_iter()
            .flat_map(|o| o.lines().map_while(Result::ok))
        {
            if let Ok(v) = serde_json::from_str(&l) {
                let _ = tx.send(v);
            }
        }
    });
    // The base first (the service primes it while redis runs), then load.
    let base = rx.recv_timeout(Duration::from_secs(60));
    let tracked = base.is_ok().then(|| load(port, requests));
    // SAFETY: asking our own child to detach.
    unsafe { libc::kill(track.id() as i32, libc::SIGINT) };
    let status = track.wait()?;
    let base = base.context("no base checkpoint from cr-ebpf track")?;
    let tracked = tracked.context("no load while tracked")??;
    if !status.success() {
        bail!("cr-ebpf track ended with {status}");
    }
    let reports: Vec<serde_json::Value> = rx.try_iter().collect();
    let after = load(port, requests)?;
    let freeze: Vec<f64> = reports
        .iter()
        .filter(|r| r["ok"] == true)
        .filter_map(|r| r["freeze_ms"].as_f64())
        .collect();
    let untracked = (before + after) / 2.0;
    let ratio = tracked / untracked;
    println!(
        "redis-server, 200k keys, redis-benchmark SET+GET, 8 connections, {requests} requests per test"
    );
    println!(
        "  requests/s: {tracked:.0} tracked, {untracked:.0} untracked (mean of {before:.0} before, {after:.0} after): ratio {ratio:.3} ({:+.1}%)",
        (ratio - 1.0) * 100.0
    );
    println!(
        "  {} incremental checkpoints while loaded, freeze ms: p50 {:.2}  p99 {:.2}  max {:.2} (base {:.1} ms)",
        freeze.len(),
        median(&freeze),
        percentile(&freeze, 0.99),
        percentile(&freeze, 1.0),
        base["freeze_ms"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some(path) = opt("--out") {
        let json = serde_json::json!({
            "bench": "redis", "requests_per_test": requests,
            "requests_per_s": {"untracked_before": before, "tracked": tracked, "untracked_after": after, "ratio": ratio},
            "freeze_ms": {"p50": median(&freeze), "p99": percentile(&freeze, 0.99), "max": percentile(&freeze, 1.0), "all": freeze},
            "base_freeze_ms": base["freeze_ms"],
            "reports": reports,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    cr_ebpf_perf::stop(pid);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
