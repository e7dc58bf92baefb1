//! Process trees: a forking server (a parent that leads its session, four
//! workers on socket pairs with epoll loops and timerfds, one leading its
//! own process group, and an unreaped zombie) checkpointed as a whole and
//! restored: same pids and parent links, the page of memory they share still
//! shared, every worker continues, the parent
//! still talks to each one and reaps both the restored zombie and a worker
//! that exits after the restore.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_restore::{restore, RestoreOptions};

const FORKSERVER: &str = env!("CARGO_BIN_EXE_forkserver");

fn lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete.lines().map(str::to_string).collect()
}

/// Worker tick counts, the reaped list and the counts the workers wrote in
/// the shared page, of the newest status line.
fn status(log: &Path) -> Option<([u64; 4], String, Vec<u64>)> {
    let l = lines(log)
        .into_iter()
        .rev()
        .find(|l| l.starts_with("status "))?;
    let mut w = [0u64; 4];
    let mut reaped = String::new();
    let mut shm = Vec::new();
    for f in l.split_whitespace().skip(1) {
        let (k, v) = f.split_once('=')?;
        match k {
            "reaped" => reaped = v.to_string(),
            "shm" => shm = v.split(',').filter_map(|x| x.parse().ok()).collect(),
            "bad" => assert!(v.is_empty(), "memory damaged in the tree: {l}"),
            _ => w[k.strip_prefix('w')?.parse::<usize>().ok()?] = v.parse().ok()?,
        }
    }
    Some((w, reaped, shm))
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (ppid, pgid, sid) of `pid`.
fn ids(pid: i32) -> (i32, i32, i32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<i32> = s[s.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0], f[1], f[2])
}

/// Kills and reaps the tree's processes however the test ends (a restored
/// process holds our stdout: left running, it would keep the harness
/// waiting).
struct Reap(Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: signalling and reaping processes of this test.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}

