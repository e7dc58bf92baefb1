//! Deleted files a process still holds open or mapped ("ghost" files): a
//! regular file or a directory removed from its directory (`unlink`,
//! `rmdir`, or made with `O_TMPFILE`) whose last link is gone, or a
//! symbolic link held by an `O_PATH` descriptor of the link itself (its
//! target stored as its contents, made again with `symlink`).
//!
//! Saving: the file's contents (only its data runs, `SEEK_DATA` and
//! `SEEK_HOLE`, so holes stay holes), size, permissions, owner and times
//! are stored as a shared memory object of kind
//! [`ShmemKind::DeletedFile`], once per checkpoint, which descriptors
//! (`fd::deleted`) and mappings name by its id. A file with more
//! allocated bytes than the limit (`dump --ghost-limit`) is refused. A
//! deleted file that still has another link is refused too: the process
//! could see that link.
//!
//! Restoring: the file is made again at the path it had, with missing
//! parent directories made for the moment and anything now at the path
//! moved aside for the moment; filled, given its owner, permissions and
//! times, opened by the restorer, and removed again. So the restored
//! process's descriptors and mappings, reopened from that open file, show
//! `PATH (deleted)` and the same contents.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use std::{collections::HashMap, os::fd::AsFd as _};

use cr_ebpf_image::{Manifest, ShmemKind, ShmemObject, GHOST_CAP};

use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// The default limit on the bytes a deleted file has allocated.
pub const DEFAULT_LIMIT: u64 = 64 << 20;

/// Longest run of contents stored in one piece.
const RUN_CAP: usize = 4 << 20;

const SUFFIX: &str = " (deleted)";

/// `PATH` of `PATH (deleted)`.
pub fn deleted_path(link: &str) -> Option<&str> {
    link.strip_suffix(SUFFIX).filter(|p| p.starts_with('/'))
}

/// Why the deleted file `link` (`meta` from a `stat` through the link)
/// cannot be stored as a ghost, or `None` when it can.
pub fn refusal(link: &str, meta: &std::fs::Metadata) -> Option<String> {
    let ty = meta.mode() & libc::S_IFMT;
    if ty != libc::S_IFREG && ty != libc::S_IFDIR && ty != libc::S_IFLNK {
        return Some(format!("deleted file {link} (of mode {:#o})", meta.mode()));
    }
    if meta.nlink() > 0 && other_link(link, meta).is_none() {
        return Some(format!(
            "deleted file {link} that still has {} other link(s), none of them in its \
             directory",
            meta.nlink()
        ));
    }
    None
}

/// Another name, in the directory it was in, of the deleted regular file
/// `link` (`PATH (deleted)`, `meta` from a `stat` through it): the same
/// device and inode.
pub fn other_link(link: &str, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::DirEntryExt as _;
    if meta.nlink() == 0 || !meta.is_file() {
        return None;
    }
    let dir = Path::new(deleted_path(link)?).parent()?;
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.ino() == meta.ino())
        .map(|e| e.path())
        .find(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.is_file() && m.ino() == meta.ino() && m.dev() == meta.dev())
        })
        .map(|p| p.display().to_string())
}

/// The data runs `(offset, length)` of `f` within `0..size`
/// (`SEEK_DATA`/`SEEK_HOLE`): what is allocated, holes left out.
pub fn data_runs(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        if end > data as u64 {
            out.push((data as u64, end - data as u64));
        }
        at = end.max(data as u64 + 1);
    }
    Ok(out)
}

/// The data runs of `f` within `0..size`, read, cut in pieces of at most
/// `piece` bytes.
pub fn read_runs(f: &File, size: u64, piece: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    for (start, len) in data_runs(f, size)? {
        let end = start + len;
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(piece);
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, off)?;
            out.push((off, buf));
            off += n as u64;
        }
    }
    Ok(out)
}

