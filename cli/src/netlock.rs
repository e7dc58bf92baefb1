//! The network lock from the command line: the eBPF lock `dump` takes,
//! the lock names an image records, and `cr-ebpf unlock`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use cr_ebpf_checkpoint::{ConnectionLock, NetLockKey};
use cr_ebpf_image::{images_dir, tree, Manifest};
use cr_ebpf_loader::netlock;

/// The eBPF network lock (`loader::netlock`): a tcx classifier pinned in bpffs.
#[derive(Debug)]
pub struct BpfLock;

impl ConnectionLock for BpfLock {
    fn lock(&self, name: &str, connections: &[NetLockKey]) -> Result<(), String> {
        netlock::lock(name, connections)
            .map(|_| ())
            .map_err(|e| crate::error_chain(&e))
    }

    fn unlock(&self, name: &str) {
        if let Err(e) = netlock::unlock(name) {
            eprintln!(
                "cr-ebpf: the network lock {name} could not be removed: {}; remove {} by hand",
                crate::error_chain(&e),
                netlock::ROOT
            );
        }
    }
}

/// The network locks the image at `dir` (an image, or a checkpoint of an
/// images directory) records.
pub fn locks_of(dir: &Path, checkpoint: Option<&str>) -> Result<Vec<String>> {
    let dir = images_dir::locate(dir, checkpoint)?;
    let mut images = vec![dir.clone()];
    if tree::is_tree(&dir) {
        images = tree::Tree::read(&dir)?
            .processes
            .iter()
            .filter(|p| p.zombie.is_none())
            .map(|p| dir.join(&p.dir))
            .collect();
    }
    let mut out = Vec::new();
    for image in images {
        let m = Manifest::read(&image)?;
        out.extend(m.network_lock.filter(|n| !out.contains(n)));
    }
    Ok(out)
}

/// After a restore: removes what is left of the locks `names` (the
/// restore removes each once its connections exist again) and tells of
/// those that were `gone` before it: their peers may have had a reset.
pub fn release(names: &[String], gone: &[&String]) -> Result<()> {
    for name in names {
        netlock::unlock(name).with_context(|| format!("removing the network lock {name}"))?;
        if gone.contains(&name) {
            eprintln!(
                "cr-ebpf: the network lock {name} of this image was gone (removed, or the machine \
                 restarted): a peer that sent while the process was down got a reset"
            );
        }
    }
    Ok(())
}

/// Options of `cr-ebpf unlock`.
#[derive(clap::Args)]
pub struct Args {
    /// Remove the network lock of this image (or images directory).
    #[arg(long, required_unless_present_any = ["all", "list"])]
    pub images_dir: Option<PathBuf>,
    /// In an images directory, the checkpoint whose lock to remove.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Remove every network lock on this machine.
    #[arg(long, conflicts_with_all = ["images_dir", "list"])]
    pub all: bool,
    /// List the network locks on this machine.
    #[arg(long, conflicts_with = "images_dir")]
    pub list: bool,
    /// Print what was done as one JSON line (`{"ok", "locks": [{"name",
    /// "removed"}]}`, or `{"ok", "locks": [NAME...]}` with `--list`).
    #[arg(long)]
    pub json: bool,
}

/// `cr-ebpf unlock`: lets the TCP connections of an image that will not be
/// restored go (their peers get a reset at their next packet).
pub fn run(args: &Args) -> Result<ExitCode> {
    if args.list {
        let names = netlock::list();
        if args.json {
            println!("{}", serde_json::json!({"ok": true, "locks": names}));
        } else {
            for name in names {
                println!("{name}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let names = match &args.images_dir {
        // (Its errors name the path.)
        Some(dir) => locks_of(dir, args.checkpoint.as_deref())?,
        None => netlock::list(),
    };
    let mut done = Vec::new();
    for name in &names {
        let removed =
            netlock::unlock(name).with_context(|| format!("removing the network lock {name}"))?;
        if !args.json {
            println!("{name}: {}", if removed { "removed" } else { "not there" });
        }
        done.push(serde_json::json!({"name": name, "removed": removed}));
    }
    if args.json {
        println!("{}", serde_json::json!({"ok": true, "locks": done}));
    } else if names.is_empty() {
        println!("no network lock");
    }
    Ok(ExitCode::SUCCESS)
}
