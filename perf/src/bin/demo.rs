//! `cargo xtask demo`: the main job on a built-in workload.
//!
//! 1. `cr-ebpf check`: what this machine offers.
//! 2. Starts the `counter` workload (a small service that ticks, writes
//!    pages, logs and forks helpers) and shows its output.
//! 3. `cr-ebpf track`: the always-on service takes an incremental
//!    checkpoint every second (a full base first, then only changed pages).
//! 4. `cr-ebpf snapshot --incremental`: one checkpoint now, through the
//!    service; then the workload is killed, as a crash would.
//! 5. `cr-ebpf inspect`: the chain, with sizes and pauses.
//! 6. `cr-ebpf restore`: brings the newest checkpoint back with the same
//!    pid; its ticks go on from the snapshot, with no gap and no repeat.
//!
//! Usage: `cr-ebpf-demo BIN_DIR` (the directory holding `cr-ebpf` and `counter`).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

/// Forwards a child's stdout lines to a channel from a thread.
fn lines_of(child: &mut Child) -> Result<mpsc::Receiver<String>> {
    let out = BufReader::new(child.stdout.take().context("child stdout")?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release".into()),
    );
    let cr = bin.join("cr-ebpf");
    let counter = bin.join("counter");
    let images = std::env::temp_dir().join(format!("cr-ebpf-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images)?;
    let result = run(&cr, &counter, &images);
    let _ = std::fs::remove_dir_all(&images);
    result
}

fn run(cr: &Path, counter: &Path, images: &Path) -> Result<()> {
    step(1, "cr-ebpf check");
    let status = Command::new(cr)
        .arg("check")
        .status()
        .context("running cr-ebpf check")?;
    if !status.success() {
        bail!("cr-ebpf check reports something the core needs is missing (see above)");
    }

    step(
        2,
        "start the demo workload (counter: ticks, writes pages, logs, forks helpers)",
    );
    let mut cmd = Command::new(counter);
    cmd.arg("200").stdout(Stdio::piped());
    // Only stdin, stdout, stderr, and off the terminal: whatever else this
    // shell or harness left open (a build jobserver, say) would be a pipe to
    // the outside, and a terminal is not restored: a checkpoint rightly
    // refuses both.
    cr_ebpf_perf::workload(&mut cmd);
    let mut work = cmd.spawn().context("starting the counter workload")?;
    let pid = work.id();
    let ticks = lines_of(&mut work)?;
    for _ in 0..3 {
        if let Ok(l) = ticks.recv_timeout(Duration::from_secs(5)) {
            println!("counter[{pid}]: {l}");
        }
    }

    step(
        3,
        &format!("cr-ebpf track --pid {pid} --interval 1s (the always-on service)"),
    );
    let mut track = Command::new(cr)
        .args([
            "track",
            "--pid",
            &pid.to_string(),
            "--interval",
            "1s",
            "--images-dir",
        ])
        .arg(images)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cr-ebpf track")?;
    let reports = lines_of(&mut track)?;
    for _ in 0..3 {
        match reports.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => println!("track: {l}"),
            Err(_) => bail!("cr-ebpf track printed no checkpoint"),
        }
    }

    step(
        4,
        "cr-ebpf snapshot --incremental (one now), then the process is killed, as by a crash",
    );
    let mut before = 0;
    while let Ok(l) = ticks.try_recv() {
        before = tick_of(&l).unwrap_or(before);
    }
    let out = Command::new(cr)
        .args(["snapshot", "--incremental", "--images-dir"])
        .arg(images)
        .output()
        .context("running cr-ebpf snapshot")?;
    if !out.status.success() {
        bail!(
            "cr-ebpf snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("snapshot: {}", String::from_utf8_lossy(&out.stdout));
    // SAFETY: killing the demo workload we started, as a crash would.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = work.wait();
    let mut last = before;
    while let Ok(l) = ticks.recv_timeout(Duration::from_millis(200)) {
        last = tick_of(&l).unwrap_or(last);
    }
    println!(
        "counter[{pid}] was killed after tick {last}; alive: {}",
        Path::new(&format!("/proc/{pid}")).exists()
    );
    let _ = track.wait();
    while let Ok(l) = reports.try_recv() {
        println!("track: {l}");
    }

    step(5, "cr-ebpf inspect: the chain of checkpoints");
    let out = Command::new(cr).arg("inspect").arg(images).output()?;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("{l}");
    }

    step(
        6,
        "cr-ebpf restore --images-dir (newest checkpoint): the same process continues",
    );
    let mut restored = Command::new(cr)
        .arg("restore")
        .arg("--images-dir")
        .arg(images)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cr-ebpf restore")?;
    let again = lines_of(&mut restored)?;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        match again.recv_timeout(Duration::from_secs(5)) {
            Ok(l) => {
                println!("counter[{pid}] (restored): {l}");
                seen.extend(tick_of(&l));
            }
            Err(_) => break,
        }
    }
    let alive = Path::new(&format!("/proc/{pid}")).exists();
    // SAFETY: stopping the restored demo process (same pid as before).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = restored.wait();
    // The snapshot was taken after tick `before` was printed and before the
    // kill; the restored process goes on from the tick after the snapshot.
    let first = seen.first().copied().unwrap_or(0);
    let continuous = (before + 1..=last + 1).contains(&first)
        && seen.len() >= 3
        && seen.windows(2).all(|w| w[1] == w[0] + 1);
    println!(
        "\nrestored with pid {pid} (alive: {alive}); it went on from tick {first} \
         (snapshot taken after tick {before}, killed after tick {last}), no gap, no repeat: \
         {continuous}"
    );
    if !continuous {
        bail!("the restored workload did not continue where it stopped: {seen:?}, snapshot after tick {before}, killed after {last}");
    }
    Ok(())
}
