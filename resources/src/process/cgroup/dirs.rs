//! What a cgroup directory holds besides its processes: its owner and
//! mode, those of its files, its controller settings and the cgroups below
//! it. A dump records them for every cgroup of the process below a
//! hierarchy's root (its parents too, and everything below it unless it
//! holds cr-ebpf itself); a restore that has to make a cgroup again gives
//! it back all of that, and makes again the cgroups that were below it.
//!
//! The settings carried are the controller files a user or a manager
//! writes ([`SETTINGS`], and the hugetlb limits of every page size);
//! counters, statistics and events are the kernel's and are not written.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use cr_ebpf_image::{Cgroup, CgroupDir, Owner};

use super::{hierarchy_name, mount_of, rebase, Mount};
use crate::RestoreError;

/// Most directories recorded for one process.
pub const DIRS_CAP: usize = 4096;

/// The settings a restore writes in a cgroup it makes, in this order
/// (cpuset's cpus and memory nodes first: a cpuset cgroup takes no
/// process without them; a memory limit before the memory+swap one).
pub const SETTINGS: &[&str] = &[
    "cgroup.subtree_control",
    "cgroup.type",
    "cgroup.max.depth",
    "cgroup.max.descendants",
    "cgroup.clone_children",
    "notify_on_release",
    "cpuset.cpus",
    "cpuset.mems",
    "cpuset.cpus.exclusive",
    "cpuset.cpus.partition",
    "cpuset.cpu_exclusive",
    "cpuset.mem_exclusive",
    "cpuset.mem_hardwall",
    "cpuset.memory_migrate",
    "cpuset.memory_spread_page",
    "cpuset.memory_spread_slab",
    "cpuset.sched_load_balance",
    "cpuset.sched_relax_domain_level",
    "cpu.shares",
    "cpu.cfs_period_us",
    "cpu.cfs_quota_us",
    "cpu.rt_period_us",
    "cpu.rt_runtime_us",
    "cpu.weight",
    "cpu.max",
    "cpu.max.burst",
    "cpu.idle",
    "cpu.uclamp.min",
    "cpu.uclamp.max",
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "memory.soft_limit_in_bytes",
    "memory.swappiness",
    "memory.move_charge_at_immigrate",
    "memory.oom_control",
    "memory.min",
    "memory.low",
    "memory.high",
    "memory.max",
    "memory.swap.high",
    "memory.swap.max",
    "memory.zswap.max",
    "memory.zswap.writeback",
    "memory.oom.group",
    "pids.max",
    "blkio.weight",
    "io.weight",
    "io.max",
    "io.latency",
    "net_cls.classid",
    "net_prio.ifpriomap",
    "devices.list",
    "rdma.max",
    "misc.max",
];

/// Whether file `name` of a cgroup is a setting a restore writes.
fn is_setting(name: &str) -> bool {
    SETTINGS.contains(&name)
        || (name.starts_with("hugetlb.")
            && (name.ends_with(".limit_in_bytes") || name.ends_with(".max")))
}

/// Mode bits and owner of `path`.
fn owner_of(path: &Path) -> std::io::Result<Owner> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(Owner {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
    })
}

