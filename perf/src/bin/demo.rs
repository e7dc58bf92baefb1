//! `cargo xtask demo`: what cr-ebpf does today, on a built-in workload.
//!
//! 1. `cr-ebpf check`: what this machine offers.
//! 2. Starts the `counter` workload and shows a few ticks of its output.
//! 3. `cr-ebpf trace --pid` on it for a few seconds: the live log of its
//!    resource changes and page writes that checkpoints are built from.
//! 4. Stops the trace (the workload keeps running, untouched) and then
//!    stops the workload.
//!
//! Usage: `cr-ebpf-demo BIN_DIR` (the directory holding `cr-ebpf` and `counter`).

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

fn main() -> Result<()> {
    let bin = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/release".into()),
    );
    let cr = bin.join("cr-ebpf");
    let counter = bin.join("counter");

    step(1, "cr-ebpf check");
    let status = Command::new(&cr)
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
    let mut work = Command::new(&counter)
        .arg("200")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the counter workload")?;
    let pid = work.id();
    let mut lines = BufReader::new(work.stdout.take().context("counter stdout")?).lines();
    for _ in 0..3 {
        if let Some(Ok(l)) = lines.next() {
            println!("counter[{pid}]: {l}");
        }
    }

    step(3, &format!("cr-ebpf trace --pid {pid} (3 seconds)"));
    let mut trace = Command::new(&cr)
        .args(["trace", "--pid", &pid.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cr-ebpf trace")?;
    let trace_out = BufReader::new(trace.stdout.take().context("trace stdout")?);
    // Keep the workload's output flowing while we watch the trace.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).count());
    let show = std::thread::spawn(move || {
        let (mut shown, mut total, mut faults) = (0, 0, 0);
        for l in trace_out.lines().map_while(Result::ok) {
            total += 1;
            if l.contains("write-fault") {
                faults += 1;
                if faults > 6 {
                    continue;
                }
            }
            if shown < 40 {
                println!("{l}");
                shown += 1;
            }
        }
        (total, faults)
    });
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ctrl-C detaches the tracer; the workload is not affected.
    // SAFETY: sending SIGINT to a child we started.
    unsafe { libc::kill(trace.id() as i32, libc::SIGINT) };
    let status = trace.wait()?;
    let (total, faults) = show.join().unwrap_or((0, 0));
    println!("... {total} events in 3 s ({faults} page-write faults); trace exited: {status}");

    step(
        4,
        "the workload kept running while traced and after the trace detached",
    );
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    println!("counter[{pid}] alive: {alive}");
    let _ = work.kill();
    let _ = work.wait();
    let ticks = drain.join().unwrap_or(0);
    println!("counter printed {ticks} more ticks during and after the trace, then was stopped");
    println!(
        "\nNext in this demo as they land: snapshot the workload, kill it, restore it, \
         and watch its ticks continue."
    );
    if !alive {
        bail!("the workload died while being traced");
    }
    Ok(())
}
