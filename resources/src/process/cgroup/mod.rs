//! Control group membership. The process's cgroup in every hierarchy (v1
//! controllers, named v1 hierarchies, v2) is recorded as `/proc/PID/cgroup`
//! shows it, and so is that of each thread in another one (v1 lets threads
//! of a process live apart, v2 threaded cgroups too). So are the cgroup
//! directories themselves ([`dirs`]): owners, modes, controller settings
//! and the cgroups below. At restore each stub is put into the same
//! cgroups before it runs anything of the process's own ([`Placement`]):
//! directories that are missing are created with what was recorded of
//! them, and so are missing ones that were below them.
//! `restore --cgroup-root [CONTROLLER:]PATH` moves the recorded tree: the
//! root process's cgroup becomes PATH, the others keep their place below it.
//!
//! A cgroup namespace of its own stays refused (`namespaces.rs`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use cr_ebpf_image::{Cgroup, ProcessInfo};

pub mod dirs;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// Cgroup membership (v1 hierarchies and v2).
pub struct Cgroups;

/// The hierarchies of a `/proc/PID/cgroup` text (`ID:CONTROLLERS:PATH`).
pub fn parse(text: &str) -> Option<Vec<Cgroup>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            path.starts_with('/').then(|| Cgroup {
                controllers: controllers.to_string(),
                path: path.to_string(),
            })
        })
        .collect()
}

impl ProcessKind for Cgroups {
    fn name(&self) -> &'static str {
        "cgroups"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let r = match cx.cgroups.take() {
            Some(read) => read?,
            None => record(cx.pid)?,
        };
        p.cgroup_dirs = r.dirs;
        p.membership.cgroups = r.cgroups;
        p.membership.thread_cgroups = r.threads;
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // The engine puts each stub into its cgroups as it is made
        // (`Placement::enter`), before it makes children of its own.
        Ok(())
    }
}

/// What [`Cgroups`] records of a process. All of it is read from `/proc`
/// and the cgroup file systems, nothing asked of the process: a checkpoint
/// reads it on a thread of its own while it collects the rest of the frozen
/// process ([`SaveCx::cgroups`]).
#[derive(Debug)]
pub struct Recorded {
    cgroups: Vec<Cgroup>,
    threads: Vec<(i32, Cgroup)>,
    dirs: Vec<cr_ebpf_image::CgroupDir>,
}

/// The cgroups of process `pid` and of its threads that live apart, and
/// the cgroup directories ([`dirs::record`]).
pub fn record(pid: i32) -> Result<Recorded, SaveError> {
    let refuse = |what: String| SaveError::NotSupported { pid, what };
    let read = |path: String| {
        let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path.clone()))?;
        parse(&text).ok_or_else(|| refuse(format!("an unreadable {path}: {text:?}")))
    };
    let own = read(format!("/proc/{pid}/cgroup"))?;
    let mut threads = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for e in std::fs::read_dir(&dir).map_err(proc_err(pid, dir.clone()))? {
        let e = e.map_err(proc_err(pid, dir.clone()))?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if tid == pid {
            continue;
        }
        for c in read(format!("{dir}/{tid}/cgroup"))? {
            if !own.contains(&c) {
                threads.push((tid, c));
            }
        }
    }
    let mut ms = our_mounts();
    let mut mounted = Mounted::default();
    for c in own.iter().chain(threads.iter().map(|(_, c)| c)) {
        if mount_of(&ms, &c.controllers).is_none() {
            let m = mount_hierarchy(&c.controllers).map_err(|e| refuse(e.to_string()))?;
            mounted.0.push(m.dir.clone());
            ms.push(m);
        }
    }
    let ours = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| parse(&t))
        .unwrap_or_default();
    let all: Vec<&Cgroup> = own.iter().chain(threads.iter().map(|(_, c)| c)).collect();
    let dirs = dirs::record(&all, &ms, &ours).map_err(refuse)?;
    drop(mounted);
    Ok(Recorded {
        cgroups: own,
        threads,
        dirs,
    })
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Its controllers as `/proc/PID/cgroup` names them (empty: v2).
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub dir: PathBuf,
    /// The cgroup at that mount point (the mount's root).
    pub root: String,
}

