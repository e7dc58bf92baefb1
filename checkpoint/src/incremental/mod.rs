//! Incremental checkpoints into an images directory.
//!
//! A [`Session`] keeps a dirty tracker attached to each process of a tree
//! (a process and its descendants) between checkpoints. Each
//! [`Session::checkpoint`] stops every process of the tree, collects their
//! state, and stores only what changed since the previous checkpoint:
//!
//! * a mapping that is the same as in the parent (same range, protection,
//!   backing) and stayed registered with the tracker the whole time is
//!   *inherited*: only the pages `PAGEMAP_SCAN` reports written are stored,
//!   the rest live in the parent. A mapping that was replaced in between is
//!   no longer registered, which the scan reports, so it cannot be mistaken
//!   for the old one;
//! * any other mapping is stored whole (its present pages) and registered;
//! * a process that was not in the parent checkpoint (a child forked since,
//!   or a pid now used by another process) is stored whole.
//!
//! A checkpoint of a process without children is a single image; with
//! children it is the image of a tree (`tree.img`, one `proc-PID/` per live
//! process), whose process images each name the parent checkpoint.
//!
//! Pages are copied into memory while the tree is frozen and compressed
//! and written after it runs again, so the pause is the copy, not the disk.
//! [`Session::precopy`] copies the pages written so far while the processes
//! run (and re-arms them), so the freeze only copies what was written after.
//!
//! Without a tracker (a standalone `snapshot`), pages are compared by
//! content with what the chain holds ([`Method::Hashing`]).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cr_ebpf_dirty_tracker::uffd_wp::WpTracker;
use cr_ebpf_image::{images_dir, publish, ChainInfo, ImageError, Manifest, MAP_INHERITS};
use rayon::prelude::*;

mod baseline;
mod memory;

pub use baseline::page_hash;
use baseline::Baseline;
use memory::{
    copy_runs, forget, merge_pages, plan_pages, prime_one, recount, Plan, Proc, Registered,
};

use crate::{
    fds::{check_tree as check_unix_pairs, TreeScope},
    freeze, monotonic_ns, pages,
    pages::{split_runs, worker_pool},
    state::{self, Changes, Queries},
    DumpError,
};

pub(super) const PAGE: u64 = 4096;

/// How pages that changed were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// No parent: every present page stored.
    Full,
    /// userfaultfd write-protect + `PAGEMAP_SCAN`.
    UffdWp,
    /// Content compared with the chain.
    Hashing,
}

impl Method {
    /// The name recorded in the image.
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::UffdWp => "uffd-wp",
            Method::Hashing => "hashing",
        }
    }
}

/// Options of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Threads copying and compressing pages (0: all cores).
    pub threads: usize,
    /// Most bytes copied into memory during a freeze; above that, pages are
    /// compressed while the processes stay frozen, as a full dump does.
    pub buffer_budget: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            buffer_budget: 2 << 30,
        }
    }
}

/// What the resource log saw since the previous checkpoint, per process.
#[derive(Debug, Clone)]
pub struct TreeChanges {
    /// Processes the log speaks of.
    pub by_pid: HashMap<i32, Changes>,
    /// Any other process of the tree.
    pub rest: Changes,
}

impl TreeChanges {
    /// The same for every process.
    pub fn same(changes: Changes) -> Self {
        Self {
            by_pid: HashMap::new(),
            rest: changes,
        }
    }

    /// What changed in process `pid`.
    pub fn of(&self, pid: i32) -> &Changes {
        self.by_pid.get(&pid).unwrap_or(&self.rest)
    }
}

/// What [`Session::follow`] did.
#[derive(Debug, Clone, Default)]
pub struct Followed {
    /// Processes new to the session or given a tracker now: those whose
    /// memory is worth pre-copying ([`Session::prime`]).
    pub new: Vec<i32>,
    /// Processes left alone for now, younger than asked.
    pub too_young: usize,
}

