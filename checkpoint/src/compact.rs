//! Keeping chains short: compaction and retention. Neither touches the
//! running process; both only read and write the images directory, and a
//! crash at any point leaves every checkpoint that was readable before
//! readable after.
//!
//! * [`compact`] rewrites one checkpoint as a full image holding every page
//!   it resolves to (every process's, for the checkpoint of a tree). The
//!   new image is written beside the old one and the two
//!   directories are exchanged atomically (`renameat2(RENAME_EXCHANGE)`), so
//!   the name always holds a complete image with the same contents; its
//!   children, which name it as their parent, stay valid.
//! * [`retain`] keeps the newest K checkpoints: the oldest kept one is
//!   compacted if it depends on older ones, then the older ones are renamed
//!   to hidden names and deleted.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cr_ebpf_image::{
    images_dir,
    pages::{Chunk, PageWriter},
    publish, tree, Chain, ChainInfo, ImageError, MAP_INHERITS,
};
use rayon::prelude::*;

/// What compaction did.
#[derive(Debug, Clone)]
pub struct CompactReport {
    /// The checkpoint rewritten.
    pub name: String,
    /// Images its pages were gathered from.
    pub chain_len: usize,
    /// Pages in the new full image.
    pub pages: u64,
    /// Its page store on disk.
    pub page_bytes: u64,
    /// Time taken.
    pub took: Duration,
}

/// What retention did.
#[derive(Debug, Clone, Default)]
pub struct RetainReport {
    /// The checkpoint compacted into a new base, if one was.
    pub compacted: Option<CompactReport>,
    /// Checkpoints deleted.
    pub deleted: Vec<String>,
    /// Checkpoints kept.
    pub kept: Vec<String>,
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.display().to_string();
    move |source| ImageError::Io { path, what, source }
}

/// Rewrites checkpoint `name` of the images directory `dir` as a full image
/// (no parent) with the same contents. Takes the directory's lock.
pub fn compact(dir: &Path, name: &str, threads: usize) -> Result<CompactReport, ImageError> {
    let _lock = images_dir::lock(dir)?;
    compact_locked(dir, name, threads)
}

fn compact_locked(dir: &Path, name: &str, threads: usize) -> Result<CompactReport, ImageError> {
    let t = Instant::now();
    let target = dir.join(name);
    // Every process's chain read and verified before anything is written.
    let mut chains = Vec::new();
    for (_, image) in images_dir::processes(&target)? {
        let sub = image
            .strip_prefix(&target)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let chain = Chain::open(&image)?;
        chain.read_ahead();
        chains.push((sub, chain));
    }
    let tree = tree::is_tree(&target)
        .then(|| tree::Tree::read(&target))
        .transpose()?;
    let workers = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| io(dir, "starting threads")(std::io::Error::other(e.to_string())))?;
    let staging = dir.join(format!(".{name}.compact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let (pages, page_bytes) = publish(&staging, |tmp| {
        if let Some(tree) = &tree {
            tree.write(tmp)?;
        }
        let (mut pages, mut bytes) = (0, 0);
        for (sub, chain) in &chains {
            let out = tmp.join(sub);
            if !sub.as_os_str().is_empty() {
                cr_ebpf_image::trust::create_private_dir(&out).map_err(io(&out, "creating"))?;
            }
            let (p, b) = write_full(chain, name, &out, &pool, workers, &target)?;
            pages += p;
            bytes += b;
        }
        Ok((pages, bytes))
    })?;
    exchange(&staging, &target)?;
    std::fs::remove_dir_all(&staging).map_err(io(&staging, "removing"))?;
    Ok(CompactReport {
        name: name.to_string(),
        chain_len: chains.iter().map(|c| c.1.links().len()).max().unwrap_or(0),
        pages,
        page_bytes,
        took: t.elapsed(),
    })
}

