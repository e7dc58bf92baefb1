//! An images directory: the checkpoints of one process or process tree,
//! `ckpt-000001`, `ckpt-000002`, … each an image directory whose parent (if
//! any) is a sibling. Entries starting with `.` are temporary (being
//! written, or being deleted) and never read.
//!
//! A checkpoint is either the image of one process or the image of a tree
//! (`tree.img` and one image per live process, `proc-PID/`). The parent a
//! process image names is a checkpoint; the image of that process in it
//! ([`process_image`]) is the one it takes inherited pages from, whichever
//! of the two shapes the parent has: a process that had no children at one
//! checkpoint and has some at the next chains on all the same.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::{file, ImageError};

/// Prefix of checkpoint directory names.
pub const PREFIX: &str = "ckpt-";

/// The directory name of checkpoint number `seq`.
pub fn checkpoint_name(seq: u64) -> String {
    format!("{PREFIX}{seq:06}")
}

/// The number in a checkpoint directory name.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One checkpoint in an images directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Directory name.
    pub name: String,
    /// Its number.
    pub seq: u64,
    /// Its path.
    pub dir: PathBuf,
}

/// The published checkpoints in `dir`, oldest first. A directory that does
/// not exist holds none.
pub fn list(dir: &Path) -> Result<Vec<Entry>, ImageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file::io(dir, "listing")(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(file::io(dir, "listing"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(seq) = parse_name(&name) {
            if is_image(&e.path()) {
                out.push(Entry {
                    name,
                    seq,
                    dir: e.path(),
                });
            }
        }
    }
    out.sort_by_key(|e| e.seq);
    Ok(out)
}

/// Bytes the files of checkpoint or image `dir` take (their lengths, every
/// file below it): the one size `track`, `snapshot` and `inspect` report.
pub fn size_on_disk(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size_on_disk(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The checkpoint directories of `dir` (named `ckpt-N`, not temporary)
/// that hold no image: damaged (a file deleted, a copy cut short).
pub fn damaged(dir: &Path) -> Vec<(u64, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, String)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let seq = parse_name(&name)?;
            (e.path().is_dir() && !is_image(&e.path())).then_some((seq, name))
        })
        .collect();
    out.sort();
    out
}

/// Whether `dir` is a single image rather than an images directory.
pub fn is_image(dir: &Path) -> bool {
    dir.join(crate::MANIFEST_FILE).exists() || crate::tree::is_tree(dir)
}

/// The live processes of checkpoint `dir` and their image directories: the
/// one process of a single image, or every live process of a tree, root
/// first.
pub fn processes(dir: &Path) -> Result<Vec<(i32, PathBuf)>, ImageError> {
    if crate::tree::is_tree(dir) {
        let tree = crate::tree::Tree::read(dir)?;
        return Ok(tree
            .processes
            .iter()
            .filter(|p| p.zombie.is_none())
            .map(|p| (p.pid, dir.join(&p.dir)))
            .collect());
    }
    let m = crate::Manifest::read(dir)?;
    Ok(vec![(m.process.pid, dir.to_path_buf())])
}

/// The process a checkpoint is of: the root of a tree, or its one process.
pub fn root_pid(dir: &Path) -> Result<i32, ImageError> {
    Ok(processes(dir)?.first().map_or(0, |p| p.0))
}

/// The image of process `pid` in checkpoint `dir`, if it has one.
pub fn process_image(dir: &Path, pid: i32) -> Result<Option<PathBuf>, ImageError> {
    Ok(processes(dir)?
        .into_iter()
        .find(|p| p.0 == pid)
        .map(|p| p.1))
}

/// The checkpoint a process image belongs to: the tree holding it, or the
/// image itself.
pub fn checkpoint_of(image: &Path) -> &Path {
    match image.parent() {
        Some(p) if crate::tree::is_tree(p) => p,
        _ => image,
    }
}