#[test]
fn a_forking_server_restores_with_its_workers_sessions_and_zombie() {
    if !cr_ebpf_perf::privileged("a_forking_server_restores_with_its_workers_sessions_and_zombie") {
        return;
    }
    // Workers of a killed parent come to us, and we reap them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let scratch = cr_ebpf_perf::Scratch::new("tree");
    let dir = scratch.0.clone();
    let log = dir.join("log");
    let img = dir.join("image");
    let mut child = cr_ebpf_perf::spawn_clean(
        Command::new(FORKSERVER)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let parent = child.id() as i32;
    let ready: Vec<i32> = wait_for("the server", || {
        lines(&log)
            .iter()
            .find(|l| l.starts_with("ready "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map(|v| v.parse().unwrap())
                    .collect()
            })
    });
    assert_eq!(ready[0], parent);
    let (workers, zombie) = (&ready[1..5], ready[5]);
    let all: Vec<i32> = ready.clone();
    let reap = Reap(all.clone());
    let before = wait_for("every worker ticking", || {
        status(&log)
            .filter(|(w, _, _)| w.iter().all(|n| *n > 2))
            .map(|s| s.0)
    });
    assert_eq!(ids(parent).2, parent, "the parent leads its session");
    assert_eq!(ids(workers[1]).1, workers[1], "worker 1 leads its group");

    let d = dump(
        parent,
        &img,
        &DumpOptions {
            leave_running: false,
            threads: 0,
            shell_job: false,
            ghost_limit: 0,
            shm_limit: 0,
            freeze_limit: None,
            no_precopy: false,
            network_lock: None,
            ext_unix_sk: false,
        },
    )
    .expect("dump of the tree");
    assert_eq!(d.pid, parent);
    assert!(img.join("tree.img").exists());
    // The page they share is stored once: by the first process of the tree
    // mapping it, in its page store; the others name it.
    let mut stored = 0;
    let mut named = 0;
    for (_, image) in cr_ebpf_image::images_dir::processes(&img).unwrap() {
        let mut chain = cr_ebpf_image::Chain::open(&image).unwrap();
        chain.load_shmem().unwrap();
        for o in &chain.manifest().shmem {
            named += 1;
            if !o.elsewhere {
                stored += 1;
                assert!(o.base != 0 && !o.data.is_empty(), "{o:?}");
            }
        }
    }
    assert_eq!((stored, named), (1, 5), "one shared page, five processes");
    let _ = child.wait();
    for &p in &all[1..] {
        // SAFETY: reaping the workers and the zombie, ours now.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
    }

    let r = restore(&img, &RestoreOptions::default()).expect("restore of the tree");
    assert_eq!(r.pid, parent);
    for &w in workers {
        assert_eq!(ids(w).0, parent, "worker {w} is the parent's child again");
        assert_eq!(ids(w).2, parent, "in the parent's session");
    }
    assert_eq!(ids(parent).2, parent, "the parent leads its session again");
    assert_eq!(
        ids(workers[1]).1,
        workers[1],
        "worker 1 leads its group again"
    );
    assert_eq!(ids(workers[0]).1, parent);
    let st = std::fs::read_to_string(format!("/proc/{zombie}/stat")).unwrap();
    assert!(st.contains(") Z "), "the zombie is back: {st}");
    // Every worker goes on counting, and the parent hears each one.
    wait_for("every worker ticking after the restore", || {
        status(&log).filter(|(w, _, _)| w.iter().zip(before).all(|(n, b)| *n > b + 5))
    });
    // The page they share is still shared: the parent sees the workers'
    // counts there go on too.
    wait_for("the shared page", || {
        status(&log)
            .filter(|(_, _, shm)| shm.len() == 4 && shm.iter().zip(before).all(|(n, b)| *n > b + 5))
    });
    // The parent still reaps its children: the zombie, and worker 0 told to exit.
    // SAFETY: signalling the restored parent.
    unsafe { libc::kill(parent, libc::SIGUSR1) };
    let reaped = wait_for("the parent reaping", || {
        status(&log).map(|s| s.1).filter(|r| {
            r.contains(&format!("{zombie}:3")) && r.contains(&format!("{}:10", workers[0]))
        })
    });
    assert!(!reaped.is_empty());
    drop(reap);
    drop(scratch);
}

#[test]
fn a_failed_tree_restore_leaves_no_process_holding_a_pid() {
    if !cr_ebpf_perf::privileged("a_failed_tree_restore_leaves_no_process_holding_a_pid") {
        return;
    }
    // What a killed parent leaves comes to us: the dumped child, and (as
    // it would to init, which reaps them on most machines but not all) a
    // stub left behind by the failed restore.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let scratch = cr_ebpf_perf::Scratch::new("tree-failed");
    let ctl = scratch.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = cr_ebpf_perf::spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", cr_ebpf_perf::PARENT_AND_CHILD])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    cr_ebpf_perf::wait_for_file(&ctl.join("pids"));
    let pids: Vec<i32> = std::fs::read_to_string(ctl.join("pids"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let reap = Reap(pids.clone());
    let img = scratch.0.join("image");
    dump(pids[0], &img, &DumpOptions::default()).expect("dump of the tree");
    let _ = child.wait();
    // SAFETY: reaping the child, ours now.
    unsafe { libc::waitpid(pids[1], std::ptr::null_mut(), 0) };
    // The child's pages damaged: found as its memory is filled, once both
    // stubs exist.
    let pages = img
        .join(format!("proc-{}", pids[1]))
        .join(cr_ebpf_image::PAGES_FILE);
    let mut b = std::fs::read(&pages).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&pages, &b).unwrap();
    let err = restore(&img, &RestoreOptions::default()).unwrap_err();
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains("damaged page data"), "{msg}");
    // Nothing holds either pid: no stub, no zombie of one.
    for &p in &pids {
        let st = std::fs::read_to_string(format!("/proc/{p}/stat"));
        assert!(
            st.is_err(),
            "pid {p} still held after the failed restore: {st:?}"
        );
    }
    drop(reap);
}
