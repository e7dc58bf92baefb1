//! Damaged images never restore wrong state: a workload's image and a
//! `track` chain of it are damaged at random (a byte flipped in any file,
//! a file truncated, extended or deleted), and `cr-ebpf restore` is run on
//! each copy. Every outcome is counted and printed; the run fails on any
//! panic, hang, restore of wrong memory, or restore from a checkpoint other
//! than the newest (a silent rollback). A restore that succeeds must bring
//! back exactly the workload's memory (it checks itself).
//!
//! Trials: 120 of each kind in CI; `CR_EBPF_LONG=1` runs 1,000 of each
//! (the long mode of the bench machine); `CR_EBPF_FAULT_SEED` repeats a run.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{clean, root, Tracking, BIN};

/// 4 MiB of seeded bytes and a counter of checkpoints seen; on `check` it
/// compares its memory with the bytes made again from the seed and writes
/// `ok STEP` or `bad`.
const WORKLOAD: &str = r#"
import hashlib, os, random, sys, time
ctl = sys.argv[1]
data = bytearray(random.Random(7).randbytes(4 << 20))
want = hashlib.sha256(bytes(random.Random(7).randbytes(4 << 20))).hexdigest()
step = 0
open(os.path.join(ctl, 'ready'), 'w').close()
while True:
    time.sleep(0.01)
    step += 1
    data[step % len(data)] ^= 0  # touched, unchanged
    check = os.path.join(ctl, 'check')
    if os.path.exists(check):
        os.unlink(check)
        got = hashlib.sha256(bytes(data)).hexdigest()
        with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
            f.write('ok' if got == want else 'bad')
        os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
"#;

/// xorshift64*, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Every regular file under `dir` (not the lock or control socket of a
/// chain).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&p));
        } else if t.is_file() && p.extension().is_some_and(|x| x == "img") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if t.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// One random damage to one file of `dir`; what was done.
fn damage(dir: &Path, rng: &mut Rng) -> String {
    let all = files(dir);
    let f = &all[rng.below(all.len() as u64) as usize];
    let mut bytes = std::fs::read(f).unwrap();
    let name = f.strip_prefix(dir).unwrap().display().to_string();
    let what = match rng.below(10) {
        0..=5 if !bytes.is_empty() => {
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 << rng.below(8);
            format!("bit flipped at {at} of {name}")
        }
        6 | 7 => {
            let len = rng.below(bytes.len() as u64) as usize;
            bytes.truncate(len);
            format!("{name} truncated to {len}")
        }
        8 => {
            bytes.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8));
            format!("{name} extended")
        }
        _ => {
            std::fs::remove_file(f).unwrap();
            return format!("{name} deleted");
        }
    };
    std::fs::write(f, bytes).unwrap();
    what
}

#[derive(Default, Debug)]
struct Counts {
    refused: u32,
    /// Refusals by what they say (digits left out).
    why: std::collections::BTreeMap<String, u32>,
    restored_intact: u32,
    panicked: Vec<String>,
    hung: Vec<String>,
    wrong: Vec<String>,
    rolled_back: Vec<String>,
}