/// One directory as it is now: `dir` in the file system, `path` in its
/// hierarchy.
fn read_dir_state(controllers: &str, path: &str, dir: &Path) -> std::io::Result<CgroupDir> {
    let mut files = Vec::new();
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        // A file gone since the listing (the cgroup is being removed) is
        // skipped like one that never was.
        if let Ok(o) = owner_of(&e.path()) {
            found.push(name.clone());
            files.push((name, o));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut settings: Vec<(String, String)> = Vec::new();
    let mut hugetlb: Vec<&String> = found.iter().filter(|n| n.starts_with("hugetlb.")).collect();
    hugetlb.sort();
    let ordered = SETTINGS
        .iter()
        .copied()
        .filter(|s| found.iter().any(|f| f == s))
        .chain(
            hugetlb
                .into_iter()
                .map(String::as_str)
                .filter(|n| is_setting(n)),
        );
    for name in ordered {
        // Some settings files of older interfaces fail to read on newer
        // kernels (EOPNOTSUPP): nothing is set there to carry.
        if let Ok(v) = std::fs::read_to_string(dir.join(name)) {
            settings.push((name.to_string(), v));
        }
    }
    Ok(CgroupDir {
        controllers: controllers.to_string(),
        path: path.to_string(),
        owner: owner_of(dir)?,
        files,
        settings,
    })
}

/// Whether cgroup `a` is `b` or one of its parents.
fn is_self_or_parent(a: &str, b: &str) -> bool {
    a == "/" || b == a || b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
}

/// The directories to record for cgroups `cgroups` (a process's and its
/// threads'), in the hierarchies mounted as `ms`; `ours` is cr-ebpf's own
/// cgroups (their subtrees are not walked). Parents come before their
/// children. `Err` names what is wrong, for a refusal.
pub fn record(
    cgroups: &[&Cgroup],
    ms: &[Mount],
    ours: &[Cgroup],
) -> Result<Vec<CgroupDir>, String> {
    let mut out: BTreeMap<(String, String), CgroupDir> = BTreeMap::new();
    for c in cgroups {
        let Some(m) = mount_of(ms, &c.controllers) else {
            // Not mounted here: nothing can be read, and a restore into
            // this hierarchy mounts it and makes missing cgroups bare.
            continue;
        };
        let Some(below) = rebase(&c.path, &m.root, "/") else {
            continue;
        };
        if below == "/" {
            continue;
        }
        let to_path = |rel: &str| match m.root.as_str() {
            "/" => rel.to_string(),
            r => format!("{r}{rel}"),
        };
        // The cgroup and its parents below the mount's root.
        let mut rel = String::new();
        for part in below.trim_start_matches('/').split('/') {
            rel = format!("{rel}/{part}");
            let key = (c.controllers.clone(), to_path(&rel));
            if let std::collections::btree_map::Entry::Vacant(e) = out.entry(key) {
                let path = &e.key().1;
                let d = read_dir_state(&c.controllers, path, &m.dir.join(&rel[1..])).map_err(
                    |err| {
                        format!(
                            "cgroup {}:{path} unreadable ({err})",
                            hierarchy_name(&c.controllers)
                        )
                    },
                )?;
                e.insert(d);
            }
        }
        let ours_here = ours
            .iter()
            .any(|o| o.controllers == c.controllers && is_self_or_parent(&c.path, &o.path));
        if !ours_here {
            walk(&c.controllers, &c.path, &m.dir.join(&below[1..]), &mut out)?;
        }
        if out.len() > DIRS_CAP {
            return Err(format!(
                "more than {DIRS_CAP} cgroups at or below {}:{}",
                hierarchy_name(&c.controllers),
                c.path
            ));
        }
    }
    Ok(out.into_values().collect())
}

/// Records every directory below `dir` (cgroup `path`).
fn walk(
    controllers: &str,
    path: &str,
    dir: &Path,
    out: &mut BTreeMap<(String, String), CgroupDir>,
) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let child = format!("{}/{name}", path.trim_end_matches('/'));
        // One removed since the listing is not recorded.
        if let Ok(d) = read_dir_state(controllers, &child, &e.path()) {
            out.insert((controllers.to_string(), child.clone()), d);
            if out.len() > DIRS_CAP {
                return Err(format!(
                    "more than {DIRS_CAP} cgroups below {}:{path}",
                    hierarchy_name(controllers)
                ));
            }
            walk(controllers, &child, &e.path(), out)?;
        }
    }
    Ok(())
}

/// Gives `dir`, a cgroup just made again, what `rec` recorded of it.
pub fn apply(dir: &Path, rec: &CgroupDir) -> Result<(), RestoreError> {
    let fail = |what: String| {
        let dir = dir.display().to_string();
        move |err| RestoreError::CgroupSetting { dir, what, err }
    };
    for (name, value) in &rec.settings {
        let file = dir.join(name);
        let now = std::fs::read_to_string(&file).unwrap_or_default();
        if now == *value {
            continue;
        }
        let what = format!("{name} = {:?}", value.trim_end());
        for w in writes(name, value) {
            std::fs::write(dir.join(&w.0), &w.1).map_err(fail(what.clone()))?;
        }
    }
    for (name, o) in &rec.files {
        set_owner(&dir.join(name), o).map_err(fail(format!("file {name}'s owner or mode")))?;
    }
    set_owner(dir, &rec.owner).map_err(fail("owner or mode".into()))
}

