//! `cr-ebpf trace`: the live, decoded log of a process tree.

use std::{collections::BTreeSet, io::Write as _, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use cr_ebpf_loader::{display::Line, Event, Tracer, TracerOptions};

/// Options of `cr-ebpf trace`.
#[derive(clap::Args)]
pub struct Args {
    /// Process whose tree to trace (it and everything below it).
    #[arg(long)]
    pub pid: u32,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Leave out write faults (only resource changes).
    #[arg(long)]
    pub no_faults: bool,
    /// Ring buffer size in KiB (a power of two).
    #[arg(long, default_value_t = 4096)]
    pub buffer_kib: u32,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(trace(args))
}

async fn trace(args: &Args) -> Result<ExitCode> {
    // A wrong pid is told as such before the programs are loaded (which
    // fails first without the privileges).
    if !std::path::Path::new(&format!("/proc/{}", args.pid)).exists() {
        anyhow::bail!(
            "no process with pid {0}: check the pid (`ps -p {0}`)",
            args.pid
        );
    }
    let options = TracerOptions {
        ring_buffer_bytes: args
            .buffer_kib
            .checked_mul(1024)
            .context("--buffer-kib is too large")?,
        user_faults: !args.no_faults,
        kernel_faults: !args.no_faults,
        ..TracerOptions::default()
    };
    let mut tracer = Tracer::load(&options).context("loading the eBPF programs")?;
    let added = tracer.track(args.pid)?;
    let mut alive: BTreeSet<u32> = added.iter().copied().collect();
    let mut events = tracer.events()?;
    if !args.json {
        eprintln!(
            "tracing pid {} ({} process{} in the tree); Ctrl-C to stop",
            args.pid,
            added.len(),
            if added.len() == 1 { "" } else { "es" }
        );
    }

    let start_ns = cr_ebpf_checkpoint::monotonic_ns();
    let mut batch = Vec::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut reported_losses = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut reported_fault_losses = tracer.fault_losses()?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        // In this order, with a yield each turn: a process that logs
        // without pause keeps the ring buffer ready, and Ctrl-C and the
        // tick need the runtime to turn its signal and timer drivers.
        tokio::select! {
            biased;
            _ = &mut ctrl_c => break,
            r = events.next_batch(&mut batch) => { r.context("reading the event ring buffer")?; }
            _ = tick.tick() => {
                // Fault records do not wake us one by one: collect them here.
                events.drain_some(&mut batch, cr_ebpf_loader::BATCH_MAX);
                // A process may leave without us seeing its exit (its record was lost).
                alive.retain(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
            }
        }
        for item in batch.drain(..) {
            let event = match item {
                Ok(e) => e,
                Err(e) => {
                    writeln!(out, "cr-ebpf: skipping an undecodable record: {e}")?;
                    continue;
                }
            };
            match &event {
                Event::Fork(f) if !f.thread => {
                    alive.insert(f.child_tgid);
                }
                Event::Exit(e) if e.group_dead == Some(true) => {
                    alive.remove(&e.origin.tgid);
                }
                _ => {}
            }
            if args.json {
                serde_json::to_writer(&mut out, &event)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "{}",
                    Line {
                        event: &event,
                        start_ns
                    }
                )?;
            }
        }
        let lost: u64 = tracer.losses()?.iter().map(|l| l.dropped).sum();
        if lost > reported_losses {
            let msg = format!(
                "{} event(s) lost: the ring buffer was full (raise --buffer-kib); \
                 a checkpoint would re-collect everything",
                lost - reported_losses
            );
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "loss", "dropped": lost - reported_losses})
                )?;
            } else {
                writeln!(out, "cr-ebpf: {msg}")?;
            }
            reported_losses = lost;
        }
        let fault_lost = tracer.fault_losses()?;
        if fault_lost > reported_fault_losses {
            let n = fault_lost - reported_fault_losses;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "fault-loss", "dropped": n})
                )?;
            } else {
                writeln!(
                    out,
                    "cr-ebpf: {n} fault record(s) lost: the ring buffer was full (raise --buffer-kib); \
                     faults are only a hint, checkpoints do not depend on them"
                )?;
            }
            reported_fault_losses = fault_lost;
        }
        out.flush()?;
        if alive.is_empty() {
            if !args.json {
                eprintln!("the traced tree has exited");
            }
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(ExitCode::SUCCESS)
}
