//! Images hold a process's memory, secrets included, and a restore runs
//! what they say: an image is private to its owner and trusted only when
//! nobody else could have written it (as ssh's StrictModes treats a
//! user's keys). Dumps create image directories `0700` and files `0600`;
//! [`check_trusted`] refuses to read an image any part of which another
//! user owns or can write, and [`check_destination`] refuses to write into
//! a directory another user controls. A directory on the way that others
//! may write is accepted only with the sticky bit (`/tmp`), where nobody
//! but its owner can rename or remove what is in it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use crate::ImageError;

/// Most entries walked below an images directory.
const ENTRIES_CAP: usize = 1 << 20;

/// `S_ISVTX`.
const STICKY: u32 = 0o1000;

/// Whether `uid` may own what we trust: ourselves or root.
fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == me || uid == 0
}

/// An I/O error on `path` while `what`.
fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

fn untrusted(path: &Path, why: String) -> ImageError {
    ImageError::Untrusted {
        path: path.display().to_string(),
        why,
    }
}

/// `path` made absolute without resolving anything.
fn absolute(path: &Path) -> Result<PathBuf, ImageError> {
    std::path::absolute(path).map_err(io(path, "resolving"))
}

/// Checks every directory from `/` down to `path` (the directories of
/// the path as given, each symlink on the way, and the directories it
/// resolves to): owned by us or root, and not writable by others unless
/// sticky. `path` itself is not checked.
fn check_way(path: &Path, me: u32) -> Result<(), ImageError> {
    let abs = absolute(path)?;
    let mut walked = PathBuf::new();
    let parts: Vec<Component<'_>> = abs.components().collect();
    let Some((_, above)) = parts.split_last() else {
        return Ok(());
    };
    for c in above {
        walked.push(c);
        let Ok(m) = std::fs::symlink_metadata(&walked) else {
            // Not there (yet): a dump creates it, privately.
            return Ok(());
        };
        if m.file_type().is_symlink() {
            if !trusted_owner(m.uid(), me) {
                return Err(untrusted(
                    &walked,
                    format!("a symbolic link on the way, owned by user {}", m.uid()),
                ));
            }
            let to = std::fs::canonicalize(&walked).map_err(io(&walked, "resolving"))?;
            check_dirs_to(&to, me)?;
            continue;
        }
        check_dir_on_way(&walked, &m, me)?;
    }
    Ok(())
}

/// Checks `dir` (a resolved directory) and every directory above it.
fn check_dirs_to(dir: &Path, me: u32) -> Result<(), ImageError> {
    for d in dir.ancestors() {
        let m = std::fs::metadata(d).map_err(io(d, "reading"))?;
        check_dir_on_way(d, &m, me)?;
    }
    Ok(())
}