/// Gives `path` (when it exists) owner and mode `o`, where they differ.
fn set_owner(path: &Path, o: &Owner) -> std::io::Result<()> {
    let Ok(now) = owner_of(path) else {
        // A file this kernel does not make (another version's interface).
        return Ok(());
    };
    if (now.uid, now.gid) != (o.uid, o.gid) {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))?;
    }
    if now.mode != o.mode || (now.uid, now.gid) != (o.uid, o.gid) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(o.mode))?;
    }
    Ok(())
}

/// The writes, (file, text), that give a new cgroup setting `name` the
/// value `value` read from the old one.
pub fn writes(name: &str, value: &str) -> Vec<(String, String)> {
    let lines = || value.lines().map(str::trim).filter(|l| !l.is_empty());
    let one = |v: &str| vec![(name.to_string(), v.to_string())];
    match name {
        // Read as the list of controllers, written as +controller each.
        "cgroup.subtree_control" => {
            let v: Vec<String> = value.split_whitespace().map(|c| format!("+{c}")).collect();
            if v.is_empty() {
                Vec::new()
            } else {
                one(&v.join(" "))
            }
        }
        // Only `threaded` can be written; the rest follow from it.
        "cgroup.type" if value.trim() == "threaded" => one("threaded"),
        "cgroup.type" => Vec::new(),
        // Read as a list of fields, written as the flag alone.
        "memory.oom_control" => lines()
            .find_map(|l| l.strip_prefix("oom_kill_disable "))
            .map(|v| one(v.trim()))
            .unwrap_or_default(),
        // Read as the list of what is allowed; written by denying all and
        // allowing each again.
        "devices.list" => {
            let mut w = vec![("devices.deny".to_string(), "a".to_string())];
            w.extend(lines().map(|l| ("devices.allow".to_string(), l.to_string())));
            w
        }
        // An empty cpuset cannot be written, and a new one is never empty.
        "cpuset.cpus" | "cpuset.mems" if value.trim().is_empty() => Vec::new(),
        // One line per device or interface.
        "io.max" | "io.latency" | "io.weight" | "net_prio.ifpriomap" | "rdma.max" | "misc.max" => {
            lines().map(|l| (name.to_string(), l.to_string())).collect()
        }
        _ => one(value.trim()),
    }
}

/// Recorded directories by where each goes now, with its path in its
/// hierarchy there (parents sort before their children).
pub type Recorded<'a> = BTreeMap<PathBuf, (&'a CgroupDir, String)>;