/// The cgroup mounts of a `/proc/self/mountinfo` text.
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split_whitespace().collect();
        let r: Vec<&str> = right.split_whitespace().collect();
        let (Some(root), Some(dir), Some(fstype)) = (l.get(3), l.get(4), r.first()) else {
            continue;
        };
        let controllers = match *fstype {
            "cgroup2" => Vec::new(),
            "cgroup" => r
                .get(2)
                .unwrap_or(&"")
                .split(',')
                .map(str::to_string)
                .collect(),
            _ => continue,
        };
        out.push(Mount {
            controllers,
            dir: PathBuf::from(unescape(dir)),
            root: unescape(root),
        });
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount of the hierarchy whose controllers are `controllers` (as a
/// `/proc/PID/cgroup` line names them).
fn mount_of<'a>(ms: &'a [Mount], controllers: &str) -> Option<&'a Mount> {
    if controllers.is_empty() {
        return ms.iter().find(|m| m.controllers.is_empty());
    }
    ms.iter().find(|m| {
        !m.controllers.is_empty()
            && controllers
                .split(',')
                .all(|c| m.controllers.iter().any(|o| o == c))
    })
}

/// `restore --cgroup-root [CONTROLLER:]PATH`: where the root process's
/// cgroup goes, in the hierarchy of CONTROLLER (`cgroup2` for v2) or, with
/// none, in every hierarchy not named otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoot {
    /// A controller of the hierarchy (`cpu`, `name=systemd`, `cgroup2`).
    pub controller: Option<String>,
    /// The new root (absolute).
    pub path: String,
}

impl std::str::FromStr for NewRoot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (controller, path) = match s.split_once(":/") {
            Some((c, p)) if !c.is_empty() => (Some(c.to_string()), format!("/{p}")),
            _ => (None, s.to_string()),
        };
        if !path.starts_with('/') {
            return Err(format!("{s:?}: the cgroup root must be an absolute path"));
        }
        Ok(Self { controller, path })
    }
}

/// The new root for hierarchy `controllers` among `roots`.
fn new_root<'a>(roots: &'a [NewRoot], controllers: &str) -> Option<&'a str> {
    let named = |c: &str| {
        if controllers.is_empty() {
            c == "cgroup2"
        } else {
            controllers.split(',').any(|x| x == c)
        }
    };
    roots
        .iter()
        .find(|r| r.controller.as_deref().is_some_and(named))
        .or_else(|| roots.iter().find(|r| r.controller.is_none()))
        .map(|r| r.path.as_str())
}

/// `path` with the prefix `old` replaced by `new`.
fn rebase(path: &str, old: &str, new: &str) -> Option<String> {
    let rest = if old == "/" {
        path
    } else {
        path.strip_prefix(old)
            .filter(|r| r.is_empty() || r.starts_with('/'))?
    };
    let joined = format!(
        "{}/{}",
        new.trim_end_matches('/'),
        rest.trim_start_matches('/')
    );
    Some(match joined.trim_end_matches('/') {
        "" => "/".to_string(),
        j => j.to_string(),
    })
}

/// One cgroup a process or thread goes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its directory.
    pub dir: PathBuf,
    /// Whether it is in the v2 hierarchy.
    pub v2: bool,
    /// Its path in the hierarchy, and the hierarchy's controllers (to
    /// compare with where the stub is).
    pub path: String,
    /// The hierarchy's controllers.
    pub controllers: String,
}

/// Where every process and thread of a restore goes, directories made.
#[derive(Debug, Default)]
pub struct Placement {
    processes: HashMap<i32, Vec<Target>>,
    threads: HashMap<i32, Vec<Target>>,
    /// Hierarchies mounted for the restore (none was mounted here),
    /// unmounted when it is done.
    mounted: Mounted,
    /// Cgroups that were gone and were made again (with what was recorded
    /// of them), as `CONTROLLERS:PATH`.
    pub made: Vec<String>,
}

