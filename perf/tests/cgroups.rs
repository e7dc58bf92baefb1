//! Cgroup membership: a python3 process in a non-root cgroup of the v2
//! hierarchy and of a v1 one (a named hierarchy the test mounts) comes
//! back in both, with the directories made again when they are gone and
//! the v1 hierarchy mounted by the restore when it is mounted nowhere;
//! with `--cgroup-root` it comes back under other cgroups. A cgroup made
//! again comes back with its settings, owners and modes, and with the
//! empty cgroups that were below it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, CgroupRoot, RestoreOptions};

const WORKLOAD: &str = r#"
import os, sys, time
open(os.path.join(sys.argv[1], "ready"), "w").close()
while True:
    time.sleep(0.05)
"#;

/// Where the v2 hierarchy is mounted (`/sys/fs/cgroup/unified` on a
/// hybrid machine, `/sys/fs/cgroup` on a pure v2 one).
fn v2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

/// A named v1 hierarchy mounted at `dir` (unmounted by `umount`).
fn mount_v1(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "cgroup", "-o", &format!("none,name={name}"), "cgroup"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mounting the v1 hierarchy {name}");
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

/// The process's path in the hierarchy whose controllers field is `ctl`.
fn cgroup_of(pid: i32, ctl: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, p) = (f.next()?, f.next()?, f.next()?);
            (c == ctl).then(|| p.to_string())
        })
        .unwrap_or_else(|| panic!("no {ctl:?} line in {text}"))
}

fn join(dir: &Path, pid: i32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
}