/// What one checkpoint did.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    /// Its name in the images directory.
    pub name: String,
    /// Its number.
    pub seq: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// The parent's name (`None` for a full image).
    pub parent: Option<String>,
    /// How changed pages were found.
    pub method: Method,
    /// Live processes in it (1 without children).
    pub processes: usize,
    /// Of which stored whole because the parent did not have them.
    pub new_processes: usize,
    /// Zombies in it (recorded with their exit status).
    pub zombies: usize,
    /// Pages stored in this image.
    pub pages: u64,
    /// Of which copied before the freeze.
    pub precopied: u64,
    /// Bytes of the page store on disk.
    pub page_bytes: u64,
    /// Mappings whose unchanged pages live in the parent.
    pub inherited: usize,
    /// Mappings stored whole.
    pub whole: usize,
    /// First thread stopped until the last resumed.
    pub freeze: Duration,
    /// The whole checkpoint, until the image was published.
    pub total: Duration,
    /// Injected queries made and avoided.
    pub queries: Queries,
    /// Where the freeze went: stopping the threads, collecting state,
    /// finding dirty pages, copying them, resuming.
    pub phases: Phases,
    /// `CLOCK_MONOTONIC` ns from the moment every thread was stopped to the
    /// moment they were resumed. Syscalls the resource log shows the
    /// processes making inside this window are the ones we injected.
    pub stopped_window: (u64, u64),
}

/// A breakdown of one freeze.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    /// Stopping every thread.
    pub stop: Duration,
    /// Registers, descriptors, maps and the rest of the state.
    pub collect: Duration,
    /// Scanning for dirty pages (and registering new mappings).
    pub scan: Duration,
    /// Copying the pages out.
    pub copy: Duration,
    /// Resuming every thread.
    pub resume: Duration,
}

/// What a pre-copy pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecopyReport {
    /// Pages copied.
    pub pages: u64,
    /// Time it took (the processes kept running).
    pub took: Duration,
}

/// The checkpoint the next one builds on.
struct Parent {
    name: String,
    seq: u64,
    /// Its image of each process, with the process's start time when this
    /// session took it (unknown for a checkpoint found on disk).
    images: HashMap<i32, (Manifest, Option<u64>)>,
}

/// An incremental checkpointing session on a process and its descendants.
pub struct Session {
    root: i32,
    dir: PathBuf,
    /// Whether processes get a uffd-wp tracker (else pages are compared by
    /// content).
    uffd: bool,
    procs: BTreeMap<i32, Proc>,
    parent: Option<Parent>,
    pool: rayon::ThreadPool,
    opts: SessionOptions,
}