/// Restores `img`; classifies what happened. A restored process must come
/// from the checkpoint named `newest` (when given), and is asked to check
/// itself, then killed and reaped.
fn attempt(img: &Path, newest: Option<&str>, ctl: &Path, pid: i32, what: &str, c: &mut Counts) {
    let _ = std::fs::remove_file(ctl.join("out"));
    let mut child = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let Some(status) = status else {
        c.hung.push(what.into());
        return;
    };
    if err.contains("panicked") {
        c.panicked.push(format!("{what}: {err}"));
    }
    if !status.success() {
        c.refused += 1;
        assert!(
            err.contains("error:"),
            "{what}: a failed restore says why: {err}"
        );
        // Never for a reason other than the damage.
        assert!(!err.contains("in use by another process"), "{what}: {err}");
        let line = err.lines().find(|l| l.contains("error: ")).unwrap_or(&err);
        let parts: Vec<&str> = line.split(": ").collect();
        let tail = parts[parts.len().saturating_sub(2)..].join(": ");
        // Without numbers, addresses and paths: one line per kind of reason.
        let words: Vec<&str> = tail
            .split_whitespace()
            .filter(|w| !w.starts_with("0x") && !w.starts_with('/'))
            .collect();
        let why: String = words
            .join(" ")
            .chars()
            .filter(|ch| !ch.is_ascii_digit())
            .take(90)
            .collect();
        *c.why.entry(why).or_default() += 1;
        return;
    }
    // Restored: from the newest checkpoint, the workload intact.
    let from = err
        .split("restored pid ")
        .nth(1)
        .and_then(|r| r.split(" from ").nth(1))
        .and_then(|r| r.split(" (").next())
        .unwrap_or("");
    if let Some(newest) = newest.filter(|n| !from.ends_with(n)) {
        c.rolled_back
            .push(format!("{what}: restored {from:?}, not {newest}"));
    }
    std::fs::write(ctl.join("check"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl.join("out").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let verdict = std::fs::read_to_string(ctl.join("out")).unwrap_or_default();
    if verdict == "ok" {
        c.restored_intact += 1;
    } else {
        c.wrong
            .push(format!("{what}: restored, verdict {verdict:?}"));
    }
    // SAFETY: killing and reaping the restored workload, ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    let _ = std::fs::remove_file(ctl.join("check"));
}

fn report(name: &str, c: &Counts) {
    eprintln!(
        "fault injection, {name}: {} refused, {} restored intact, {} panicked, {} hung, {} wrong, \
         {} rolled back",
        c.refused,
        c.restored_intact,
        c.panicked.len(),
        c.hung.len(),
        c.wrong.len(),
        c.rolled_back.len()
    );
    for (why, n) in &c.why {
        eprintln!("  {n:4} × {why}");
    }
    assert!(c.panicked.is_empty(), "panics: {:#?}", c.panicked);
    assert!(c.hung.is_empty(), "hangs: {:#?}", c.hung);
    assert!(c.wrong.is_empty(), "wrong restores: {:#?}", c.wrong);
    assert!(
        c.rolled_back.is_empty(),
        "silent rollbacks: {:#?}",
        c.rolled_back
    );
}

#[test]
fn damaged_images_and_chains_are_refused_never_restored_wrong() {
    let test = "damaged_images_and_chains_are_refused_never_restored_wrong";
    if !root(test) {
        return;
    }
    // Restored workloads are reparented to us when `restore` exits.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let long = std::env::var("CR_EBPF_LONG").is_ok_and(|v| v == "1");
    let trials = if long { 1000 } else { 120 };
    let seed = std::env::var("CR_EBPF_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fault injection: seed {seed} (CR_EBPF_FAULT_SEED), {trials} trials of each kind");
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("cr-ebpf-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ctl = dir.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();

    // A chain of three checkpoints (track), then the workload killed.
    let mut w = clean("/usr/bin/python3")
        .args(["-c", WORKLOAD])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = w.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl.join("ready").exists() {
        assert!(Instant::now() < deadline, "the workload did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let chain = dir.join("chain");
    let track = Tracking::start(pid, &["--interval", "200ms", "--count", "3"], &chain);
    let (status, err) = track.finish();
    assert!(status.success(), "track: {err}");
    w.kill().unwrap();
    w.wait().unwrap();

    // Undamaged, the chain restores intact.
    let mut c = Counts::default();
    let newest = Some("ckpt-000003");
    attempt(&chain, newest, &ctl, pid, "undamaged", &mut c);
    assert_eq!(c.restored_intact, 1, "{c:?}");
    assert!(c.rolled_back.is_empty(), "{c:?}");
    // Compacted (its report as JSON), it still restores intact.
    let compacted = dir.join("compacted");
    copy_dir(&chain, &compacted);
    let out = Command::new(BIN)
        .args(["compact", "--json", "--images-dir"])
        .arg(&compacted)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["ok"], true);
    assert_eq!(said["id"], "ckpt-000003");
    assert_eq!(said["chain_len"], 3);
    // Sizes as everywhere: the page store's bytes, the checkpoint on disk.
    assert!(said["bytes"].as_u64() > Some(0), "{said}");
    assert!(
        said["size_bytes"].as_u64() >= said["bytes"].as_u64(),
        "{said}"
    );
    attempt(&compacted, newest, &ctl, pid, "compacted", &mut c);
    assert_eq!(c.restored_intact, 2, "{c:?}");

    // Damaged anywhere: refused, or (a byte no one reads) intact; never
    // the checkpoint before the newest in its place.
    let mut c = Counts::default();
    for i in 0..trials {
        let copy = dir.join(format!("damaged-{i}"));
        copy_dir(&chain, &copy);
        let what = damage(&copy, &mut rng);
        attempt(&copy, newest, &ctl, pid, &what, &mut c);
        let _ = std::fs::remove_dir_all(&copy);
    }
    report("chain of 3 checkpoints", &c);

    // The full checkpoint alone (the first of the chain), damaged.
    let mut c = Counts::default();
    let first = chain.join("ckpt-000001");
    for i in 0..trials {
        let copy = dir.join(format!("full-{i}"));
        copy_dir(&first, &copy);
        let what = damage(&copy, &mut rng);
        attempt(&copy, None, &ctl, pid, &what, &mut c);
        let _ = std::fs::remove_dir_all(&copy);
    }
    report("full checkpoint", &c);

    // `restore` and `compact` killed at any instant: nothing half-made is
    // left (the pid is free again, or the process runs intact), and the
    // chain still restores intact from its newest checkpoint.
    let kills = trials / 4;
    let (mut finished, mut cut) = (0, 0);
    for i in 0..kills {
        let copy = dir.join(format!("killed-{i}"));
        copy_dir(&chain, &copy);
        let compact = i % 2 == 1;
        let mut cmd = Command::new(BIN);
        if compact {
            cmd.args(["compact", "--images-dir"]).arg(&copy);
        } else {
            cmd.args(["restore", "--detach", "--images-dir"]).arg(&copy);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(300_000)));
        let done = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        if done {
            finished += 1;
        } else {
            cut += 1;
        }
        // Whatever a killed restore made goes (its stub is our child now).
        // SAFETY: killing and reaping what may hold the workload's pid.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            // SAFETY: reaping our children without blocking.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            assert!(
                Instant::now() < deadline,
                "pid {pid} still held after a killed restore"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = Counts::default();
        let what = if compact {
            "compact killed"
        } else {
            "restore killed"
        };
        attempt(&copy, None, &ctl, pid, what, &mut c);
        assert_eq!(
            c.restored_intact, 1,
            "after a {what} at a random instant: {c:?}"
        );
        let _ = std::fs::remove_dir_all(&copy);
    }
    eprintln!(
        "fault injection, restore and compact killed: {kills} kills ({cut} before they \
         finished, {finished} after), the chain restored intact after each"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