/// Hierarchies mounted for a dump or restore, unmounted when dropped.
#[derive(Debug, Default)]
struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: a NUL-terminated path; plain syscall.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Mounts the hierarchy `controllers` (none was mounted) in a new
/// directory.
fn mount_hierarchy(controllers: &str) -> Result<Mount, RestoreError> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "cr-ebpf-cgroup-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let fail = |err: std::io::Error| {
        RestoreError::NotSupported(format!(
            "the cgroup hierarchy {} is not mounted here, and mounting it at {} failed \
             ({err}); mount it",
            hierarchy_name(controllers),
            dir.display()
        ))
    };
    std::fs::create_dir(&dir).map_err(fail)?;
    let (fstype, opts) = match controllers {
        "" => (c"cgroup2", String::new()),
        c if c.starts_with("name=") => (c"cgroup", format!("none,{c}")),
        c => (c"cgroup", c.to_string()),
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
    let data =
        std::ffi::CString::new(opts).map_err(|_| fail(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: NUL-terminated strings; plain syscall.
    let r = unsafe {
        libc::mount(
            c"cgroup".as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        let _ = std::fs::remove_dir(&dir);
        return Err(fail(err));
    }
    Ok(Mount {
        controllers: if controllers.is_empty() {
            Vec::new()
        } else {
            controllers.split(',').map(str::to_string).collect()
        },
        dir,
        root: "/".into(),
    })
}

impl Placement {
    /// The cgroups of the processes `ps` (the tree's root first), moved
    /// by `roots`, in the hierarchies mounted as `ms`; their directories
    /// are created.
    pub fn plan(
        ps: &[&ProcessInfo],
        roots: &[NewRoot],
        ms: &[Mount],
    ) -> Result<Self, RestoreError> {
        let mut out = Self::default();
        let Some(root) = ps.first() else {
            return Ok(out);
        };
        let mut ms = ms.to_vec();
        let all = ps.iter().flat_map(|p| {
            let m = &p.membership;
            m.cgroups
                .iter()
                .chain(m.thread_cgroups.iter().map(|(_, c)| c))
        });
        for c in all {
            if mount_of(&ms, &c.controllers).is_none() {
                let m = mount_hierarchy(&c.controllers)?;
                out.mounted.0.push(m.dir.clone());
                ms.push(m);
            }
        }
        let ms = &ms;
        let target = |c: &Cgroup| -> Result<Target, RestoreError> {
            let m = mount_of(ms, &c.controllers).ok_or_else(|| {
                RestoreError::NotSupported(format!(
                    "cgroup {} of hierarchy {}, which is not mounted here",
                    c.path,
                    hierarchy_name(&c.controllers)
                ))
            })?;
            let path = match new_root(roots, &c.controllers) {
                None => c.path.clone(),
                Some(new) => {
                    let old = root
                        .membership
                        .cgroups
                        .iter()
                        .find(|r| r.controllers == c.controllers)
                        .map_or("/", |r| r.path.as_str());
                    rebase(&c.path, old, new).ok_or_else(|| {
                        RestoreError::NotSupported(format!(
                            "cgroup {} of hierarchy {} is not below the root process's {old}: \
                             --cgroup-root cannot move it",
                            c.path,
                            hierarchy_name(&c.controllers)
                        ))
                    })?
                }
            };
            let below = rebase(&path, &m.root, "/").ok_or_else(|| {
                RestoreError::NotSupported(format!(
                    "cgroup {path} of hierarchy {} is outside its mount at {} (root {})",
                    hierarchy_name(&c.controllers),
                    m.dir.display(),
                    m.root
                ))
            })?;
            Ok(Target {
                dir: m.dir.join(below.trim_start_matches('/')),
                v2: m.controllers.is_empty(),
                path,
                controllers: c.controllers.clone(),
            })
        };
        for p in ps {
            let t = p
                .membership
                .cgroups
                .iter()
                .map(&target)
                .collect::<Result<Vec<_>, _>>()?;
            out.processes.insert(p.pid, t);
            for (tid, c) in &p.membership.thread_cgroups {
                out.threads.entry(*tid).or_default().push(target(c)?);
            }
        }
        let recorded = dirs::by_dir(ps.iter().flat_map(|p| &p.cgroup_dirs), |c| {
            target(c).ok().map(|t| (t.dir, t.path))
        });
        out.make_all(&recorded)?;
        out.made.sort();
        // A v2 cgroup of a thread apart from its process is a threaded
        // one (a new directory is a domain until told).
        for t in out.threads.values().flatten().filter(|t| t.v2) {
            let file = t.dir.join("cgroup.type");
            if std::fs::read_to_string(&file).is_ok_and(|v| v.trim() == "domain") {
                std::fs::write(&file, "threaded").map_err(|err| RestoreError::Cgroup {
                    who: "a threaded cgroup (cgroup.type)".into(),
                    dir: t.dir.display().to_string(),
                    err,
                })?;
            }
        }
        Ok(out)
    }

    /// Makes the missing directories of every target, then the missing
    /// recorded ones (parents first), each with what `recorded` holds of
    /// it; names each in `made`.
    fn make_all(&mut self, recorded: &dirs::Recorded<'_>) -> Result<(), RestoreError> {
        let mut made = Vec::new();
        for t in self
            .processes
            .values()
            .chain(self.threads.values())
            .flatten()
        {
            // Each directory made, the target's own and its parents made
            // with it.
            let n = make_dirs(&t.dir, &t.controllers, recorded)?;
            for path in Path::new(&t.path).ancestors().take(n) {
                made.push(format!(
                    "{}:{}",
                    hierarchy_name(&t.controllers),
                    path.display()
                ));
            }
        }
        for (dir, (rec, path)) in recorded {
            if !dir.exists() {
                let n = make_dirs(dir, &rec.controllers, recorded)?;
                for path in Path::new(path).ancestors().take(n) {
                    made.push(format!(
                        "{}:{}",
                        hierarchy_name(&rec.controllers),
                        path.display()
                    ));
                }
            }
        }
        for m in made {
            if !self.made.contains(&m) {
                self.made.push(m);
            }
        }
        Ok(())
    }

    /// Puts process `pid` (a stub not yet running anything of its own)
    /// into its cgroups, where it is not there already.
    pub fn enter(&self, pid: i32) -> Result<(), RestoreError> {
        let Some(ts) = self.processes.get(&pid) else {
            return Ok(());
        };
        let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| parse(&t))
            .unwrap_or_default();
        for t in ts {
            let here = now
                .iter()
                .any(|c| c.controllers == t.controllers && c.path == t.path);
            if !here {
                write_id(&t.dir.join("cgroup.procs"), pid, &format!("process {pid}"))?;
            }
        }
        Ok(())
    }

    /// Puts thread `tid`, just made, into the cgroups it was in apart
    /// from its process.
    pub fn enter_thread(&self, tid: i32) -> Result<(), RestoreError> {
        for t in self.threads.get(&tid).into_iter().flatten() {
            let file = if t.v2 { "cgroup.threads" } else { "tasks" };
            write_id(&t.dir.join(file), tid, &format!("thread {tid}"))?;
        }
        Ok(())
    }
}

fn hierarchy_name(controllers: &str) -> &str {
    if controllers.is_empty() {
        "cgroup2"
    } else {
        controllers
    }
}

fn write_id(file: &Path, id: i32, who: &str) -> Result<(), RestoreError> {
    std::fs::write(file, id.to_string()).map_err(|err| RestoreError::Cgroup {
        who: who.to_string(),
        dir: file
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        err,
    })
}

/// Creates cgroup directory `dir` of hierarchy `controllers` and its
/// missing parents, each with what `recorded` holds of it; a new cpuset
/// cgroup gets its parent's cpus and memory nodes first. Returns how many
/// it made.
fn make_dirs(
    dir: &Path,
    controllers: &str,
    recorded: &dirs::Recorded<'_>,
) -> Result<usize, RestoreError> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_path_buf());
        d = d.parent().unwrap_or(Path::new("/"));
    }
    let cpuset = controllers.split(',').any(|c| c == "cpuset");
    for dir in missing.iter().rev() {
        std::fs::create_dir(dir).map_err(|err| RestoreError::Cgroup {
            who: "a new cgroup directory".into(),
            dir: dir.display().to_string(),
            err,
        })?;
        if cpuset {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let parent = dir.parent().unwrap_or(Path::new("/"));
                let v = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                if !v.trim().is_empty() {
                    let _ = std::fs::write(dir.join(f), v.trim());
                }
            }
        }
        if let Some((rec, _)) = recorded.get(dir) {
            dirs::apply(dir, rec)?;
        }
    }
    Ok(missing.len())
}