pub(super) fn image_io(what: &'static str, path: String, e: impl std::fmt::Display) -> ImageError {
    ImageError::Io {
        path,
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

impl Session {
    /// Starts a session on `pid` (and its descendants, whenever it has
    /// some) writing into the images directory `dir` (created if needed).
    /// With `tracker` (the root's: see `cr_ebpf_dirty_tracker::attach`),
    /// pages are found by uffd-wp, and every descendant gets a tracker of
    /// its own as it is found; without, by content. The first checkpoint's
    /// parent is the newest checkpoint of the same pid already in `dir`
    /// (compared by content), else it is a full image.
    pub fn new(
        pid: i32,
        dir: &Path,
        tracker: Option<WpTracker>,
        opts: SessionOptions,
    ) -> Result<Self, DumpError> {
        if pid == std::process::id() as i32 {
            return Err(DumpError::NotSupported {
                pid,
                what: "cr-ebpf cannot checkpoint itself".into(),
            });
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| image_io("creating", dir.display().to_string(), e))?;
        let pool = worker_pool(pid, opts.threads, "ckpt-worker")?;
        let mut s = Self {
            root: pid,
            dir: dir.to_path_buf(),
            uffd: tracker.is_some(),
            procs: BTreeMap::new(),
            parent: None,
            pool,
            opts,
        };
        let start_time = freeze::stat(pid)?.start_time;
        s.procs.insert(pid, Proc::new(pid, start_time, tracker));
        if let Some(newest) = images_dir::list(dir)?.pop() {
            let mut images = HashMap::new();
            let mut chained = true;
            for (p, image) in images_dir::processes(&newest.dir)? {
                let m = Manifest::read(&image)?;
                chained &= m.chain.is_some();
                images.insert(p, (m, None));
            }
            let root = images_dir::root_pid(&newest.dir)?;
            if root == pid && chained {
                s.parent = Some(Parent {
                    name: newest.name,
                    seq: newest.seq,
                    images,
                });
            }
        }
        Ok(s)
    }

    /// Replaces the dirty tracker of process `pid`, after it replaced its
    /// memory (`execve`): the old one watches an address space that is
    /// gone. Everything of it is stored whole by the next checkpoint.
    pub fn replace_tracker(&mut self, pid: i32, tracker: Option<WpTracker>) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.wp = tracker;
            p.reset();
        }
    }

    /// Gives every live process of the tree that has run for at least
    /// `min_age` and has none yet a dirty tracker (attached while it runs),
    /// and forgets processes that are gone. Younger ones are left alone (a
    /// short-lived child costs nothing; one alive at a checkpoint is stored
    /// whole).
    pub fn follow(&mut self, min_age: Duration) -> Followed {
        let mut new = Vec::new();
        let mut too_young = 0;
        let pids = freeze::processes(self.root);
        self.procs.retain(|p, _| pids.contains(p));
        let now = freeze::uptime_ticks();
        let min_ticks = (min_age.as_secs_f64() * freeze::clock_ticks() as f64).ceil() as u64;
        for pid in pids {
            let Ok(st) = freeze::stat(pid) else { continue };
            if st.state == 'Z' {
                self.procs.remove(&pid);
                continue;
            }
            if pid != self.root && now.saturating_sub(st.start_time) < min_ticks {
                too_young += 1;
                continue;
            }
            let known = self
                .procs
                .get(&pid)
                .is_some_and(|p| p.start_time == st.start_time);
            if !known {
                self.procs.insert(pid, Proc::new(pid, st.start_time, None));
                new.push(pid);
            }
            let p = self.procs.get_mut(&pid).expect("inserted");
            if self.uffd && p.wp.is_none() {
                // A process that cannot be attached (it is exiting, say) is
                // stored whole, and tried again next time.
                p.wp = cr_ebpf_dirty_tracker::attach::attach(pid).ok();
                if p.wp.is_some() && known {
                    new.push(pid);
                }
            }
        }
        Followed { new, too_young }
    }

    /// The processes followed.
    pub fn pids(&self) -> Vec<i32> {
        self.procs.keys().copied().collect()
    }

    /// Lets go of the held connections process `pid` had on descriptors
    /// `fds` (it closed or replaced them): holding one would delay the
    /// peer's FIN.
    pub fn release_connections(&mut self, pid: i32, fds: std::ops::RangeInclusive<i32>) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.connections.retain(|(n, _)| !fds.contains(n));
        }
    }

    /// The processes died: their established TCP connections, kept open by
    /// the duplicates this session holds since the newest checkpoint (so
    /// the kernel sent the peers neither FIN nor RST), are put in repair
    /// mode and closed, which closes them silently. A tree restored from
    /// that checkpoint then re-establishes them with `TCP_REPAIR`, and the
    /// peers carry on (if no byte moved on a connection since the
    /// checkpoint). Returns how many.
    pub fn silence_connections(&mut self) -> usize {
        let mut n = 0;
        for p in self.procs.values_mut() {
            n += p.connections.len();
            for (_, sock) in p.connections.drain(..) {
                let _ = cr_ebpf_resources::fd::socket::tcp::repair_mode(&sock, true);
            }
        }
        n
    }

    /// Makes the next checkpoint a full image (no parent).
    pub fn start_new_chain(&mut self) {
        self.parent = None;
    }

    /// The process at the root of the tree.
    pub fn pid(&self) -> i32 {
        self.root
    }

    /// The images directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers `range` of process `pid` with its tracker as soon as the
    /// resource log reports a new mapping there, so the freeze does not
    /// have to. Its pages are stored whole by the next checkpoint all the
    /// same.
    pub fn register_early(&mut self, pid: i32, start: u64, end: u64) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        let Some(wp) = &p.wp else { return };
        let (start, end) = (start & !(PAGE - 1), (end + PAGE - 1) & !(PAGE - 1));
        if start >= end {
            return;
        }
        forget(&mut p.registered, &mut p.precopied, start, end);
        if wp.register(start..end).is_ok() {
            p.registered.insert(
                start,
                Registered {
                    end,
                    stored: false,
                    primed: false,
                },
            );
        }
    }

    /// Registers every mapping of the processes followed (see
    /// [`Session::follow`]) not registered yet and copies its present pages
    /// while the processes run, so the next checkpoint only copies, during
    /// its freeze, the pages written after that (the first, full checkpoint
    /// included). Returns what was copied.
    pub fn prime(&mut self) -> Result<PrecopyReport, DumpError> {
        let t = Instant::now();
        if !self.uffd {
            return Ok(PrecopyReport::default());
        }
        let mut pages = 0;
        let pids = self.pids();
        for pid in pids {
            let Some(p) = self.procs.get_mut(&pid) else {
                continue;
            };
            match prime_one(p) {
                Ok(work) => pages += copy_runs(&self.pool, p, &work),
                // A descendant that exited or replaced its memory meanwhile:
                // whatever it is now is stored whole by the next checkpoint.
                Err(_) if pid != self.root => p.reset(),
                // Gone meanwhile: the next checkpoint will not find it.
                Err(_) if freeze::stat(pid).is_err() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(PrecopyReport {
            pages,
            took: t.elapsed(),
        })
    }

    /// Copies the pages written since the last scan while the processes
    /// run, re-arming them, so the next freeze copies only pages written
    /// after.
    pub fn precopy(&mut self) -> Result<PrecopyReport, DumpError> {
        let t = Instant::now();
        let mut pages = 0;
        for p in self.procs.values_mut() {
            let Some(wp) = &p.wp else { continue };
            let mut runs = Vec::new();
            let mut broken = Vec::new();
            for (&start, r) in &p.registered {
                // Early registrations hold pages nobody copied yet: those
                // mappings are stored whole anyway.
                if !r.stored && !r.primed {
                    continue;
                }
                let before = runs.len();
                if wp.scan(start..r.end, &mut runs).is_err() {
                    runs.truncate(before);
                    broken.push((start, r.end));
                }
            }
            for (s, e) in broken {
                p.forget(s, e);
            }
            let mut work = Vec::new();
            split_runs(
                &runs
                    .iter()
                    .map(|r| (r.start, (r.end - r.start) / PAGE))
                    .collect::<Vec<_>>(),
                &mut work,
            );
            pages += copy_runs(&self.pool, p, &work);
        }
        Ok(PrecopyReport {
            pages,
            took: t.elapsed(),
        })
    }

    /// Takes an incremental checkpoint now. `changes` is what the resource
    /// log saw since the previous one, the same for every process
    /// ([`Changes::all`] when unknown). On failure the processes run on
    /// untouched, nothing is published, and the next checkpoint stores
    /// every mapping whole.
    pub fn checkpoint(&mut self, changes: &Changes) -> Result<CheckpointReport, DumpError> {
        self.checkpoint_with(|| TreeChanges::same(changes.clone()))
    }

    /// Like [`Session::checkpoint`], with the changes asked for once the
    /// processes are frozen, so that a log read then covers everything
    /// they did before the checkpoint.
    pub fn checkpoint_with(
        &mut self,
        changes: impl FnOnce() -> TreeChanges,
    ) -> Result<CheckpointReport, DumpError> {
        let r = self.checkpoint_inner(changes);
        if r.is_err() {
            for p in self.procs.values_mut() {
                p.reset();
            }
        }
        r
    }

    fn checkpoint_inner(
        &mut self,
        changes: impl FnOnce() -> TreeChanges,
    ) -> Result<CheckpointReport, DumpError> {
        let start = Instant::now();
        let root = self.root;
        let _lock = images_dir::lock(&self.dir)?;
        let seq = images_dir::list(&self.dir)?
            .last()
            .map_or(1, |e| e.seq + 1)
            .max(self.parent.as_ref().map_or(1, |p| p.seq + 1));
        let name = images_dir::checkpoint_name(seq);
        let dest = self.dir.join(&name);
        let method = match (&self.parent, self.uffd) {
            (None, _) => Method::Full,
            (Some(_), true) => Method::UffdWp,
            (Some(_), false) => Method::Hashing,
        };

        // Content comparison needs the chain's pages: read before freezing,
        // for every process of the parent checkpoint still in the tree.
        let mut baselines: HashMap<i32, Baseline> = HashMap::new();
        if let (false, Some(parent)) = (self.uffd, &self.parent) {
            let ckpt = self.dir.join(&parent.name);
            for pid in freeze::processes(root) {
                if parent.images.contains_key(&pid) {
                    if let Some(image) = images_dir::process_image(&ckpt, pid)? {
                        baselines.insert(pid, Baseline::load(&image, &self.pool)?);
                    }
                }
            }
        }

        let t0 = Instant::now();
        let mut frozen = freeze::freeze_tree(root)?;
        let tree_img = std::mem::take(&mut frozen.tree);
        let mut window = (monotonic_ns(), 0);
        let mut phases = Phases {
            stop: t0.elapsed(),
            ..Default::default()
        };
        let t = Instant::now();
        let changes = changes();
        let is_tree = tree_img.processes.len() > 1;
        let live: Vec<i32> = frozen.frozen.iter().map(|f| f.pid()).collect();
        // Processes that are not the ones followed so far (new, or a pid
        // reused) start afresh.
        self.procs.retain(|p, _| live.contains(p));
        for (f, &st) in frozen.frozen.iter().zip(&frozen.start_times) {
            let pid = f.pid();
            if self.procs.get(&pid).is_none_or(|p| p.start_time != st) {
                self.procs.insert(pid, Proc::new(pid, st, None));
            }
            if let Some(wp) = &mut self.procs.get_mut(&pid).expect("inserted").wp {
                // The address space as it is now (it may have been replaced
                // by an execve the log has not shown us yet).
                wp.reopen_pagemap().map_err(|e| DumpError::NotSupported {
                    pid,
                    what: format!("reopening its pagemap: {e}"),
                })?;
            }
        }
        let mut scope = is_tree.then(|| TreeScope::new(&live));
        let mut plans: Vec<Plan> = Vec::new();
        let mut queries = Queries::default();
        for (f, &st) in frozen.frozen.iter().zip(&frozen.start_times) {
            let pid = f.pid();
            let parent = self
                .parent
                .as_ref()
                .and_then(|p| p.images.get(&pid))
                .filter(|(m, _)| m.chain.is_some());
            // Earlier answers hold only for the very same process.
            let prev = parent.filter(|(_, when)| *when == Some(st)).map(|(m, _)| m);
            let state = state::collect_in(f, prev, changes.of(pid), scope.as_mut())?;
            queries.injected += state.queries.injected;
            queries.reused += state.queries.reused;
            let parent = parent.map(|(m, _)| m);
            plans.push(Plan {
                pid,
                state,
                parent,
                mappings: Vec::new(),
                live: Vec::new(),
                reuse: Vec::new(),
                buffered: Vec::new(),
                baseline: parent.and_then(|_| baselines.remove(&pid)),
                inherited: 0,
                whole: 0,
            });
        }
        if is_tree {
            let all: Vec<(i32, &[cr_ebpf_image::FdInfo])> =
                plans.iter().map(|p| (p.pid, &p.state.fds[..])).collect();
            check_unix_pairs(&all)?;
        }
        phases.collect = t.elapsed();

        let t = Instant::now();
        for plan in &mut plans {
            let p = self.procs.get_mut(&plan.pid).expect("followed above");
            plan_pages(p, plan, changes.of(plan.pid))?;
        }
        phases.scan = t.elapsed();

        let t = Instant::now();
        // Copy while frozen when it fits in memory: the disk comes after.
        let bytes: u64 = plans.iter().flat_map(|p| &p.live).map(|r| r.1 * PAGE).sum();
        let mut frozen = Some(frozen);
        let mut freeze = Duration::ZERO;
        if bytes <= self.opts.buffer_budget {
            let work: Vec<(usize, u64, u64)> = plans
                .iter()
                .enumerate()
                .flat_map(|(i, p)| p.live.iter().map(move |&(a, n)| (i, a, n)))
                .collect();
            let copied = self.pool.install(|| {
                work.par_iter()
                    .map(|&(i, addr, n)| {
                        let pid = plans[i].pid;
                        let mut b = vec![0u8; (n * PAGE) as usize];
                        cr_ebpf_tracee::read_memory(pid, addr, &mut b)
                            .map(|()| (i, addr, b))
                            .map_err(|source| DumpError::Trace { pid, source })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
            for (i, addr, b) in copied {
                plans[i].buffered.push((addr, b));
            }
            for p in &mut plans {
                p.live.clear();
            }
            phases.copy = t.elapsed();
            let t = Instant::now();
            window.1 = monotonic_ns();
            let f = frozen.take().expect("frozen");
            let since = f.since();
            f.thaw()?;
            freeze = since.elapsed();
            phases.resume = t.elapsed();
        }
        let mut precopied = 0u64;
        for plan in &mut plans {
            let p = self.procs.get_mut(&plan.pid).expect("followed above");
            // Content comparison: keep only pages that differ from the chain.
            if let Some(b) = &plan.baseline {
                let inheriting: Vec<(u64, u64)> = plan
                    .mappings
                    .iter()
                    .filter(|m| m.flags & MAP_INHERITS != 0)
                    .map(|m| (m.start, m.end))
                    .collect();
                let inherits = |a: u64| {
                    let i = inheriting.partition_point(|r| r.1 <= a);
                    inheriting.get(i).is_some_and(|r| r.0 <= a)
                };
                let mut kept = Vec::new();
                for (addr, data) in plan.buffered.drain(..) {
                    for (i, pg) in data.chunks_exact(PAGE as usize).enumerate() {
                        let a = addr + i as u64 * PAGE;
                        if !inherits(a) || b.hashes.get(&a) != Some(&page_hash(pg)) {
                            kept.push((a, pg.to_vec()));
                        }
                    }
                }
                plan.buffered = merge_pages(kept);
                recount(&mut plan.mappings, &plan.buffered);
            }
            for a in &plan.reuse {
                if let Some(pg) = p.precopied.remove(a) {
                    plan.buffered.push((*a, pg));
                }
            }
            precopied += plan.reuse.len() as u64;
            p.precopied.clear();
        }

        let parent_name = self.parent.as_ref().map(|p| p.name.clone());
        let pool = &self.pool;
        let n = plans.len();
        let (pages, page_bytes, manifests) = publish(&dest, |tmp| {
            if is_tree {
                tree_img.write(tmp)?;
            }
            let procs = plans
                .iter_mut()
                .map(|p| (p.pid, &p.live[..], std::mem::take(&mut p.buffered)))
                .collect();
            let (dirs, pages, page_bytes) =
                pages::write_processes(tmp, is_tree, pool, procs, || {
                    // Everything read: the tree may run again.
                    if let Some(f) = frozen.take() {
                        window.1 = monotonic_ns();
                        let since = f.since();
                        f.thaw().map_err(|e| {
                            image_io("resuming", format!("process tree of {root}"), e)
                        })?;
                        freeze = since.elapsed();
                    }
                    Ok(())
                })?;
            let mut manifests = Vec::new();
            for (plan, sub) in plans.iter_mut().zip(&dirs) {
                let chain = ChainInfo {
                    id: name.clone(),
                    parent: match (&plan.parent, &parent_name) {
                        (Some(_), Some(p)) => p.clone(),
                        _ => String::new(),
                    },
                    seq,
                    method: if plan.parent.is_some() {
                        method.name()
                    } else {
                        Method::Full.name()
                    }
                    .into(),
                };
                let manifest = plan.state.manifest(
                    std::mem::take(&mut plan.mappings),
                    freeze.as_nanos() as u64,
                    Some(chain),
                );
                manifest.write(sub)?;
                manifests.push(manifest);
            }
            Ok((pages, page_bytes, manifests))
        })?;
        let mut images = HashMap::new();
        let (mut inherited, mut whole, mut new_processes) = (0, 0, 0);
        for (plan, manifest) in plans.iter_mut().zip(manifests) {
            inherited += plan.inherited;
            whole += plan.whole;
            new_processes += usize::from(plan.parent.is_none() && self.parent.is_some());
            let p = self.procs.get_mut(&plan.pid).expect("followed above");
            for r in p.registered.values_mut() {
                r.stored = true;
                r.primed = false;
            }
            p.connections = std::mem::take(&mut plan.state.tcp);
            images.insert(plan.pid, (manifest, Some(p.start_time)));
        }
        self.parent = Some(Parent {
            name: name.clone(),
            seq,
            images,
        });
        Ok(CheckpointReport {
            name,
            seq,
            dir: dest,
            parent: parent_name,
            method,
            processes: n,
            new_processes,
            zombies: tree_img
                .processes
                .iter()
                .filter(|p| p.zombie.is_some())
                .count(),
            pages,
            precopied,
            page_bytes,
            inherited,
            whole,
            freeze,
            total: start.elapsed(),
            queries,
            phases,
            stopped_window: window,
        })
    }
}
