//! Incremental checkpoints: each one holds exactly the pages written since
//! its parent; any checkpoint of a chain restores to exactly its epoch,
//! also after compaction and retention; layout changes between
//! checkpoints are reflected by each restore.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{compact, retain, Changes, Method, Session, SessionOptions};
use cr_ebpf_image::{pages::PageStore, Manifest};
use cr_ebpf_perf::{spawn_clean, stop, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const EPOCHS: &str = env!("CARGO_BIN_EXE_epochs");

/// The complete lines of the log.
fn lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete.lines().map(str::to_string).collect()
}

/// Waits for the `n`-th line starting with `prefix` and returns it.
fn wait_line(log: &Path, prefix: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: Vec<String> = lines(log)
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .collect();
        if found.len() >= n {
            return found[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {n}th {prefix:?} line in {}: {:?}",
            log.display(),
            lines(log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Workload {
    pid: i32,
    base: u64,
    log: PathBuf,
    epochs: usize,
    nows: usize,
}

impl Workload {
    fn start(dir: &Path, mib: usize, permille: usize, layout: bool) -> Self {
        let log = dir.join("epochs.log");
        let mut cmd = Command::new(EPOCHS);
        cmd.arg(&log).arg(mib.to_string()).arg(permille.to_string());
        if layout {
            cmd.arg("layout");
        }
        // Reaped by `stop` (waitpid on the pid).
        let pid = spawn_clean(&mut cmd).id() as i32;
        let ready = wait_line(&log, "ready", 1);
        let base = u64::from_str_radix(ready.split(' ').nth(4).unwrap(), 16).unwrap();
        Self {
            pid,
            base,
            log,
            epochs: 0,
            nows: 0,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0, "signal {sig}");
    }

    /// Runs the next epoch; returns (state, pages written).
    fn epoch(&mut self) -> (String, BTreeSet<u64>) {
        self.signal(libc::SIGUSR1);
        self.epochs += 1;
        let l = wait_line(&self.log, "epoch ", self.epochs);
        let (head, pages) = l.split_once(" pages ").unwrap();
        let state = head.split_once(' ').unwrap().1.split_once(' ').unwrap().1;
        let pages = pages
            .split(',')
            .filter_map(|p| p.parse::<u64>().ok())
            .map(|p| self.base + p * 4096)
            .collect();
        (state.to_string(), pages)
    }

    /// Asks for the current (epoch, state).
    fn now(&mut self) -> (u64, String) {
        self.signal(libc::SIGUSR2);
        self.nows += 1;
        let l = wait_line(&self.log, "now ", self.nows);
        let mut it = l.splitn(3, ' ');
        it.next();
        (
            it.next().unwrap().parse().unwrap(),
            it.next().unwrap().to_string(),
        )
    }
}

fn stored_pages(dir: &Path) -> BTreeSet<u64> {
    let store = PageStore::open(dir).unwrap();
    store
        .chunks()
        .iter()
        .flat_map(|c| (0..c.npages as u64).map(move |i| c.vaddr + i * 4096))
        .collect()
}

fn session(pid: i32, dir: &Path, tracked: bool) -> Session {
    let tracker = tracked.then(|| cr_ebpf_dirty_tracker::attach::attach(pid).expect("attach"));
    Session::new(pid, dir, tracker, SessionOptions::default()).expect("session")
}

#[test]
fn every_incremental_checkpoint_holds_exactly_the_written_pages() {
    if !cr_ebpf_perf::privileged("every_incremental_checkpoint_holds_exactly_the_written_pages") {
        return;
    }
    let scratch = Scratch::new("incr-exact");
    let dir = scratch.0.clone();
    let mut w = Workload::start(&dir, 64, 10, false);
    let _guard = KillOnDrop(w.pid);
    let images = dir.join("images");
    let region = w.base..w.base + (64 << 20);
    let mut s = session(w.pid, &images, true);
    let first = s.checkpoint(&Changes::all()).expect("first checkpoint");
    assert_eq!(first.method, Method::Full);
    assert!(first.pages >= 64 * 256, "the full image holds the region");
    for round in 1..=4 {
        let (_, written) = w.epoch();
        let r = s
            .checkpoint(&Changes::all())
            .expect("incremental checkpoint");
        assert_eq!(r.method, Method::UffdWp);
        assert!(r.inherited > 0, "unchanged mappings inherit");
        let stored = stored_pages(&r.dir);
        let in_region: BTreeSet<u64> = stored
            .iter()
            .copied()
            .filter(|a| region.contains(a))
            .collect();
        assert_eq!(
            in_region, written,
            "round {round}: exactly the written pages of the region are stored"
        );
        let extra = stored.len() - in_region.len();
        assert!(
            extra <= 64,
            "round {round}: {extra} pages stored outside the region (stack, libc)"
        );
        eprintln!(
            "round {round}: {} pages written, {} stored, freeze {:?}",
            written.len(),
            stored.len(),
            r.freeze
        );
    }
    // Pre-copy: pages written before it are copied while the process runs;
    // the checkpoint holds those and the ones written after, exactly.
    let (_, early) = w.epoch();
    let pre = s.precopy().expect("precopy");
    assert!(pre.pages >= early.len() as u64, "{pre:?}");
    let (_, late) = w.epoch();
    let r = s
        .checkpoint(&Changes::all())
        .expect("checkpoint after pre-copy");
    let stored: BTreeSet<u64> = stored_pages(&r.dir)
        .into_iter()
        .filter(|a| region.contains(a))
        .collect();
    let both: BTreeSet<u64> = early.union(&late).copied().collect();
    assert_eq!(stored, both, "pre-copied and later pages, nothing else");
    assert!(
        r.precopied >= early.difference(&late).count() as u64,
        "pages not written again come from the pre-copy: {r:?}"
    );
    // No tracker: a standalone checkpoint compares contents with the chain
    // and finds the same pages.
    drop(s);
    let (_, written) = w.epoch();
    let mut standalone = session(w.pid, &images, false);
    let r = standalone
        .checkpoint(&Changes::all())
        .expect("hashing checkpoint");
    assert_eq!(r.method, Method::Hashing);
    let stored: BTreeSet<u64> = stored_pages(&r.dir)
        .into_iter()
        .filter(|a| region.contains(a))
        .collect();
    assert_eq!(stored, written, "hashing finds exactly the written pages");
    stop(w.pid);
}

fn restore_and_check(images: &Path, name: &str, want: &str, log: &Path, nows: &mut usize) {
    let r = restore(
        images,
        &RestoreOptions {
            checkpoint: Some(name.to_string()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("restore {name}: {e:?}"));
    let _guard = KillOnDrop(r.pid);
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(r.pid, libc::SIGUSR2) };
    *nows += 1;
    let l = wait_line(log, "now ", *nows);
    let state = l.splitn(3, ' ').nth(2).unwrap();
    assert_eq!(state, want, "{name} restores the state of its epoch");
    stop(r.pid);
}

#[test]
fn any_checkpoint_of_a_gibibyte_chain_restores_its_epoch() {
    if !cr_ebpf_perf::privileged("any_checkpoint_of_a_gibibyte_chain_restores_its_epoch") {
        return;
    }
    let scratch = Scratch::needing("incr-chain", 3);
    let dir = scratch.0.clone();
    let mut w = Workload::start(&dir, 1024, 10, false);
    let guard = KillOnDrop(w.pid);
    let images = dir.join("images");
    let mut s = session(w.pid, &images, true);
    // The base is pre-copied while the workload runs.
    let primed = s.prime().expect("prime");
    assert!(primed.pages >= 1024 * 256, "{primed:?}");
    let mut states = Vec::new();
    for k in 1..=20 {
        if k % 4 == 0 {
            // Some checkpoints are preceded by a pre-copy pass, with more
            // writes after it: restores must show the newest contents.
            w.epoch();
            let pre = s.precopy().expect("precopy");
            assert!(pre.pages > 0);
        }
        let (state, _) = w.epoch();
        let r = s.checkpoint(&Changes::all()).expect("checkpoint");
        assert_eq!(r.seq, k as u64);
        states.push((r.name.clone(), state));
    }
    drop(s);
    stop(w.pid);
    drop(guard);
    let mut nows = w.nows;
    for k in [1usize, 7, 20] {
        let (name, state) = &states[k - 1];
        restore_and_check(&images, name, state, &w.log, &mut nows);
    }
    // Compaction rewrites checkpoint 12 as a full image, same contents.
    let c = compact(&images, &states[11].0, 0).expect("compact");
    assert_eq!(c.chain_len, 12);
    let m = Manifest::read(&images.join(&states[11].0)).unwrap();
    assert_eq!(m.chain.as_ref().unwrap().parent, "", "a full base now");
    restore_and_check(&images, &states[11].0, &states[11].1, &w.log, &mut nows);
    restore_and_check(&images, &states[15].0, &states[15].1, &w.log, &mut nows);
    // Retention keeps the newest five; they stay restorable.
    let r = retain(&images, 5, 0).expect("retain");
    assert_eq!(r.deleted.len(), 15);
    assert_eq!(r.kept.len(), 5);
    assert!(!images.join(&states[6].0).exists());
    for k in [16usize, 18, 20] {
        let (name, state) = &states[k - 1];
        restore_and_check(&images, name, state, &w.log, &mut nows);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn maps_unmaps_opens_and_closes_between_checkpoints_are_restored() {
    if !cr_ebpf_perf::privileged("maps_unmaps_opens_and_closes_between_checkpoints_are_restored") {
        return;
    }
    let scratch = Scratch::new("incr-layout");
    let dir = scratch.0.clone();
    let mut w = Workload::start(&dir, 16, 20, true);
    let guard = KillOnDrop(w.pid);
    let images = dir.join("images");
    let mut s = session(w.pid, &images, true);
    let mut states = Vec::new();
    for _ in 1..=9 {
        let (state, _) = w.epoch();
        let r = s.checkpoint(&Changes::all()).expect("checkpoint");
        states.push((r.name.clone(), state));
    }
    // The states differ in their layout, not only in memory.
    assert!(states[2].1.contains('+') && states[5].1.contains('='));
    drop(s);
    let (epoch, now) = w.now();
    assert_eq!((epoch, &now), (9, &states[8].1));
    stop(w.pid);
    drop(guard);
    let mut nows = w.nows;
    for k in [2usize, 3, 4, 5, 6, 8, 9] {
        let (name, state) = &states[k - 1];
        restore_and_check(&images, name, state, &w.log, &mut nows);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What checkpoint `dir` restores to: its mappings and every page's address
/// and content, as one hash.
fn resolved_digest(dir: &Path) -> u64 {
    let chain =
        cr_ebpf_image::Chain::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut pages: Vec<(u64, u64)> = Vec::new();
    let mut buf = Vec::new();
    for f in chain.fills() {
        chain
            .read(
                f,
                &mut buf,
                |addr, bytes| {
                    for (i, p) in bytes.chunks_exact(4096).enumerate() {
                        pages.push((addr + i as u64 * 4096, cr_ebpf_checkpoint::page_hash(p)));
                    }
                    Ok::<(), String>(())
                },
                |e| e,
            )
            .unwrap();
    }
    pages.sort_unstable();
    let m = chain.manifest();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |v: u64| h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
    for x in &m.mappings {
        mix(x.start);
        mix(x.end);
        mix(x.pages_stored);
    }
    for (a, p) in pages {
        mix(a);
        mix(p);
    }
    h
}

#[test]
fn killing_compaction_at_any_moment_leaves_every_checkpoint_as_it_was() {
    if !cr_ebpf_perf::privileged(
        "killing_compaction_at_any_moment_leaves_every_checkpoint_as_it_was",
    ) {
        return;
    }
    let cr = Path::new(EPOCHS).with_file_name("cr-ebpf");
    if !cr.exists() {
        assert!(
            !cr_ebpf_perf::in_ci(),
            "{} missing: build the workspace",
            cr.display()
        );
        eprintln!(
            "SKIPPED: {} not built (run `cargo xtask test`)",
            cr.display()
        );
        return;
    }
    let scratch = Scratch::new("incr-compact-kill");
    let dir = scratch.0.clone();
    let mut w = Workload::start(&dir, 64, 50, false);
    let guard = KillOnDrop(w.pid);
    let images = dir.join("images");
    let mut s = session(w.pid, &images, true);
    for _ in 0..6 {
        w.epoch();
        s.checkpoint(&Changes::all()).expect("checkpoint");
    }
    drop(s);
    stop(w.pid);
    drop(guard);
    let names: Vec<String> = cr_ebpf_image::images_dir::list(&images)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let before: Vec<u64> = names
        .iter()
        .map(|n| resolved_digest(&images.join(n)))
        .collect();
    // Kill `compact` ever later, until one run completes.
    let mut completed = false;
    for delay_ms in [1u64, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 5000] {
        let mut c = Command::new(&cr)
            .args(["compact", "--checkpoint", "ckpt-000006", "--images-dir"])
            .arg(&images)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let finished = c.try_wait().unwrap().is_some();
        let _ = c.kill();
        let _ = c.wait();
        for (n, want) in names.iter().zip(&before) {
            assert_eq!(
                resolved_digest(&images.join(n)),
                *want,
                "{n} unchanged after compact was killed at {delay_ms} ms"
            );
        }
        if finished {
            eprintln!("compact completed within {delay_ms} ms; killed before that");
            completed = true;
            break;
        }
    }
    assert!(completed, "compaction never finished");
    let m = Manifest::read(&images.join("ckpt-000006")).unwrap();
    assert_eq!(m.chain.unwrap().method, "compacted");
    // What interrupted runs left behind is hidden, and cleaned up.
    cr_ebpf_checkpoint::clean_leftovers(&images).unwrap();
    let hidden: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".lock")
        .collect();
    assert!(hidden.is_empty(), "left over: {hidden:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