/// The cgroup mounts of this machine, but the hierarchies a dump or
/// restore of this program mounted for itself ([`mount_hierarchy`]): those
/// go when it ends, under another one running at the same time.
pub fn our_mounts() -> Vec<Mount> {
    let ours = std::env::temp_dir().join(format!("cr-ebpf-cgroup-{}-", std::process::id()));
    let ours = ours.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| mounts(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !m.dir.to_string_lossy().starts_with(&ours))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    fn cg(controllers: &str, path: &str) -> Cgroup {
        Cgroup {
            controllers: controllers.into(),
            path: path.into(),
        }
    }

    #[test]
    fn the_cgroups_of_the_process_are_recorded_as_proc_shows_them() {
        let (p, q) = save_with(
            &Cgroups,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert_eq!(q.injected, 0);
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(p.membership.cgroups, parse(&text).unwrap());
        assert!(!p.membership.cgroups.is_empty());
        assert_eq!(
            parse("12:cpu,cpuacct:/a/b\n10:name=zdtmtst:/sub\n0::/user.slice\n").unwrap(),
            [
                cg("cpu,cpuacct", "/a/b"),
                cg("name=zdtmtst", "/sub"),
                cg("", "/user.slice")
            ]
        );
        assert!(parse("garbage\n").is_none());
    }

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 /sub /mnt/my\\040cg rw - cgroup cgroup rw,name=zdtmtst
";

    #[test]
    fn hierarchies_are_found_by_their_controllers() {
        let ms = mounts(MOUNTINFO);
        assert_eq!(ms.len(), 4);
        let dir = |c: &str| mount_of(&ms, c).map(|m| m.dir.clone());
        assert_eq!(dir(""), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(
            dir("cpu,cpuacct"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(dir("name=systemd"), Some("/sys/fs/cgroup/systemd".into()));
        assert_eq!(dir("name=zdtmtst"), Some("/mnt/my cg".into()));
        assert_eq!(ms[3].root, "/sub");
        assert_eq!(dir("memory"), None);
    }

    #[test]
    fn cgroup_root_moves_the_tree_below_the_new_root() {
        let r: NewRoot = "cpu:/new".parse().unwrap();
        assert_eq!(
            (r.controller.as_deref(), r.path.as_str()),
            (Some("cpu"), "/new")
        );
        let all: NewRoot = "/top".parse().unwrap();
        assert_eq!(all.controller, None);
        assert!("relative".parse::<NewRoot>().is_err());
        let roots = [r, all];
        assert_eq!(new_root(&roots, "cpu,cpuacct"), Some("/new"));
        assert_eq!(new_root(&roots, "name=zdtmtst"), Some("/top"));
        assert_eq!(new_root(&roots, ""), Some("/top"));
        assert_eq!(new_root(&roots[..1], "memory"), None);
        assert_eq!(rebase("/a/b/c", "/a/b", "/n").as_deref(), Some("/n/c"));
        assert_eq!(rebase("/a/b", "/a/b", "/n").as_deref(), Some("/n"));
        assert_eq!(rebase("/a/bc", "/a/b", "/n"), None);
        assert_eq!(rebase("/x", "/", "/n").as_deref(), Some("/n/x"));
        assert_eq!(rebase("/sub/x", "/sub", "/").as_deref(), Some("/x"));
        assert_eq!(rebase("/sub", "/sub", "/").as_deref(), Some("/"));
    }

    #[test]
    fn a_placement_makes_the_missing_directories_and_rebases_the_tree() {
        let base = std::env::temp_dir().join(format!("cr-ebpf-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let ms = [Mount {
            controllers: vec!["name=t".into()],
            dir: base.clone(),
            root: "/".into(),
        }];
        let mut root = ProcessInfo {
            pid: 10,
            ..Default::default()
        };
        root.membership.cgroups = vec![cg("name=t", "/app")];
        let mut child = ProcessInfo {
            pid: 11,
            ..Default::default()
        };
        child.membership.cgroups = vec![cg("name=t", "/app/worker")];
        child.membership.thread_cgroups = vec![(12, cg("name=t", "/app/worker/t"))];
        let roots = ["/moved/here".parse().unwrap()];
        let pl = Placement::plan(&[&root, &child], &roots, &ms).unwrap();
        assert_eq!(pl.processes[&10][0].dir, base.join("moved/here"));
        assert_eq!(pl.processes[&11][0].dir, base.join("moved/here/worker"));
        assert_eq!(pl.threads[&12][0].dir, base.join("moved/here/worker/t"));
        assert!(base.join("moved/here/worker/t").is_dir());
        assert_eq!(
            pl.made,
            [
                "name=t:/moved",
                "name=t:/moved/here",
                "name=t:/moved/here/worker",
                "name=t:/moved/here/worker/t"
            ],
            "every directory made, parents too, whatever the order processes come in"
        );
        // Without --cgroup-root, as recorded; an unmounted hierarchy is an error.
        let pl = Placement::plan(&[&child], &[], &ms).unwrap();
        assert_eq!(pl.processes[&11][0].dir, base.join("app/worker"));
        child
            .membership
            .cgroups
            .push(cg("no_such_controller", "/m"));
        let err = Placement::plan(&[&child], &[], &ms).unwrap_err();
        assert!(
            err.to_string()
                .contains("no_such_controller is not mounted here, and mounting it"),
            "{err}"
        );
        // A process the placement does not know is left where it is; a
        // write that fails names the cgroup.
        pl.enter(999_999).unwrap();
        let err = write_id(&base.join("none/cgroup.procs"), 1, "process 1").unwrap_err();
        assert!(err.to_string().contains("--cgroup-root"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