/// The deleted file behind `path` (a `/proc/PID/fd/N` or
/// `/proc/PID/map_files/…` link), which had the path `name`; its contents
/// only if `with_data` (else another process of the same checkpoint
/// stores them). At most `limit` allocated bytes.
pub fn object(
    pid: i32,
    path: &str,
    name: &str,
    with_data: bool,
    limit: u64,
) -> Result<ShmemObject, SaveError> {
    if let Some(meta) = std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_symlink())
    {
        if let Some(why) = refusal(&format!("{name}{SUFFIX}"), &meta) {
            return Err(SaveError::NotSupported { pid, what: why });
        }
        return crate::ghost_link::object(pid, path, name, with_data);
    }
    let f = File::open(path).map_err(proc_err(pid, path.to_string()))?;
    let meta = f.metadata().map_err(proc_err(pid, path.to_string()))?;
    let refuse = |what: String| SaveError::NotSupported { pid, what };
    if let Some(why) = refusal(&format!("{name}{SUFFIX}"), &meta) {
        return Err(refuse(why));
    }
    let common = ShmemObject {
        id: meta.ino(),
        kind: ShmemKind::DeletedFile,
        name: name.to_string(),
        mode: meta.mode(),
        elsewhere: !with_data,
        uid: meta.uid(),
        gid: meta.gid(),
        atime_ns: (meta.atime() as u64) * 1_000_000_000 + meta.atime_nsec() as u64,
        mtime_ns: (meta.mtime() as u64) * 1_000_000_000 + meta.mtime_nsec() as u64,
        ..ShmemObject::default()
    };
    // Still linked elsewhere: found again through that link, like a file.
    if let Some(link) = other_link(&format!("{name}{SUFFIX}"), &meta) {
        return Ok(ShmemObject {
            size: meta.size(),
            link,
            ..common
        });
    }
    let limit = limit.min(GHOST_CAP);
    let allocated = meta.blocks() * 512;
    let regular = meta.mode() & libc::S_IFMT == libc::S_IFREG;
    let too_big = |bytes: u64| {
        refuse(format!(
            "deleted file {name}{SUFFIX} with {bytes} bytes of contents (more than the \
             limit of {limit}; raise it with `dump --ghost-limit`)"
        ))
    };
    if regular && allocated > limit {
        return Err(too_big(allocated));
    }
    let data = if with_data && regular {
        read_runs(&f, meta.size(), RUN_CAP).map_err(proc_err(pid, path.to_string()))?
    } else {
        Vec::new()
    };
    let stored: u64 = data.iter().map(|(_, d)| d.len() as u64).sum();
    if stored > limit {
        return Err(too_big(stored));
    }
    Ok(ShmemObject {
        size: if regular { meta.size() } else { 0 },
        data,
        ..common
    })
}

fn fail(what: String) -> impl FnOnce(io::Error) -> RestoreError {
    move |err| RestoreError::Syscall { call: what, err }
}

/// What was changed on the file system to make a ghost, undone when
/// dropped: directories made (removed, deepest first), the ghost's own
/// name (removed), a file moved aside (put back).
#[derive(Default)]
struct Scaffold {
    dirs: Vec<PathBuf>,
    made: Option<(PathBuf, bool)>,
    aside: Option<(PathBuf, PathBuf)>,
}