fn check_dir_on_way(d: &Path, m: &std::fs::Metadata, me: u32) -> Result<(), ImageError> {
    if !trusted_owner(m.uid(), me) {
        return Err(untrusted(
            d,
            format!("a directory on the way, owned by user {}", m.uid()),
        ));
    }
    if m.mode() & 0o022 != 0 && m.mode() & STICKY == 0 {
        return Err(untrusted(
            d,
            format!(
                "a directory on the way that other users can write (mode {:o}) and that \
                 is not sticky",
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Checks `p` (no symlink followed): owned by us or root, writable by
/// nobody else.
fn check_private(p: &Path, m: &std::fs::Metadata, me: u32) -> Result<(), ImageError> {
    if m.file_type().is_symlink() {
        if !trusted_owner(m.uid(), me) {
            return Err(untrusted(
                p,
                format!("a symbolic link owned by user {}", m.uid()),
            ));
        }
        return Ok(());
    }
    if !trusted_owner(m.uid(), me) {
        return Err(untrusted(p, format!("owned by user {}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(untrusted(
            p,
            format!("writable by other users (mode {:o})", m.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// Refuses to read the image or images directory `dir` unless nobody but
/// us (or root) could have written any of it: the directories on the way
/// to it, it, and everything in it.
pub fn check_trusted(dir: &Path) -> Result<(), ImageError> {
    // SAFETY: plain syscall.
    let me = unsafe { libc::geteuid() };
    check_way(dir, me)?;
    let mut todo = vec![absolute(dir)?];
    let mut seen = 0usize;
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(io(&p, "reading"))?;
        check_private(&p, &m, me)?;
        if m.file_type().is_symlink() {
            // Followed where read; what it points to is checked as such.
            let to = std::fs::canonicalize(&p).map_err(io(&p, "resolving"))?;
            if let Some(parent) = to.parent() {
                check_dirs_to(parent, me)?;
            }
            let tm = std::fs::metadata(&to).map_err(io(&to, "reading"))?;
            check_private(&to, &tm, me)?;
            if tm.is_dir() {
                todo.push(to);
            }
            continue;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(io(&p, "listing"))? {
                let e = e.map_err(io(&p, "listing"))?;
                seen += 1;
                if seen > ENTRIES_CAP {
                    return Err(untrusted(dir, format!("more than {ENTRIES_CAP} entries")));
                }
                todo.push(e.path());
            }
        }
    }
    Ok(())
}

/// Refuses to write images into `dir` (it may not exist yet) when another
/// user owns or can write it or a directory on the way to it.
pub fn check_destination(dir: &Path) -> Result<(), ImageError> {
    // SAFETY: plain syscall.
    let me = unsafe { libc::geteuid() };
    check_way(dir, me)?;
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            let m = if m.file_type().is_symlink() {
                check_private(dir, &m, me)?;
                let to = std::fs::canonicalize(dir).map_err(io(dir, "resolving"))?;
                if let Some(parent) = to.parent() {
                    check_dirs_to(parent, me)?;
                }
                std::fs::metadata(&to).map_err(io(&to, "reading"))?
            } else {
                m
            };
            check_private(dir, &m, me)
        }
        Err(_) => Ok(()),
    }
}

/// Creates directory `dir` and any missing parents, private to us
/// (`0700`).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates (or truncates) file `path`, private to us (`0600`).
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        // Below a directory of ours: /tmp is sticky, which is accepted.
        let d = std::env::temp_dir().join(format!("cr-ebpf-trust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        create_private_dir(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn images_are_created_private_and_checked() {
        let d = scratch("ok");
        let img = d.join("img/ckpt-000001");
        create_private_dir(&img).unwrap();
        drop(create_private_file(&img.join("manifest.img")).unwrap());
        assert_eq!(mode(&d.join("img")), 0o700);
        assert_eq!(mode(&img.join("manifest.img")), 0o600);
        check_trusted(&d.join("img")).unwrap();
        check_destination(&d.join("img")).unwrap();
        check_destination(&d.join("new/below")).unwrap();

        // A file others can write: refused, naming it.
        std::fs::set_permissions(
            img.join("manifest.img"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let err = check_trusted(&d.join("img")).unwrap_err().to_string();
        assert!(
            err.contains("manifest.img") && err.contains("writable by other users"),
            "{err}"
        );
        std::fs::set_permissions(
            img.join("manifest.img"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        check_trusted(&d.join("img")).unwrap();

        // A directory on the way others can write, not sticky.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_trusted(&d.join("img")).unwrap_err().to_string();
        assert!(err.contains("not sticky"), "{err}");
        let err = check_destination(&d.join("img")).unwrap_err().to_string();
        assert!(err.contains("not sticky"), "{err}");
        // Sticky, as /tmp: accepted.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_trusted(&d.join("img")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn what_another_user_owns_is_refused() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "needs root to make files of another user"
            );
            eprintln!("skipped: needs root");
            return;
        }
        let d = scratch("other");
        let img = d.join("img");
        create_private_dir(&img).unwrap();
        drop(create_private_file(&img.join("pages.img")).unwrap());
        std::os::unix::fs::chown(img.join("pages.img"), Some(4321), None).unwrap();
        let err = check_trusted(&img).unwrap_err().to_string();
        assert!(err.contains("owned by user 4321"), "{err}");
        std::os::unix::fs::chown(img.join("pages.img"), Some(0), None).unwrap();
        // A symlink another user planted on the way.
        std::os::unix::fs::symlink(&img, d.join("link")).unwrap();
        std::os::unix::fs::lchown(d.join("link"), Some(4321), None).unwrap();
        let err = check_trusted(&d.join("link")).unwrap_err().to_string();
        assert!(err.contains("symbolic link owned by user 4321"), "{err}");
        let err = check_destination(&d.join("link/sub"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("owned by user 4321"), "{err}");
        // A destination directory another user owns.
        std::os::unix::fs::chown(&img, Some(4321), None).unwrap();
        let err = check_destination(&img).unwrap_err().to_string();
        assert!(err.contains("owned by user 4321"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