/// Writes into `out` one process image holding every page `chain`
/// resolves to, with no parent.
fn write_full(
    chain: &Chain,
    name: &str,
    out: &Path,
    pool: &rayon::ThreadPool,
    workers: usize,
    target: &Path,
) -> Result<(u64, u64), ImageError> {
    let mut manifest = chain.manifest().clone();
    let old = manifest.chain.clone().unwrap_or_else(|| ChainInfo {
        id: name.to_string(),
        seq: images_dir::parse_name(name).unwrap_or(0),
        ..Default::default()
    });
    manifest.chain = Some(ChainInfo {
        id: old.id,
        parent: String::new(),
        seq: old.seq,
        method: "compacted".into(),
    });
    for m in &mut manifest.mappings {
        m.flags &= !MAP_INHERITS;
    }
    let mut writer = PageWriter::create(out)?;
    cr_ebpf_image::progress::start("compacting", chain.pages());
    let (tx, rx) = crossbeam_channel::bounded::<Chunk>(workers * 4);
    let (read, written) = std::thread::scope(|s| {
        let w = s.spawn(move || -> Result<PageWriter, ImageError> {
            for c in rx {
                writer.write(&c)?;
            }
            Ok(writer)
        });
        let read: Result<(), ImageError> = pool.install(|| {
            chain
                .fills()
                .par_iter()
                .try_for_each_init(Vec::new, |buf, f| {
                    chain.read(
                        f,
                        buf,
                        |addr, bytes| {
                            let _ = tx.send(Chunk::compress(addr, bytes));
                            cr_ebpf_image::progress::add(bytes.len() as u64 / 4096);
                            Ok(())
                        },
                        |e| io(target, "reading")(std::io::Error::other(e)),
                    )
                })
        });
        drop(tx);
        (read, w.join().expect("page writer thread panicked"))
    });
    read?;
    let stored = written?.finish()?;
    manifest.write(out)?;
    Ok(stored)
}

/// Swaps two directories atomically.
fn exchange(a: &Path, b: &Path) -> Result<(), ImageError> {
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| io(a, "naming")(e.into()))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| io(b, "naming")(e.into()))?;
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(io(b, "exchanging with its compacted copy")(
            std::io::Error::last_os_error(),
        ));
    }
    let parent = b.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(parent, "syncing"))
}

/// Keeps the newest `keep` checkpoints of `dir` (at least one) and deletes
/// the others, compacting first the oldest kept one if it needs them.
pub fn retain(dir: &Path, keep: usize, threads: usize) -> Result<RetainReport, ImageError> {
    let _lock = images_dir::lock(dir)?;
    let all = images_dir::list(dir)?;
    let keep = keep.max(1);
    if all.len() <= keep {
        return Ok(RetainReport {
            kept: all.into_iter().map(|e| e.name).collect(),
            ..Default::default()
        });
    }
    let split = all.len() - keep;
    let (old, kept) = all.split_at(split);
    let kept_names: Vec<&str> = kept.iter().map(|e| e.name.as_str()).collect();
    // Every kept checkpoint must resolve within the kept ones.
    let mut compacted = None;
    for e in kept {
        let parents = images_dir::parents(&e.dir)?;
        if parents.iter().any(|p| !kept_names.contains(&p.as_str())) {
            compacted = Some(compact_locked(dir, &e.name, threads)?);
        }
    }
    let mut deleted = Vec::new();
    for e in old {
        remove_checkpoint(dir, &e.dir)?;
        deleted.push(e.name.clone());
    }
    Ok(RetainReport {
        compacted,
        deleted,
        kept: kept_names.iter().map(|s| s.to_string()).collect(),
    })
}

/// Hides a checkpoint (one atomic rename) and then deletes it.
fn remove_checkpoint(dir: &Path, path: &PathBuf) -> Result<(), ImageError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hidden = dir.join(format!(".{name}.deleting"));
    std::fs::rename(path, &hidden).map_err(io(path, "hiding before deletion"))?;
    std::fs::remove_dir_all(&hidden).map_err(io(&hidden, "deleting"))
}

/// Removes what interrupted writers left behind (hidden temporary and
/// half-deleted directories). Call only while no writer runs.
pub fn clean_leftovers(dir: &Path) -> Result<Vec<String>, ImageError> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let ours = n.starts_with('.')
            && n.trim_start_matches('.').starts_with(images_dir::PREFIX)
            && (n.contains(".tmp-") || n.contains(".compact-") || n.ends_with(".deleting"));
        if ours && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(io(&e.path(), "removing"))?;
            removed.push(n);
        }
    }
    Ok(removed)
}