impl Drop for Scaffold {
    fn drop(&mut self) {
        if let Some((p, dir)) = self.made.take() {
            let _ = if dir {
                std::fs::remove_dir(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        if let Some((p, aside)) = self.aside.take() {
            let _ = std::fs::rename(aside, p);
        }
        for d in self.dirs.drain(..).rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Scaffold {
    /// Makes the missing parents of `p`, and moves anything at `p` aside.
    fn prepare(&mut self, p: &Path) -> Result<(), RestoreError> {
        let mut missing = Vec::new();
        let mut at = p.parent();
        while let Some(d) = at {
            if std::fs::symlink_metadata(d).is_ok() {
                break;
            }
            missing.push(d.to_path_buf());
            at = d.parent();
        }
        for d in missing.into_iter().rev() {
            std::fs::create_dir(&d).map_err(fail(format!(
                "making {} (a directory of a deleted file)",
                d.display()
            )))?;
            self.dirs.push(d);
        }
        if std::fs::symlink_metadata(p).is_ok() {
            let aside = aside_name(p);
            std::fs::rename(p, &aside).map_err(fail(format!(
                "moving {} aside to make the deleted file of that name",
                p.display()
            )))?;
            self.aside = Some((p.to_path_buf(), aside));
        }
        Ok(())
    }
}

/// A name next to `p` that nothing uses.
fn aside_name(p: &Path) -> PathBuf {
    let name = p
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    (0..)
        .map(|n| p.with_file_name(format!(".{name}.cr-ebpf-aside.{}.{n}", std::process::id())))
        .find(|c| std::fs::symlink_metadata(c).is_err())
        .expect("some name is free")
}

/// `futimens` with nanosecond times.
fn set_times(fd: &OwnedFd, atime_ns: u64, mtime_ns: u64) -> io::Result<()> {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let times = [ts(atime_ns), ts(mtime_ns)];
    // SAFETY: two timespecs on our own descriptor.
    if unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a file at `p` for a moment: missing parent directories made and
/// anything at `p` moved aside first; `make` creates it (a directory if
/// `dir`) and opens it; then it is removed again, the rest undone, and the
/// open file returned.
pub(crate) fn transient(
    p: &Path,
    dir: bool,
    make: impl FnOnce(&Path) -> Result<OwnedFd, RestoreError>,
) -> Result<OwnedFd, RestoreError> {
    let mut scaffold = Scaffold::default();
    scaffold.prepare(p)?;
    // Nothing is at `p` now: whatever `make` leaves there is removed.
    scaffold.made = Some((p.to_path_buf(), dir));
    let fd = make(p)?;
    let (made, _) = scaffold.made.take().expect("set above");
    let removed = if dir {
        std::fs::remove_dir(&made)
    } else {
        std::fs::remove_file(&made)
    };
    removed.map_err(fail(format!("removing {} again", made.display())))?;
    drop(scaffold);
    Ok(fd)
}

/// `fchown`, then `fchmod` (a chown drops set-user-id) of our `fd`.
pub(crate) fn set_owner_mode(fd: &OwnedFd, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: fchown on our own descriptor.
    if unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fchmod on our own descriptor.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode & 0o7777) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the deleted file `o` again: at its path, filled, with its owner,
/// permissions and times, opened (read-write, or a directory read-only),
/// and removed. The open file is the one the process's descriptors and
/// mappings are made from.
pub fn make(o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    if !o.link.is_empty() {
        return relink(o);
    }
    if o.mode & libc::S_IFMT == libc::S_IFLNK {
        return transient(Path::new(&o.name), false, |p| {
            crate::ghost_link::make_at(p, o)
        });
    }
    let dir = o.mode & libc::S_IFMT == libc::S_IFDIR;
    let what = |w: &str| format!("{w} {} (a deleted file made again)", o.name);
    transient(Path::new(&o.name), dir, |p| {
        let fd = if dir {
            std::fs::create_dir(p).map_err(fail(what("mkdir")))?;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(p)
                .map_err(fail(what("opening")))?
        } else {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(p)
                .map_err(fail(what("creating")))?;
            for (off, bytes) in &o.data {
                f.write_all_at(bytes, *off).map_err(fail(what("writing")))?;
            }
            f.set_len(o.size).map_err(fail(what("ftruncate")))?;
            f
        };
        let fd = OwnedFd::from(fd);
        set_owner_mode(&fd, o.uid, o.gid, o.mode).map_err(fail(what("fchown/fchmod")))?;
        set_times(&fd, o.atime_ns, o.mtime_ns).map_err(fail(what("futimens")))?;
        Ok(fd)
    })
}

/// The deleted file `o` that still has the link `o.link`: linked at its
/// old path again for a moment, opened there, and removed. The link must
/// still be the same file (inode), as a file reopened by path must.
fn relink(o: &ShmemObject) -> Result<OwnedFd, RestoreError> {
    let same = std::fs::symlink_metadata(&o.link).is_ok_and(|m| m.is_file() && m.ino() == o.id);
    if !same {
        return Err(RestoreError::File {
            path: o.link.clone(),
            what: format!(
                "(the other link of the deleted file {}) is gone or another file now",
                o.name
            ),
        });
    }
    transient(Path::new(&o.name), false, |p| {
        std::fs::hard_link(&o.link, p).map_err(fail(format!(
            "linking {} at {} (a deleted file)",
            o.link,
            p.display()
        )))?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(p)
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                    .open(p)
            })
            .map(OwnedFd::from)
            .map_err(fail(format!("opening {} (a deleted file)", p.display())))
    })
}

/// Enters the process's working directory if it was removed: the deleted
/// directory of that path the restorer made (`built`, by id), handed over
/// and entered with `fchdir`.
pub fn enter_cwd(
    sys: &dyn Sys,
    m: &Manifest,
    built: &HashMap<u64, OwnedFd>,
) -> Result<(), RestoreError> {
    let Some(name) = deleted_path(&m.process.cwd) else {
        return Ok(());
    };
    let mut dirs = m.shmem.iter().filter(|o| {
        o.kind == ShmemKind::DeletedFile && o.name == name && o.mode & libc::S_IFMT == libc::S_IFDIR
    });
    let (Some(o), None) = (dirs.next(), dirs.next()) else {
        return Err(RestoreError::NotSupported(format!(
            "the removed working directory {name}: not exactly one deleted directory of              that path in the image"
        )));
    };
    let ours = built.get(&o.id).ok_or_else(|| {
        RestoreError::NotSupported(format!("the removed working directory {name} was not made"))
    })?;
    let fd = sys.adopt(ours.as_fd())?;
    let r = sys.call("fchdir", libc::SYS_fchdir, [fd as u64, 0, 0, 0, 0, 0]);
    sys.close(fd)?;
    r.map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_sparse_deleted_file_round_trips_with_its_holes_owner_and_times() {
        let dir = testing::scratch("ghost");
        let path = dir.join("data");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (8 << 20) - 4).unwrap();
        f.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let fd = OwnedFd::from(f.try_clone().unwrap());
        set_times(&fd, 1_000_000_123, 2_000_000_456).unwrap();
        std::fs::remove_file(&path).unwrap();
        let pid = std::process::id() as i32;
        let link = format!("/proc/self/fd/{}", f.as_raw_fd());
        let name = path.display().to_string();
        let o = object(pid, &link, &name, true, DEFAULT_LIMIT).unwrap();
        assert_eq!(
            (o.size, o.mode & 0o7777, o.mtime_ns),
            (8 << 20, 0o640, 2_000_000_456)
        );
        let stored: usize = o.data.iter().map(|(_, d)| d.len()).sum();
        assert!(stored < 1 << 20, "holes are not stored ({stored} bytes)");

        // Something else took its name meanwhile: moved aside for a moment.
        std::fs::write(&path, b"new file").unwrap();
        let back = File::from(make(&o).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"new file");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", back.as_raw_fd())).unwrap();
        assert_eq!(link.display().to_string(), format!("{name} (deleted)"));
        let meta = back.metadata().unwrap();
        assert_eq!((meta.len(), meta.nlink()), (8 << 20, 0));
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (2, 456));
        assert_eq!((meta.atime(), meta.atime_nsec()), (1, 123));
        let mut buf = [0u8; 4];
        back.read_exact_at(&mut buf, (8 << 20) - 4).unwrap();
        assert_eq!(&buf, b"tail");
        // The hole in the middle is a hole again.
        // SAFETY: lseek on our descriptor.
        let hole = unsafe { libc::lseek(back.as_raw_fd(), 0, libc::SEEK_HOLE) };
        assert!(hole > 0 && hole < 8 << 20, "hole at {hole}");
        assert!(
            std::fs::read_dir(&*dir).unwrap().count() == 1,
            "nothing left over"
        );

        // Over the limit: refused, naming the option.
        let err = object(
            pid,
            &format!("/proc/self/fd/{}", f.as_raw_fd()),
            &name,
            true,
            4096,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--ghost-limit"), "{err}");
    }

    #[test]
    fn a_removed_directory_is_made_again_with_its_removed_parents() {
        let dir = testing::scratch("ghost-dir");
        let sub = dir.join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o711)).unwrap();
        let d = File::open(&sub).unwrap();
        std::fs::remove_dir(&sub).unwrap();
        std::fs::remove_dir(dir.join("a")).unwrap();
        let pid = std::process::id() as i32;
        let name = sub.display().to_string();
        let o = object(
            pid,
            &format!("/proc/self/fd/{}", d.as_raw_fd()),
            &name,
            true,
            0,
        )
        .unwrap();
        assert_eq!(o.mode & libc::S_IFMT, libc::S_IFDIR);
        let back = make(&o).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", back.as_raw_fd())).unwrap();
        assert_eq!(link.display().to_string(), format!("{name} (deleted)"));
        assert!(!dir.join("a").exists(), "the parents made are gone again");
        let meta = File::from(back).metadata().unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o711);
    }

