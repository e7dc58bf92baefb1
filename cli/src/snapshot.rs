//! `cr-ebpf snapshot` and `cr-ebpf compact`: a checkpoint now, and keeping
//! an images directory short.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context as _, Result};
use cr_ebpf_checkpoint::{Changes, Session, SessionOptions};
use cr_ebpf_image::images_dir;

/// Options of `cr-ebpf snapshot`.
#[derive(clap::Args)]
pub struct Args {
    /// Store only what changed since the newest checkpoint in the directory.
    #[arg(long)]
    pub incremental: bool,
    /// The images directory (served by `cr-ebpf track`, or not).
    #[arg(long)]
    pub images_dir: PathBuf,
    /// The process, when no service runs (default: the one the newest
    /// checkpoint is of).
    #[arg(long)]
    pub pid: Option<i32>,
    /// Most bytes of one shared memory object stored, when no service runs
    /// (as `dump --shm-limit`; a service uses its own).
    #[arg(long, default_value = "4G", value_parser = crate::args::size)]
    pub shm_limit: u64,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.incremental {
        if let Some(v) = crate::track::request_snapshot(&args.images_dir)? {
            if v["ok"] != true {
                // Its error as the cause: a refusal stays one (exit 3).
                let why = v["error"].as_str().unwrap_or("no reason given");
                return Err(anyhow::anyhow!(why.to_string()).context(format!(
                    "the service of {} took no checkpoint",
                    args.images_dir.display()
                )));
            }
            print(args.json, &v);
            return Ok(ExitCode::SUCCESS);
        }
    }
    let newest = images_dir::list(&args.images_dir)?.pop();
    let pid = match (args.pid, &newest) {
        (Some(p), _) => p,
        (None, Some(e)) => images_dir::root_pid(&e.dir)?,
        (None, None) => bail!(
            "no service answers in {} and it holds no checkpoint: pass --pid",
            args.images_dir.display()
        ),
    };
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid} to checkpoint (it exited?)");
    }
    let mut session = Session::new(
        pid,
        &args.images_dir,
        None,
        SessionOptions {
            shm_limit: args.shm_limit,
            ..SessionOptions::default()
        },
    )
    .with_context(|| format!("checkpointing process {pid}"))?;
    if !args.incremental {
        session.start_new_chain();
    }
    let bar = crate::progress::Bar::start(!args.json);
    let r = session
        .checkpoint(&Changes::all())
        .with_context(|| format!("checkpointing process {pid} (left running)"));
    drop(bar);
    let r = r?;
    let v = serde_json::json!({
        "ok": true, "id": r.name, "seq": r.seq, "parent": r.parent, "method": r.method.name(),
        "pages": r.pages, "bytes": r.page_bytes,
        "size_bytes": images_dir::size_on_disk(&r.dir),
        "freeze_ms": r.freeze.as_secs_f64() * 1e3, "total_ms": r.total.as_secs_f64() * 1e3,
    });
    print(args.json, &v);
    Ok(ExitCode::SUCCESS)
}

fn print(json: bool, v: &serde_json::Value) {
    if json {
        println!("{v}");
    } else {
        println!(
            "{} ({}{}): {} pages, {:.1} KiB, freeze {:.2} ms",
            v["id"].as_str().unwrap_or("?"),
            v["method"].as_str().unwrap_or("?"),
            v["parent"]
                .as_str()
                .map(|p| format!(" on {p}"))
                .unwrap_or_default(),
            v["pages"],
            v["size_bytes"]
                .as_f64()
                .or_else(|| v["bytes"].as_f64())
                .unwrap_or(0.0)
                / 1024.0,
            v["freeze_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

/// Options of `cr-ebpf compact`.
#[derive(clap::Args)]
pub struct CompactArgs {
    /// The images directory.
    #[arg(long)]
    pub images_dir: PathBuf,
    /// The checkpoint to rewrite as a full image (default: the newest).
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Instead: keep the newest K checkpoints and delete the others.
    #[arg(long, conflicts_with = "checkpoint", value_parser = crate::args::keep)]
    pub keep: Option<usize>,
    /// Threads (default: all cores).
    #[arg(long, default_value_t = 0, value_parser = crate::args::threads)]
    pub threads: usize,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// A compaction's report: `bytes` of its page store and `size_bytes` of
/// the whole checkpoint on disk, as `track` and `inspect` give them.
fn compact_json(dir: &Path, c: &cr_ebpf_checkpoint::CompactReport) -> serde_json::Value {
    serde_json::json!({
        "id": c.name, "chain_len": c.chain_len, "pages": c.pages,
        "bytes": c.page_bytes, "size_bytes": images_dir::size_on_disk(&dir.join(&c.name)),
        "took_ms": c.took.as_secs_f64() * 1e3,
    })
}

pub fn compact(args: &CompactArgs) -> Result<ExitCode> {
    if let Some(k) = args.keep {
        let bar = crate::progress::Bar::start(!args.json);
        let r = cr_ebpf_checkpoint::retain(&args.images_dir, k, args.threads);
        drop(bar);
        let r = r?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "ok": true,
                    "compacted": r.compacted.as_ref().map(|c| compact_json(&args.images_dir, c)),
                    "kept": r.kept, "deleted": r.deleted,
                })
            );
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(c) = &r.compacted {
            println!(
                "{} rewritten as a full image ({} pages from {} images) in {:.0} ms",
                c.name,
                c.pages,
                c.chain_len,
                c.took.as_secs_f64() * 1e3
            );
        }
        println!(
            "kept {} ({}), deleted {}",
            r.kept.len(),
            r.kept.join(" "),
            r.deleted.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let dir = images_dir::locate(&args.images_dir, args.checkpoint.as_deref())?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("no checkpoint name")?;
    let parent = dir.parent().context("no images directory")?;
    let bar = crate::progress::Bar::start(!args.json);
    let c = cr_ebpf_checkpoint::compact(parent, &name, args.threads);
    drop(bar);
    let c = c?;
    if args.json {
        let mut v = compact_json(parent, &c);
        v["ok"] = true.into();
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} rewritten as a full image: {} pages from {} images, {} on disk, {:.0} ms",
        c.name,
        c.pages,
        c.chain_len,
        crate::dump::on_disk(images_dir::size_on_disk(&parent.join(&c.name))),
        c.took.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}