/// Moves `pid` back to the root cgroups and removes the test's cgroups.
struct Cleanup {
    v2: PathBuf,
    v1: PathBuf,
    top: String,
    pids: Vec<i32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.pids {
            // SAFETY: plain kill.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        for root in [&self.v2, &self.v1] {
            let top = root.join(&self.top);
            let mut dirs: Vec<PathBuf> = walk(&top);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
        }
        umount(&self.v1);
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = vec![d.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

#[test]
fn a_process_comes_back_in_its_v2_and_v1_cgroups_and_under_another_root() {
    if !cr_ebpf_perf::privileged(
        "a_process_comes_back_in_its_v2_and_v1_cgroups_and_under_another_root",
    ) {
        return;
    }
    let s = Scratch::new("cgroups");
    let me = std::process::id();
    // One name for every run: a v1 hierarchy outlives its last mount
    // (every process is in its root cgroup), so a run mounts the one an
    // earlier run left rather than adding another.
    let name = "crebpftest".to_string();
    let top = format!("cr-ebpf-test-{me}");
    let v2 = v2_mount();
    let v1 = s.0.join("v1");
    mount_v1(&v1, &name);
    let mut clean = Cleanup {
        v2: v2.clone(),
        v1: v1.clone(),
        top: top.clone(),
        pids: Vec::new(),
    };
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    clean.pids.push(pid);
    let _g = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    join(&v2.join(&top).join("app"), pid);
    join(&v1.join(&top).join("app/worker"), pid);
    let named = format!("name={name}");
    assert_eq!(cgroup_of(pid, ""), format!("/{top}/app"));
    assert_eq!(cgroup_of(pid, &named), format!("/{top}/app/worker"));

    // Dumped, its cgroups removed and the v1 hierarchy unmounted: the
    // restore makes the directories and mounts the hierarchy itself.
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    std::fs::remove_dir(v2.join(&top).join("app")).unwrap();
    std::fs::remove_dir(v1.join(&top).join("app/worker")).unwrap();
    umount(&v1);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    let mut made = r.cgroups_made.clone();
    made.sort();
    assert_eq!(
        made,
        [
            format!("cgroup2:/{top}/app"),
            format!("name={name}:/{top}/app/worker")
        ],
        "the restore says which cgroups it made again"
    );
    assert_eq!(cgroup_of(pid, ""), format!("/{top}/app"), "v2");
    assert_eq!(cgroup_of(pid, &named), format!("/{top}/app/worker"), "v1");
    mount_v1(&v1, &name);
    assert!(v1.join(&top).join("app/worker").is_dir());

    // Again, restored under other roots, each hierarchy named (a root
    // without a controller would move it in every hierarchy of the
    // machine: covered by the unit tests).
    let img2 = s.0.join("img2");
    dump(pid, &img2, &DumpOptions::default()).expect("second dump");
    // SAFETY: reaping the restored process, our child, killed by the dump.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    let roots: Vec<CgroupRoot> = vec![
        format!("cgroup2:/{top}/moved").parse().unwrap(),
        format!("{named}:/{top}/elsewhere").parse().unwrap(),
    ];
    let opts = RestoreOptions {
        cgroup_roots: roots,
        ..RestoreOptions::default()
    };
    let r = restore(&img2, &opts).expect("restore under other roots");
    assert_eq!(r.pid, pid);
    assert_eq!(cgroup_of(pid, ""), format!("/{top}/moved"));
    assert_eq!(cgroup_of(pid, &named), format!("/{top}/elsewhere"));
}

/// The mount point of the v1 hierarchy of controller `ctl`, if any.
fn v1_mount(ctl: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter(|l| l.contains(" - cgroup "))
        .find(|l| {
            l.rsplit(' ')
                .next()
                .is_some_and(|o| o.split(',').any(|x| x == ctl))
        })
        .and_then(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
}

fn mode_owner(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

#[test]
fn a_cgroup_made_again_has_its_settings_owners_and_empty_children_back() {
    if !cr_ebpf_perf::privileged(
        "a_cgroup_made_again_has_its_settings_owners_and_empty_children_back",
    ) {
        return;
    }
    let Some(pids) = v1_mount("pids") else {
        assert!(
            !cr_ebpf_perf::in_ci(),
            "no v1 pids hierarchy mounted on this machine"
        );
        eprintln!("skipped: no v1 pids hierarchy mounted here");
        return;
    };
    let s = Scratch::new("cgroup-settings");
    let top = format!("cr-ebpf-settings-{}", std::process::id());
    let app = pids.join(&top).join("app");
    let mut clean = Cleanup {
        v2: pids.clone(),
        v1: s.0.join("unused"),
        top: top.clone(),
        pids: Vec::new(),
    };
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", WORKLOAD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    clean.pids.push(pid);
    let _g = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    join(&app, pid);
    std::fs::write(app.join("pids.max"), "77").unwrap();
    std::fs::write(app.join("notify_on_release"), "1").unwrap();
    std::fs::create_dir_all(app.join("empty.0/deeper")).unwrap();
    std::fs::write(app.join("empty.0/pids.max"), "5").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [app.clone(), app.join("cgroup.procs")] {
        std::os::unix::fs::chown(&p, Some(1000), Some(1001)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o775)).unwrap();
    }

    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    for d in ["empty.0/deeper", "empty.0", ""] {
        std::fs::remove_dir(app.join(d)).unwrap();
    }
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    let mut made = r.cgroups_made.clone();
    made.sort();
    assert_eq!(
        made,
        [
            format!("pids:/{top}/app"),
            format!("pids:/{top}/app/empty.0"),
            format!("pids:/{top}/app/empty.0/deeper"),
        ],
        "the cgroup and the empty ones below it are made again"
    );
    assert_eq!(cgroup_of(pid, "pids"), format!("/{top}/app"));
    let read = |f: &str| std::fs::read_to_string(app.join(f)).unwrap();
    assert_eq!(read("pids.max"), "77\n", "a controller setting");
    assert_eq!(read("notify_on_release"), "1\n", "a core setting");
    assert_eq!(read("empty.0/pids.max"), "5\n", "a setting below");
    assert_eq!(mode_owner(&app), (0o775, 1000, 1001), "the directory");
    assert_eq!(
        mode_owner(&app.join("cgroup.procs")),
        (0o775, 1000, 1001),
        "a file in it"
    );
    assert_eq!(mode_owner(&app.join("tasks")).1, 0, "files left as made");
}