    #[test]
    fn a_deleted_file_with_another_link_comes_back_through_it() {
        let dir = testing::scratch("ghost-link");
        let path = dir.join("one");
        let other = dir.join("two");
        std::fs::write(&path, b"x").unwrap();
        std::fs::hard_link(&path, &other).unwrap();
        let f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let name = path.display().to_string();
        let link = format!("{name} (deleted)");
        let meta = f.metadata().unwrap();
        assert_eq!(refusal(&link, &meta), None);
        assert_eq!(other_link(&link, &meta), Some(other.display().to_string()));
        let pid = std::process::id() as i32;
        let o = object(
            pid,
            &format!("/proc/self/fd/{}", f.as_raw_fd()),
            &name,
            true,
            0,
        )
        .unwrap();
        assert_eq!(o.link, other.display().to_string());
        assert!(o.data.is_empty(), "the contents stay in the file");
        let back = make(&o).unwrap();
        let l = std::fs::read_link(format!("/proc/self/fd/{}", back.as_raw_fd())).unwrap();
        assert_eq!(l.display().to_string(), link);
        let m = File::from(back).metadata().unwrap();
        assert_eq!((m.ino(), m.nlink()), (meta.ino(), 1));
        assert!(!path.exists());

        // The other link replaced: an error, not another file.
        std::fs::remove_file(&other).unwrap();
        std::fs::write(&other, b"x").unwrap();
        assert!(make(&o).is_err());
        // Not in its directory: refused.
        std::fs::remove_file(&other).unwrap();
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let g = File::create(dir.join("three")).unwrap();
        std::fs::hard_link(dir.join("three"), sub.join("four")).unwrap();
        std::fs::remove_file(dir.join("three")).unwrap();
        let link = format!("{} (deleted)", dir.join("three").display());
        let why = refusal(&link, &g.metadata().unwrap()).unwrap();
        assert!(
            why.contains("1 other link(s), none of them in its directory"),
            "{why}"
        );
    }

    #[test]
    fn a_removed_working_directory_is_entered_from_its_deleted_directory() {
        let dir = testing::scratch("ghost-cwd");
        let o = ShmemObject {
            id: 7,
            kind: ShmemKind::DeletedFile,
            name: dir.join("gone").display().to_string(),
            mode: libc::S_IFDIR | 0o700,
            ..ShmemObject::default()
        };
        let mut m = Manifest::default();
        m.process.cwd = format!("{} (deleted)", o.name);
        m.shmem.push(o.clone());
        let mut built = HashMap::new();
        built.insert(7, make(&o).unwrap());
        let rec = crate::sys::fake::Recording::new();
        enter_cwd(&rec, &m, &built).unwrap();
        assert_eq!(rec.names(), ["adopt", "fchdir", "close"]);
        assert_eq!(rec.adopted().len(), 1);
        // Without its directory: an error, not a guess.
        m.shmem.clear();
        assert!(enter_cwd(&rec, &m, &built).is_err());
        // A working directory that exists is entered by path, elsewhere.
        m.process.cwd = "/tmp".into();
        let rec = crate::sys::fake::Recording::new();
        enter_cwd(&rec, &m, &built).unwrap();
        assert!(rec.names().is_empty());
    }
}