/// The parents named by the process images of checkpoint `dir` (none for a
/// full one), each once.
pub fn parents(dir: &Path) -> Result<Vec<String>, ImageError> {
    let mut out: Vec<String> = Vec::new();
    for (_, image) in processes(dir)? {
        let m = crate::Manifest::read(&image)?;
        if let Some(p) = m.chain.map(|c| c.parent).filter(|p| !p.is_empty()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The image to restore from `dir`: `dir` itself when it is an image;
/// otherwise the checkpoint named `which` in it, or its newest one.
pub fn locate(dir: &Path, which: Option<&str>) -> Result<PathBuf, ImageError> {
    if is_image(dir) {
        if let Some(w) = which {
            return Err(ImageError::Io {
                path: dir.display().to_string(),
                what: "choosing a checkpoint",
                source: std::io::Error::other(format!(
                    "this is a single image, not an images directory: drop --checkpoint {w}"
                )),
            });
        }
        return Ok(dir.to_path_buf());
    }
    let all = list(dir)?;
    // The newest checkpoint damaged: never silently the one before.
    if which.is_none() {
        let newest = all.last().map_or(0, |e| e.seq);
        if let Some((_, name)) = damaged(dir)
            .into_iter()
            .rev()
            .find(|(seq, _)| *seq > newest)
        {
            let before = all
                .last()
                .map_or_else(|| "none".to_string(), |e| e.name.clone());
            return Err(ImageError::Corrupt {
                path: dir.join(&name).display().to_string(),
                offset: 0,
                what: format!(
                    "the newest checkpoint {name} holds no image (a file is missing); restore \
                     the one before with --checkpoint {before}, or repair or remove {name}"
                ),
            });
        }
    }
    let found = match which {
        Some(w) => all
            .into_iter()
            .find(|e| e.name == w || e.seq.to_string() == w),
        None => all.into_iter().last(),
    };
    found.map(|e| e.dir).ok_or_else(|| ImageError::Io {
        path: dir.display().to_string(),
        what: "finding a checkpoint",
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            match which {
                Some(w) => format!("no checkpoint {w:?} here (`cr-ebpf inspect` lists them)"),
                None => "no image and no checkpoint here".to_string(),
            },
        ),
    })
}

/// An exclusive lock on an images directory, held by whoever adds,
/// rewrites or deletes checkpoints in it (released on drop).
pub struct DirLock {
    _file: File,
}

/// Takes the images directory's lock, waiting for the current holder.
pub fn lock(dir: &Path) -> Result<DirLock, ImageError> {
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(file::io(&path, "opening"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(file::io(&path, "locking")(std::io::Error::last_os_error()));
    }
    Ok(DirLock { _file: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(checkpoint_name(7), "ckpt-000007");
        assert_eq!(parse_name("ckpt-000007"), Some(7));
        assert_eq!(parse_name("ckpt-1234567"), Some(1234567));
        assert_eq!(parse_name(".ckpt-000007.tmp-5"), None);
        assert_eq!(parse_name("ckpt-"), None);
        assert_eq!(parse_name("ckpt-12a"), None);
    }

    #[test]
    fn a_damaged_newest_checkpoint_is_refused_not_skipped() {
        let d = std::env::temp_dir().join(format!("cr-ebpf-damaged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for n in [1, 2] {
            let c = d.join(checkpoint_name(n));
            std::fs::create_dir_all(&c).unwrap();
            std::fs::write(c.join(crate::MANIFEST_FILE), b"").unwrap();
        }
        assert_eq!(locate(&d, None).unwrap(), d.join("ckpt-000002"));
        // The newest loses its manifest: named, and the one before offered.
        std::fs::remove_file(d.join("ckpt-000002").join(crate::MANIFEST_FILE)).unwrap();
        assert_eq!(damaged(&d), [(2, "ckpt-000002".to_string())]);
        let err = locate(&d, None).unwrap_err().to_string();
        assert!(
            err.contains("ckpt-000002 holds no image") && err.contains("--checkpoint ckpt-000001"),
            "{err}"
        );
        // Asked for by name, the one before is given.
        assert_eq!(locate(&d, Some("1")).unwrap(), d.join("ckpt-000001"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
