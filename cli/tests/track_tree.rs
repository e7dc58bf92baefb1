//! `cr-ebpf track` on a process tree: a forking server (a parent, four
//! workers on socket pairs with epoll loops, a zombie, a page shared by
//! all) is tracked while its tree changes: a worker exits and is reaped
//! with the zombie, then a new worker is forked. Every checkpoint holds the
//! tree as it was; the new worker is stored whole once and incrementally
//! after. After SIGKILL of the whole tree the newest checkpoint restores it
//! (same pids and parent links, memory intact through the chain — each
//! process checks its own memory pattern —, workers ticking, the parent
//! still reaping), and so does an early checkpoint, with the zombie and the
//! worker that exited since; compaction of a tree checkpoint and retention
//! keep the chain restorable.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

mod common;

use common::{complete_lines, workload_bin, Tracking, BIN};

fn lines(log: &Path) -> Vec<String> {
    complete_lines(log)
}

/// One `status` line of the server.
#[derive(Debug, Clone, Default)]
struct Status {
    workers: [u64; 4],
    reaped: String,
    shm: Vec<u64>,
    bad: String,
}

fn parse_status(l: &str) -> Option<Status> {
    let mut s = Status::default();
    for f in l.strip_prefix("status ")?.split_whitespace() {
        let (k, v) = f.split_once('=')?;
        match k {
            "reaped" => s.reaped = v.to_string(),
            "shm" => s.shm = v.split(',').filter_map(|x| x.parse().ok()).collect(),
            "bad" => s.bad = v.to_string(),
            _ => s.workers[k.strip_prefix('w')?.parse::<usize>().ok()?] = v.parse().ok()?,
        }
    }
    Some(s)
}

/// Status lines from line `from` on.
fn statuses(log: &Path, from: usize) -> Vec<Status> {
    lines(log)
        .iter()
        .skip(from)
        .filter_map(|l| parse_status(l))
        .collect()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a checkpoint report that `pred` accepts.
fn report(
    rx: &Receiver<serde_json::Value>,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        assert_eq!(r["ok"], true, "{r}");
        if pred(&r) {
            return r;
        }
    }
}

/// (ppid, state letter) of `pid`.
fn parent_and_state(pid: i32) -> Option<(i32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((f.next()?.parse().ok()?, state))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal to {pid}");
}

/// Makes us the subreaper of what we start (restored roots and orphaned
/// workers come to us, and we reap them) and returns a fresh scratch
/// directory (removed by [`Cleanup`]).
fn scratch(name: &str) -> PathBuf {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = common::fresh_dir(&format!("cr-ebpf-{name}"));
    dir
}

/// Kills the processes of a tree, the root last, and reaps them all (we
/// are their subreaper once the root is gone).
fn kill_tree(root: i32, others: &[i32]) {
    for &p in others.iter().chain([&root]) {
        // SAFETY: signalling processes of this test.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    for &p in std::iter::once(&root).chain(others) {
        // SAFETY: reaping processes of this test (ECHILD if not ours).
        unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
    }
}