/// The recorded directories of processes' images, by the directory each
/// goes to, moved as `target` moves a cgroup (`None`: not restored here).
pub fn by_dir<'a>(
    recs: impl Iterator<Item = &'a CgroupDir>,
    target: impl Fn(&Cgroup) -> Option<(PathBuf, String)>,
) -> Recorded<'a> {
    let mut out = BTreeMap::new();
    for r in recs {
        let c = Cgroup {
            controllers: r.controllers.clone(),
            path: r.path.clone(),
        };
        if let Some((dir, path)) = target(&c) {
            out.entry(dir).or_insert((r, path));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, value: &str) -> Vec<(String, String)> {
        writes(name, value)
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn settings_are_written_back_in_the_form_the_kernel_takes() {
        assert_eq!(
            w("cgroup.subtree_control", "cpu memory\n"),
            [pair("cgroup.subtree_control", "+cpu +memory")]
        );
        assert!(w("cgroup.subtree_control", "\n").is_empty());
        assert!(w("cgroup.type", "domain\n").is_empty());
        assert_eq!(
            w("cgroup.type", "threaded\n"),
            [pair("cgroup.type", "threaded")]
        );
        assert_eq!(
            w(
                "memory.oom_control",
                "oom_kill_disable 1\nunder_oom 0\noom_kill 0\n"
            ),
            [pair("memory.oom_control", "1")]
        );
        assert_eq!(
            w("devices.list", "c 1:3 rwm\nc 136:* rwm\n"),
            [
                pair("devices.deny", "a"),
                pair("devices.allow", "c 1:3 rwm"),
                pair("devices.allow", "c 136:* rwm")
            ]
        );
        assert!(w("cpuset.mems", "\n").is_empty());
        assert_eq!(
            w("io.max", "8:0 rbps=100 wbps=max riops=max wiops=max\n8:16 rbps=max wbps=5 riops=max wiops=max\n").len(),
            2
        );
        assert_eq!(
            w("memory.max", "268435456\n"),
            [pair("memory.max", "268435456")]
        );
        assert!(is_setting("hugetlb.2MB.max") && is_setting("hugetlb.1GB.limit_in_bytes"));
        assert!(!is_setting("hugetlb.2MB.usage_in_bytes") && !is_setting("memory.current"));
    }

    #[test]
    fn parents_and_subtrees_are_recorded_but_not_around_cr_ebpf_itself() {
        assert!(is_self_or_parent("/", "/a"));
        assert!(is_self_or_parent("/a", "/a/b"));
        assert!(is_self_or_parent("/a/b", "/a/b"));
        assert!(!is_self_or_parent("/a/b", "/a/bc"));
        assert!(!is_self_or_parent("/a/b", "/a"));

        // A plain directory tree stands in for a hierarchy: what is read
        // is the same (directories, files, their owners and values).
        let base = std::env::temp_dir().join(format!("cr-ebpf-cgdirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("app/sub/empty.0")).unwrap();
        std::fs::create_dir_all(base.join("app/sub/empty.1/deeper")).unwrap();
        std::fs::write(base.join("app/sub/pids.max"), "7\n").unwrap();
        std::fs::write(base.join("app/sub/pids.current"), "1\n").unwrap();
        std::fs::write(base.join("app/sub/cgroup.procs"), "").unwrap();
        std::fs::set_permissions(
            base.join("app/sub/cgroup.procs"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let ms = [Mount {
            controllers: vec!["pids".into()],
            dir: base.clone(),
            root: "/".into(),
        }];
        let c = Cgroup {
            controllers: "pids".into(),
            path: "/app/sub".into(),
        };
        let recs = record(&[&c], &ms, &[]).unwrap();
        let paths: Vec<&str> = recs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/app",
                "/app/sub",
                "/app/sub/empty.0",
                "/app/sub/empty.1",
                "/app/sub/empty.1/deeper"
            ]
        );
        let sub = &recs[1];
        assert_eq!(sub.settings, [pair("pids.max", "7\n")]);
        let procs = sub.files.iter().find(|f| f.0 == "cgroup.procs").unwrap();
        assert_eq!(procs.1.mode, 0o666);
        assert_eq!(sub.files.len(), 3);

        // Around cr-ebpf's own cgroup only the path is recorded.
        let ours = [Cgroup {
            controllers: "pids".into(),
            path: "/app/sub/empty.1".into(),
        }];
        let recs = record(&[&c], &ms, &ours).unwrap();
        assert_eq!(recs.len(), 2);

        // Made again: settings, modes and owners come back.
        std::fs::remove_dir_all(base.join("app/sub")).unwrap();
        std::fs::create_dir(base.join("app/sub")).unwrap();
        std::fs::write(base.join("app/sub/pids.max"), "max\n").unwrap();
        std::fs::write(base.join("app/sub/cgroup.procs"), "").unwrap();
        apply(&base.join("app/sub"), sub).unwrap();
        assert_eq!(
            std::fs::read_to_string(base.join("app/sub/pids.max")).unwrap(),
            "7"
        );
        assert_eq!(
            owner_of(&base.join("app/sub/cgroup.procs")).unwrap().mode,
            0o666
        );
        // A setting that cannot be written names the cgroup and the setting.
        let mut bad = sub.clone();
        bad.settings = vec![pair("nodir/pids.max", "1\n")];
        let err = apply(&base.join("app/sub"), &bad).unwrap_err().to_string();
        assert!(
            err.contains("app/sub was gone and was made again")
                && err.contains("nodir/pids.max = \"1\""),
            "{err}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
