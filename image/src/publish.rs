//! Atomic publication of an image directory.

use std::{fs::File, path::Path};

use crate::ImageError;

/// Creates the image `dest` atomically: `fill` writes the component files
/// into a temporary directory next to it, which is then fsynced and renamed
/// to `dest`. A crash or an error at any point leaves either nothing or a
/// `.tmp` directory that no reader accepts, never a half image at `dest`.
/// `dest` must not exist.
pub fn publish<T>(
    dest: &Path,
    fill: impl FnOnce(&Path) -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let name = dest.display().to_string();
    if dest.exists() {
        return Err(ImageError::Exists { path: name });
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = dest.file_name().ok_or_else(|| ImageError::Io {
        path: name.clone(),
        what: "naming",
        source: std::io::Error::other("the image path has no final component"),
    })?;
    sweep_leftovers(dest);
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let io = |path: &Path, what| {
        let p = path.display().to_string();
        move |source| ImageError::Io {
            path: p,
            what,
            source,
        }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io(&tmp, "creating"))?;
    }
    let result = fill(&tmp).and_then(|v| {
        File::open(&tmp)
            .and_then(|d| d.sync_all())
            .map_err(io(&tmp, "syncing"))?;
        // rename(2) would replace an empty directory that appeared meanwhile:
        // check again right before.
        if dest.exists() {
            return Err(ImageError::Exists { path: name.clone() });
        }
        std::fs::rename(&tmp, dest).map_err(io(dest, "renaming into place"))?;
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io(&parent, "syncing"))?;
        Ok(v)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Removes what a cr-ebpf killed while it made the image `dest` left next
/// to it: its temporary directory (`.NAME.tmp-PID`) and a dump's pre-copy
/// directory (`.NAME.tmp-PID-precopy`), both holding memory of the process
/// it checkpointed. Only directories of this user whose process is gone;
/// a link is never followed.
pub fn sweep_leftovers(dest: &Path) {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.strip_suffix("-precopy").unwrap_or(rest);
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        use std::os::unix::fs::MetadataExt as _;
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == me => {
                let _ = std::fs::remove_dir_all(&path);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_a_gone_cr_ebpf_are_swept_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("cr-ebpf-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        // A live process's: pid 1 is always there.
        let me = 1;
        let make = |n: &str| {
            let d = root.join(n);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("pages.img"), b"memory").unwrap();
            d
        };
        let gone = [
            make(&format!(".img.tmp-{dead}")),
            make(&format!(".img.tmp-{dead}-precopy")),
        ];
        let kept = [
            make(&format!(".img.tmp-{me}")),
            make(&format!(".img.tmp-{me}-precopy")),
            make(&format!(".other.tmp-{dead}")),
            make(&format!(".img.tmp-{dead}-other")),
        ];
        // A link to a directory, named as a leftover: neither followed nor
        // removed.
        let target = make("target");
        let link = root.join(format!(".img.tmp-{}", dead + 1_000_000));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let v = publish(&root.join("img"), |tmp| {
            std::fs::write(tmp.join("f"), b"x").map_err(|source| ImageError::Io {
                path: "f".into(),
                what: "writing",
                source,
            })
        });
        v.unwrap();
        for d in &gone {
            assert!(!d.exists(), "{} left", d.display());
        }
        for d in &kept {
            assert!(d.join("pages.img").exists(), "{} swept", d.display());
        }
        assert!(link.symlink_metadata().is_ok() && target.join("pages.img").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
