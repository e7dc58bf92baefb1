//! `cargo xtask demo`: the main job on a built-in workload.
//!
//! 1. `cr-ebpf check`: what this machine offers.
//! 2. Starts the `counter` workload (a small service that ticks, writes
//!    pages, logs and forks helpers) and shows its output.
//! 3. `cr-ebpf trace` on it for two seconds: the live log of its resource
//!    changes and page writes that checkpoints are built from.
//! 4. `cr-ebpf dump`: checkpoints it and kills it, as a crash would.
//! 5. `cr-ebpf inspect`: what the image holds.
//! 6. `cr-ebpf restore`: brings it back with the same pid; its ticks go on
//!    from where they were, with no gap and no repeat.
//!
//! Usage: `cr-ebpf-demo BIN_DIR` (the directory holding `cr-ebpf` and `counter`).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
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
    // Only stdin, stdout, stderr: whatever else this shell or harness left
    // open (a build jobserver, say) would be a pipe to the outside, which a
    // checkpoint rightly refuses.
    {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: close_range is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
    }
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
        &format!("cr-ebpf trace --pid {pid} (2 seconds, first lines)"),
    );
    let mut trace = Command::new(cr)
        .args(["trace", "--pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cr-ebpf trace")?;
    let events = lines_of(&mut trace)?;
    let start = Instant::now();
    let (mut shown, mut total) = (0, 0);
    while start.elapsed() < Duration::from_secs(2) {
        while let Ok(l) = events.try_recv() {
            total += 1;
            if shown < 12 {
                println!("{l}");
                shown += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sending SIGINT (Ctrl-C) to a child we started; it detaches.
    unsafe { libc::kill(trace.id() as i32, libc::SIGINT) };
    trace.wait()?;
    total += events.try_iter().count();
    println!("... {total} events in 2 s; the tracer detached, the workload runs on untouched");

    step(
        4,
        &format!("cr-ebpf dump --pid {pid} (then the process is killed, as by a crash)"),
    );
    let mut last = 0;
    while let Ok(l) = ticks.try_recv() {
        last = tick_of(&l).unwrap_or(last);
    }
    let img = images.join("checkpoint-1");
    let status = Command::new(cr)
        .args(["dump", "--pid", &pid.to_string(), "--images-dir"])
        .arg(&img)
        .status()
        .context("running cr-ebpf dump")?;
    if !status.success() {
        bail!("cr-ebpf dump failed");
    }
    let _ = work.wait();
    while let Ok(l) = ticks.recv_timeout(Duration::from_millis(200)) {
        last = tick_of(&l).unwrap_or(last);
    }
    println!(
        "counter[{pid}] was killed after tick {last}; alive: {}",
        Path::new(&format!("/proc/{pid}")).exists()
    );

    step(5, "cr-ebpf inspect");
    let out = Command::new(cr).arg("inspect").arg(&img).output()?;
    for l in String::from_utf8_lossy(&out.stdout).lines().take(6) {
        println!("{l}");
    }

    step(
        6,
        "cr-ebpf restore: the same process comes back and continues",
    );
    let mut restored = Command::new(cr)
        .arg("restore")
        .arg("--images-dir")
        .arg(&img)
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
    let continuous = seen.first() == Some(&(last + 1)) && seen.windows(2).all(|w| w[1] == w[0] + 1);
    println!(
        "\nrestored with pid {pid} (alive: {alive}); ticks went on from {} with no gap and no repeat: {continuous}",
        last + 1
    );
    if !continuous {
        bail!("the restored workload did not continue where it stopped: {seen:?} after {last}");
    }
    Ok(())
}
