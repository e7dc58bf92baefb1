//! `cr-ebpf inspect`: what an image holds.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use cr_ebpf_image::{pages, Manifest};

/// Options of `cr-ebpf inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// An image directory, or an images directory of checkpoints.
    pub dir: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !cr_ebpf_image::images_dir::is_image(&args.dir) {
        return chain(args);
    }
    let m = Manifest::read(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?;
    let store = pages::PageStore::open(&args.dir)
        .with_context(|| format!("reading {}", args.dir.display()))?;
    let chunks = store.chunks();
    let stored = store.pages();
    let compressed = store.compressed_bytes();
    let p = &m.process;
    if args.json {
        let mappings: Vec<_> = m
            .mappings
            .iter()
            .map(|x| {
                serde_json::json!({
                    "start": format!("{:#x}", x.start), "end": format!("{:#x}", x.end),
                    "prot": x.prot, "flags": x.flags, "offset": x.offset,
                    "kind": format!("{:?}", x.kind), "path": x.path,
                    "inode": x.inode, "pages_stored": x.pages_stored,
                })
            })
            .collect();
        let threads: Vec<_> = m
            .threads
            .iter()
            .map(|t| serde_json::json!({"tid": t.tid, "sigmask": format!("{:#x}", t.sigmask), "xstate_bytes": t.xstate.len()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "format": format!("{}.{}", cr_ebpf_image::FORMAT_MAJOR, cr_ebpf_image::FORMAT_MINOR),
                "pid": p.pid, "exe": p.exe, "taken_unix_ns": p.taken_unix_ns,
                "freeze_ms": p.freeze_ns as f64 / 1e6,
                "threads": threads, "mappings": mappings,
                "pages_stored": stored, "compressed_bytes": compressed, "chunks": chunks.len(),
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "image {} (format {}.{})",
        args.dir.display(),
        cr_ebpf_image::FORMAT_MAJOR,
        cr_ebpf_image::FORMAT_MINOR
    );
    println!(
        "  process {} ({}), frozen {:.2} ms",
        p.pid,
        p.exe,
        p.freeze_ns as f64 / 1e6
    );
    println!(
        "  pages: {stored} stored ({:.1} MiB) in {} chunks, {:.1} MiB compressed",
        stored as f64 * 4096.0 / (1 << 20) as f64,
        chunks.len(),
        compressed as f64 / (1 << 20) as f64
    );
    println!("  threads:");
    for t in &m.threads {
        println!(
            "    {} (signal mask {:#x}, {} bytes of FPU state)",
            t.tid,
            t.sigmask,
            t.xstate.len()
        );
    }
    println!("  mappings:");
    for x in &m.mappings {
        let prot = format!(
            "{}{}{}",
            if x.prot & 1 != 0 { 'r' } else { '-' },
            if x.prot & 2 != 0 { 'w' } else { '-' },
            if x.prot & 4 != 0 { 'x' } else { '-' }
        );
        println!(
            "    {:#014x}-{:#014x} {prot} {:<6} {:>6} pages stored  {}",
            x.start,
            x.end,
            format!("{:?}", x.kind),
            x.pages_stored,
            x.path
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The checkpoints of an images directory, oldest first.
fn chain(args: &Args) -> Result<ExitCode> {
    let all = cr_ebpf_image::images_dir::list(&args.dir)?;
    if all.is_empty() {
        anyhow::bail!(
            "{} holds neither an image nor checkpoints",
            args.dir.display()
        );
    }
    let mut rows = Vec::new();
    for e in &all {
        let m = Manifest::read(&e.dir).with_context(|| format!("reading {}", e.dir.display()))?;
        let store = pages::PageStore::open(&e.dir)
            .with_context(|| format!("reading {}", e.dir.display()))?;
        let c = m.chain.clone().unwrap_or_default();
        rows.push(serde_json::json!({
            "id": e.name, "seq": e.seq,
            "parent": if c.parent.is_empty() { None } else { Some(c.parent) },
            "method": c.method, "pid": m.process.pid,
            "pages": store.pages(), "bytes": store.compressed_bytes(),
            "freeze_ms": m.process.freeze_ns as f64 / 1e6,
            "taken_unix_ns": m.process.taken_unix_ns,
        }));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"checkpoints": rows}))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} checkpoint(s)", args.dir.display(), rows.len());
    println!(
        "  {:<12} {:<12} {:<10} {:>9} {:>11} {:>10}",
        "id", "parent", "method", "pages", "size KiB", "pause ms"
    );
    for r in &rows {
        println!(
            "  {:<12} {:<12} {:<10} {:>9} {:>11.1} {:>10.2}",
            r["id"].as_str().unwrap_or(""),
            r["parent"].as_str().unwrap_or("-"),
            r["method"].as_str().unwrap_or(""),
            r["pages"].as_u64().unwrap_or(0),
            r["bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            r["freeze_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
