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