/// Kills whatever is left however the test ends.
struct Cleanup {
    pids: Vec<i32>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some((&root, rest)) = self.pids.split_first() {
            kill_tree(root, rest);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every worker goes on ticking from at least `floor`, memory intact.
fn continues(log: &Path, from: usize, floor: [u64; 4], what: &str) {
    wait_for(what, || {
        let s = statuses(log, from);
        let last = s.last()?;
        (last.workers.iter().zip(floor).all(|(n, f)| *n > f + 5)
            && last.shm.len() == 4
            && last.shm.iter().zip(floor).all(|(n, f)| *n > f + 5))
        .then_some(())
    });
    for s in statuses(log, from) {
        assert!(s.bad.is_empty(), "memory damaged after the restore: {s:?}");
    }
}

fn restore(images: &Path, checkpoint: Option<&str>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["restore", "--detach", "--images-dir"])
        .arg(images);
    if let Some(c) = checkpoint {
        cmd.args(["--checkpoint", c]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore {checkpoint:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compact(images: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .args(["compact", "--images-dir"])
        .arg(images)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compact {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn inspect(dir: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["inspect", "--json"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspect {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The chain parent inspect reports for process `pid` of a tree checkpoint.
fn chain_parent(tree: &serde_json::Value, pid: i32) -> String {
    let p = tree["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("process {pid} not in {tree}"));
    p["chain"]["parent"].as_str().unwrap().to_string()
}

#[test]
fn a_tracked_forking_server_is_checkpointed_as_its_tree_changes_and_restored() {
    let test = "a_tracked_forking_server_is_checkpointed_as_its_tree_changes_and_restored";
    let Some(server) = workload_bin("forkserver", test) else {
        return;
    };
    let dir = scratch("track-tree");
    let log = dir.join("log");
    let images = dir.join("images");
    let child = common::clean(&server)
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let parent = child.id() as i32;
    let ready: Vec<i32> = wait_for("the server", || {
        lines(&log)
            .iter()
            .find_map(|l| l.strip_prefix("ready ").map(str::to_string))
            .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
    });
    assert_eq!(ready[0], parent);
    let (workers, zombie) = (ready[1..5].to_vec(), ready[5]);
    let mut cleanup = Cleanup {
        pids: ready.clone(),
        dir: dir.clone(),
    };

    let track = Tracking::start(parent, &["--interval", "300ms"], &images);
    let rx = &track.reports;

    // The whole tree, the zombie with it; then incrementally.
    let first = report(rx, "the first checkpoint", |_| true);
    assert_eq!(first["method"], "full", "{first}");
    assert_eq!(first["processes"], 5, "{first}");
    assert_eq!(first["zombies"], 1, "{first}");
    let early = report(rx, "an incremental checkpoint", |_| true);
    assert_eq!(early["method"], "uffd-wp", "{early}");
    assert_eq!(early["processes"], 5, "{early}");
    assert_eq!(early["new_processes"], 0, "{early}");
    let early_id = early["id"].as_str().unwrap().to_string();

    // A child exits: worker 0 is told to, and the parent reaps it and the zombie.
    signal(parent, libc::SIGUSR1);
    wait_for("the parent reaping", || {
        statuses(&log, 0).last().filter(|s| {
            s.reaped.contains(&format!("{zombie}:3"))
                && s.reaped.contains(&format!("{}:10", workers[0]))
        })?;
        Some(())
    });
    let shrunk = report(rx, "a checkpoint of the smaller tree", |r| {
        r["processes"] == 4 && r["zombies"] == 0
    });
    assert_eq!(shrunk["method"], "uffd-wp", "{shrunk}");

    // A child is forked: the new worker 0.
    signal(parent, libc::SIGUSR2);
    let new_w0: i32 = wait_for("the new worker", || {
        lines(&log)
            .iter()
            .find_map(|l| l.strip_prefix("respawned 0 ")?.parse().ok())
    });
    cleanup.pids = vec![parent, workers[1], workers[2], workers[3], new_w0];
    let grown = report(rx, "a checkpoint with the new worker", |r| {
        r["processes"] == 5
    });
    assert_eq!(grown["new_processes"], 1, "{grown}");
    let grown_id = grown["id"].as_str().unwrap().to_string();
    let tree = inspect(&images.join(&grown_id));
    assert_eq!(
        chain_parent(&tree, new_w0),
        "",
        "the new worker is stored whole"
    );
    assert_eq!(chain_parent(&tree, parent), shrunk["id"].as_str().unwrap());
    report(rx, "one more checkpoint", |_| true);
    let newest = report(rx, "yet another checkpoint", |r| {
        r["processes"] == 5 && r["new_processes"] == 0
    });
    let newest_id = newest["id"].as_str().unwrap().to_string();
    let tree = inspect(&images.join(&newest_id));
    let before = newest["parent"].as_str().unwrap().to_string();
    assert_eq!(chain_parent(&tree, new_w0), before, "then incrementally");
    assert_eq!(chain_parent(&tree, parent), before);

    // Kill the whole tree at once, as a crash would (a checkpoint under
    // way then fails; the published ones stay).
    let at_kill = statuses(&log, 0).last().cloned().unwrap();
    kill_tree(parent, &[workers[1], workers[2], workers[3], new_w0]);
    let _ = child;
    let (status, err) = track.finish();
    // 4: the service ended because the tree is gone.
    assert_eq!(status.code(), Some(4), "track: {err}");
    let listed = inspect(&images);
    let ids: Vec<&str> = listed["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&early_id.as_str()) && ids.contains(&newest_id.as_str()));
    let newest_on_disk = ids.last().unwrap().to_string();

    // A tree checkpoint in the middle of the chain compacted: the newer
    // ones resolve through it all the same.
    compact(&images, &["--checkpoint", &grown_id]);
    let tree = inspect(&images.join(&grown_id));
    for p in tree["processes"].as_array().unwrap() {
        assert_eq!(p["chain"]["method"], "compacted", "{p}");
        assert_eq!(p["chain"]["parent"], "", "{p}");
    }

    // The newest checkpoint: the tree as it was last, memory intact.
    let from = lines(&log).len();
    restore(&images, None);
    for w in [workers[1], workers[2], workers[3], new_w0] {
        assert_eq!(
            parent_and_state(w).map(|p| p.0),
            Some(parent),
            "worker {w} is the parent's child again ({newest_on_disk})"
        );
    }
    assert!(
        parent_and_state(workers[0]).is_none(),
        "the exited worker stays gone"
    );
    assert!(
        parent_and_state(zombie).is_none(),
        "the reaped zombie stays gone"
    );
    continues(&log, from, at_kill.workers, "the restored tree ticking");
    // The parent still hears its new child and reaps it.
    signal(parent, libc::SIGUSR1);
    wait_for("the restored parent reaping the new worker", || {
        statuses(&log, from)
            .last()
            .filter(|s| s.reaped.contains(&format!("{new_w0}:10")))
            .map(|_| ())
    });
    kill_tree(parent, &[workers[1], workers[2], workers[3], new_w0]);

    // An early checkpoint: the zombie and the first worker 0 are back.
    cleanup.pids = ready.clone();
    let from = lines(&log).len();
    restore(&images, Some(&early_id));
    assert_eq!(
        parent_and_state(zombie),
        Some((parent, 'Z')),
        "the zombie is back, unreaped"
    );
    for &w in &workers {
        assert_eq!(
            parent_and_state(w).map(|p| p.0),
            Some(parent),
            "worker {w} is back ({early_id})"
        );
    }
    // Counts at the early checkpoint were at least those of the first line.
    let floor = statuses(&log, 0).first().map_or([0; 4], |s| s.workers);
    continues(&log, from, floor, "the early tree ticking");
    let s = statuses(&log, from).last().cloned().unwrap();
    assert!(
        s.reaped.is_empty(),
        "the early parent had reaped nothing yet: {s:?}"
    );
    kill_tree(parent, &ready[1..]);

    // Retention: the newest two kept, the older of them rewritten whole;
    // the newest restores from them alone.
    compact(&images, &["--keep", "2"]);
    let listed = inspect(&images);
    let kept: Vec<&str> = listed["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(kept.len(), 2, "{listed}");
    assert_eq!(kept[1], newest_on_disk);
    assert_eq!(listed["checkpoints"][0]["parent"], serde_json::Value::Null);
    cleanup.pids = vec![parent, workers[1], workers[2], workers[3], new_w0];
    let from = lines(&log).len();
    restore(&images, None);
    continues(
        &log,
        from,
        at_kill.workers,
        "the tree restored after retention",
    );
    drop(cleanup);
}

/// A shell loop running `/bin/sleep` again and again (Debian's bash and
/// coreutils): short-lived children come and go between and during
/// checkpoints. Every checkpoint succeeds; after SIGKILL of the shell and
/// its child the newest restores, whichever child it caught, and the loop
/// counts on from where that checkpoint saw it.
#[test]
fn a_shell_loop_with_short_lived_children_is_tracked_and_restored() {
    let test = "a_shell_loop_with_short_lived_children_is_tracked_and_restored";
    if !common::root(test) {
        return;
    }
    let dir = scratch("shell-tree");
    let log = dir.join("count");
    let images = dir.join("images");
    let script = format!(
        "n=0; while :; do /bin/sleep 0.05; n=$((n+1)); echo $n >> {}; done",
        log.display()
    );
    let shell = common::clean("/bin/bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = shell.id() as i32;
    let mut cleanup = Cleanup {
        pids: vec![pid],
        dir: dir.clone(),
    };
    let counts = || -> Vec<u64> { lines(&log).iter().filter_map(|l| l.parse().ok()).collect() };
    wait_for("the loop", || (counts().len() > 2).then_some(()));
    let track = Tracking::start(pid, &["--interval", "300ms"], &images);
    for i in 0..6 {
        let r = report(&track.reports, "a checkpoint", |_| true);
        assert_eq!(r["method"], if i == 0 { "full" } else { "uffd-wp" }, "{r}");
    }
    // The shell and whichever child it has now.
    let child: Vec<i32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    kill_tree(pid, &child);
    // A child the shell started after that list came to us as an orphan:
    // reaped too, or its pid stays taken.
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for p in kids
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                kill_tree(p, &[]);
            }
        }
    }
    drop(shell);
    let (status, err) = track.finish();
    // 4: the service ended because the tree is gone.
    assert_eq!(status.code(), Some(4), "track: {err}");
    let before = counts();
    let last = *before.last().unwrap();

    let from = lines(&log).len();
    restore(&images, None);
    let tree = inspect(&images);
    let newest = tree["checkpoints"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let restored_tree = images.join(newest["id"].as_str().unwrap());
    let procs = checkpoint_pids(&restored_tree);
    eprintln!("restored {} with processes {procs:?}", newest["id"]);
    cleanup.pids = procs.clone();
    // It counts on: consecutive numbers from where the checkpoint was, at
    // most where the killed loop had got to, plus one.
    let after: Vec<u64> = wait_for("the restored loop counting", || {
        let c: Vec<u64> = counts().into_iter().skip(from).collect();
        (c.len() >= 5).then_some(c)
    });
    assert!(
        after[0] <= last + 1 && after[0] > 1,
        "{after:?} after {last}"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "the restored loop skipped or repeated: {after:?}"
    );
    drop(cleanup);
}

/// The pids of a checkpoint: the root and every other live process.
fn checkpoint_pids(checkpoint: &Path) -> Vec<i32> {
    let v = inspect(checkpoint);
    match v["processes"].as_array() {
        Some(ps) => ps
            .iter()
            .map(|p| p["pid"].as_i64().unwrap() as i32)
            .collect(),
        None => vec![v["pid"].as_i64().unwrap() as i32],
    }
}
