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

use cr_ebpf_dirty_tracker::uffd_wp::{WpError, WpTracker};
use cr_ebpf_image::{
    images_dir, publish, Chain, ChainInfo, ImageError, Manifest, MappingInfo, MappingKind,
    MAP_INHERITS,
};
use rayon::prelude::*;

use crate::{
    dump::{split_runs, worker_pool, write_pages},
    fds::{check_unix_pairs, TreeScope},
    maps::{self, MapEntry},
    state::{self, proc_err, Changes, Queries, State},
    tree, DumpError,
};

const PAGE: u64 = 4096;

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

#[derive(Debug, Clone, Copy)]
struct Registered {
    end: u64,
    /// Whether every page written before the registration is in a
    /// published image (false until the checkpoint after registering).
    stored: bool,
    /// Whether every page present at registration was pre-copied since.
    primed: bool,
}

/// The checkpoint the next one builds on.
struct Parent {
    name: String,
    seq: u64,
    /// Its image of each process, with the process's start time when this
    /// session took it (unknown for a checkpoint found on disk).
    images: HashMap<i32, (Manifest, Option<u64>)>,
}

/// What a session keeps about one process between checkpoints.
struct Proc {
    pid: i32,
    /// Its start time: the same pid with another one is another process.
    start_time: u64,
    wp: Option<WpTracker>,
    registered: BTreeMap<u64, Registered>,
    precopied: BTreeMap<u64, Vec<u8>>,
    /// The established TCP connections of the newest checkpoint, held open
    /// (see [`Session::silence_connections`]), by descriptor number.
    connections: Vec<(i32, std::os::fd::OwnedFd)>,
}

impl Proc {
    fn new(pid: i32, start_time: u64, wp: Option<WpTracker>) -> Self {
        Self {
            pid,
            start_time,
            wp,
            registered: BTreeMap::new(),
            precopied: BTreeMap::new(),
            connections: Vec::new(),
        }
    }

    fn forget(&mut self, start: u64, end: u64) {
        forget(&mut self.registered, &mut self.precopied, start, end);
    }

    /// Pages may have been re-armed without being stored.
    fn reset(&mut self) {
        self.registered.clear();
        self.precopied.clear();
    }
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

fn image_io(what: &'static str, path: String, e: impl std::fmt::Display) -> ImageError {
    ImageError::Io {
        path,
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// What one process's checkpoint stores, planned while frozen.
struct Plan {
    pid: i32,
    state: State,
    /// Its image in the parent checkpoint, when it was there.
    parent: Option<Manifest>,
    mappings: Vec<MappingInfo>,
    /// Runs to read from the process.
    live: Vec<(u64, u64)>,
    /// Pre-copied pages still valid.
    reuse: Vec<u64>,
    /// Pages read already.
    buffered: Vec<(u64, Vec<u8>)>,
    baseline: Option<Baseline>,
    inherited: usize,
    whole: usize,
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
        let start_time = tree::stat(pid)?.start_time;
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
        let pids = tree::processes(self.root);
        self.procs.retain(|p, _| pids.contains(p));
        let now = tree::uptime_ticks();
        let min_ticks = (min_age.as_secs_f64() * tree::clock_ticks() as f64).ceil() as u64;
        for pid in pids {
            let Ok(st) = tree::stat(pid) else { continue };
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
                let _ = crate::sockets::setsockopt_int(
                    &sock,
                    libc::IPPROTO_TCP,
                    crate::sockets::TCP_REPAIR,
                    1,
                );
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
                Err(_) if tree::stat(pid).is_err() => {}
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

        let t0 = Instant::now();
        let frozen = tree::freeze_tree(root)?;
        let tree_img = frozen.tree.clone();
        let mut window = (monotonic_ns(), 0);
        let mut phases = Phases {
            stop: t0.elapsed(),
            ..Default::default()
        };
        let t = Instant::now();
        let changes = changes();
        let is_tree = frozen.tree.processes.len() > 1;
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
            plans.push(Plan {
                pid,
                state,
                parent: parent.map(|(m, _)| m.clone()),
                mappings: Vec::new(),
                live: Vec::new(),
                reuse: Vec::new(),
                buffered: Vec::new(),
                baseline: None,
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

        // Content comparison needs the chain's pages.
        if !self.uffd {
            if let Some(parent) = &self.parent {
                let ckpt = self.dir.join(&parent.name);
                for plan in plans.iter_mut().filter(|p| p.parent.is_some()) {
                    if let Some(image) = images_dir::process_image(&ckpt, plan.pid)? {
                        plan.baseline = Some(Baseline::load(&image, &self.pool)?);
                    }
                }
            }
        }

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
            let (mut pages, mut page_bytes) = (0, 0);
            let mut dirs = Vec::new();
            for (i, plan) in plans.iter_mut().enumerate() {
                let sub = if is_tree {
                    let sub = tmp.join(format!("proc-{}", plan.pid));
                    std::fs::create_dir(&sub)
                        .map_err(|e| image_io("creating", sub.display().to_string(), e))?;
                    sub
                } else {
                    tmp.to_path_buf()
                };
                let buffered = std::mem::take(&mut plan.buffered);
                let (p, b) = write_pages(&sub, pool, plan.pid, &plan.live, buffered, || {
                    // Everything read: the tree may run again.
                    if i + 1 == n {
                        if let Some(f) = frozen.take() {
                            window.1 = monotonic_ns();
                            let since = f.since();
                            f.thaw().map_err(|e| {
                                image_io("resuming", format!("process tree of {root}"), e)
                            })?;
                            freeze = since.elapsed();
                        }
                    }
                    Ok(())
                })?;
                pages += p;
                page_bytes += b;
                dirs.push(sub);
            }
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

/// Registers every readable private mapping of `p` not registered yet and
/// returns the runs of its present pages to copy.
fn prime_one(p: &mut Proc) -> Result<Vec<(u64, u64)>, DumpError> {
    let Some(wp) = &p.wp else {
        return Ok(Vec::new());
    };
    let pid = p.pid;
    let maps_path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&maps_path).map_err(proc_err(pid, maps_path.clone()))?;
    let entries = maps::parse_maps(&text).map_err(|e| DumpError::Proc {
        pid,
        path: maps_path,
        source: std::io::Error::other(e),
    })?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap =
        std::fs::File::open(&pagemap_path).map_err(proc_err(pid, pagemap_path.clone()))?;
    let mut work = Vec::new();
    for m in &entries {
        let special = matches!(
            m.kind(),
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        ) || m.shared;
        if special
            || m.prot & libc::PROT_READ as u32 == 0
            || p.registered.get(&m.start).is_some_and(|r| r.end == m.end)
        {
            continue;
        }
        forget(&mut p.registered, &mut p.precopied, m.start, m.end);
        // Registered first: a write after this point is seen by the next scan.
        if wp.register(m.start..m.end).is_err() {
            continue;
        }
        p.registered.insert(
            m.start,
            Registered {
                end: m.end,
                stored: false,
                primed: true,
            },
        );
        let runs = maps::dumpable_runs(&pagemap, m).map_err(proc_err(pid, pagemap_path.clone()))?;
        split_runs(&runs, &mut work);
    }
    Ok(work)
}

/// Copies `work` runs of `p` while it runs (on the pool) and keeps them
/// page by page. Returns the pages copied.
fn copy_runs(pool: &rayon::ThreadPool, p: &mut Proc, work: &[(u64, u64)]) -> u64 {
    let pid = p.pid;
    let copied = pool.install(|| {
        work.par_iter()
            .map(|&(addr, n)| {
                let mut b = vec![0u8; (n * PAGE) as usize];
                (
                    addr,
                    cr_ebpf_tracee::read_memory(pid, addr, &mut b).map(|()| b),
                )
            })
            .collect::<Vec<_>>()
    });
    keep_copies(p, copied)
}

/// Stores pre-copied runs page by page; a run that could not be read
/// (unmapped meanwhile) makes its mapping be stored whole next time.
fn keep_copies(
    p: &mut Proc,
    copied: Vec<(u64, Result<Vec<u8>, cr_ebpf_tracee::TraceError>)>,
) -> u64 {
    let mut pages = 0;
    for (addr, c) in copied {
        match c {
            Ok(b) => {
                for (i, pg) in b.chunks_exact(PAGE as usize).enumerate() {
                    p.precopied.insert(addr + i as u64 * PAGE, pg.to_vec());
                    pages += 1;
                }
            }
            Err(_) => {
                let hit = p
                    .registered
                    .range(..=addr)
                    .next_back()
                    .filter(|(_, r)| r.end > addr)
                    .map(|(&s, r)| (s, r.end));
                if let Some((s, e)) = hit {
                    p.forget(s, e);
                }
            }
        }
    }
    pages
}

/// Decides, for every mapping of a frozen process, whether it inherits
/// from the parent image and which pages are stored.
fn plan_pages(p: &mut Proc, plan: &mut Plan, changes: &Changes) -> Result<(), DumpError> {
    let pid = plan.pid;
    let state = &plan.state;
    let pagemap_err = || proc_err(pid, format!("/proc/{pid}/pagemap"));

    // Registrations that no longer match a mapping are dropped.
    let current: HashMap<u64, u64> = state.entries.iter().map(|m| (m.start, m.end)).collect();
    let stale: Vec<(u64, u64)> = p
        .registered
        .iter()
        .filter(|(s, r)| current.get(s) != Some(&r.end))
        .map(|(&s, r)| (s, r.end))
        .collect();
    for (s, e) in stale {
        p.forget(s, e);
    }

    for m in &state.entries {
        let kind = m.kind();
        if matches!(
            kind,
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        ) || m.shared
        {
            plan.mappings.push(State::mapping(m, 0, 0));
            continue;
        }
        // Without read access pages cannot be copied by the tracker
        // (guard regions): such a mapping is stored whole, as dumps do.
        let readable = m.prot & libc::PROT_READ as u32 != 0;
        let same = readable
            && plan
                .parent
                .as_ref()
                .and_then(|parent| same_mapping(parent, m))
                .is_some();
        let mut runs = Vec::new();
        let mut inherit = false;
        // Registered and pre-copied while running: the pre-copy and the
        // pages written since make the whole mapping.
        let mut primed = false;
        let reg = p
            .registered
            .get(&m.start)
            .copied()
            .filter(|r| r.end == m.end && !changes.layout_touched(m.start, m.end));
        let scan = |wp: &WpTracker| -> Result<Option<Vec<(u64, u64)>>, DumpError> {
            let mut dirty = Vec::new();
            match wp.scan(m.start..m.end, &mut dirty) {
                Ok(()) => Ok(Some(
                    dirty
                        .iter()
                        .map(|r| (r.start, (r.end - r.start) / PAGE))
                        .collect(),
                )),
                // No longer registered: replaced since.
                Err(WpError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EPERM) =>
                {
                    Ok(None)
                }
                Err(e) => Err(DumpError::NotSupported {
                    pid,
                    what: format!("scanning dirty pages: {e}"),
                }),
            }
        };
        match (&p.wp, &plan.baseline) {
            (Some(wp), _) if same && reg.is_some_and(|r| r.stored) => {
                if let Some(dirty) = scan(wp)? {
                    inherit = true;
                    runs = dirty;
                }
            }
            (Some(wp), _) if readable && reg.is_some_and(|r| r.primed) => {
                if let Some(dirty) = scan(wp)? {
                    primed = true;
                    runs = dirty;
                }
            }
            (None, Some(b)) if same => {
                // Candidates: present now or stored in the chain; compared
                // by content after reading.
                inherit = true;
                let now = maps::dumpable_runs(&state.pagemap, m).map_err(pagemap_err())?;
                runs = union_runs(now, b.runs(m.start, m.end));
            }
            _ => {}
        }
        let before = plan.reuse.len();
        if inherit || primed {
            // Pre-copied pages not written since stay valid.
            let written: std::collections::HashSet<u64> = runs
                .iter()
                .flat_map(|&(a, n)| (0..n).map(move |i| a + i * PAGE))
                .collect();
            for &a in p.precopied.range(m.start..m.end).map(|(a, _)| a) {
                if !written.contains(&a) {
                    plan.reuse.push(a);
                }
            }
        }
        if inherit {
            plan.inherited += 1;
        } else if primed {
            plan.whole += 1;
            if let Some(r) = p.registered.get_mut(&m.start) {
                r.primed = false;
            }
        } else {
            plan.whole += 1;
            runs = maps::dumpable_runs(&state.pagemap, m).map_err(pagemap_err())?;
            if let Some(wp) = p.wp.as_ref().filter(|_| readable) {
                forget(&mut p.registered, &mut p.precopied, m.start, m.end);
                // Some mappings cannot be registered (e.g. device memory):
                // they are stored whole every time.
                if wp.register(m.start..m.end).is_ok() {
                    p.registered.insert(
                        m.start,
                        Registered {
                            end: m.end,
                            stored: true,
                            primed: false,
                        },
                    );
                }
            }
        }
        let pages = runs.iter().map(|r| r.1).sum::<u64>() + (plan.reuse.len() - before) as u64;
        split_runs(&runs, &mut plan.live);
        plan.mappings.push(State::mapping(
            m,
            pages,
            if inherit { MAP_INHERITS } else { 0 },
        ));
    }
    Ok(())
}

fn forget(
    registered: &mut BTreeMap<u64, Registered>,
    precopied: &mut BTreeMap<u64, Vec<u8>>,
    start: u64,
    end: u64,
) {
    let gone: Vec<u64> = registered
        .range(..end)
        .filter(|(&s, r)| r.end > start && s < end)
        .map(|(&s, _)| s)
        .collect();
    for s in gone {
        let e = registered.remove(&s).map_or(end, |r| r.end);
        precopied.retain(|&a, _| a < s || a >= e);
    }
}

/// The parent's record of the same mapping, if `m` is unchanged.
fn same_mapping<'a>(parent: &'a Manifest, m: &MapEntry) -> Option<&'a MappingInfo> {
    let i = parent
        .mappings
        .binary_search_by_key(&m.start, |p| p.start)
        .ok()?;
    let p = &parent.mappings[i];
    (p.end == m.end
        && p.prot == m.prot
        && p.offset == m.offset
        && p.kind == m.kind()
        && p.path == m.path
        && p.inode == m.inode
        && p.dev == m.dev
        && p.flags & !MAP_INHERITS == m.image_flags())
    .then_some(p)
}

fn union_runs(a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut pages: Vec<u64> = a
        .into_iter()
        .chain(b)
        .flat_map(|(s, n)| (0..n).map(move |i| s + i * PAGE))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((s, n)) if *s + *n * PAGE == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Joins single pages at consecutive addresses back into runs.
fn merge_pages(mut pages: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    pages.sort_unstable_by_key(|p| p.0);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (a, p) in pages {
        match out.last_mut() {
            Some((s, b)) if *s + b.len() as u64 == a && b.len() < 256 * PAGE as usize => {
                b.extend_from_slice(&p)
            }
            _ => out.push((a, p)),
        }
    }
    out
}

fn recount(mappings: &mut [MappingInfo], stored: &[(u64, Vec<u8>)]) {
    for m in mappings.iter_mut() {
        if m.flags & MAP_INHERITS != 0 {
            m.pages_stored = stored
                .iter()
                .filter(|(a, _)| *a >= m.start && *a < m.end)
                .map(|(_, b)| b.len() as u64 / PAGE)
                .sum();
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock of the resource log).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Clock `clock` now, in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A 64-bit hash of one page's contents.
pub fn page_hash(page: &[u8]) -> u64 {
    cr_ebpf_dirty_tracker::hashing::page_hash(page)
}

/// The content of the newest checkpoint, as page hashes.
struct Baseline {
    hashes: HashMap<u64, u64>,
}

impl Baseline {
    fn load(dir: &Path, pool: &rayon::ThreadPool) -> Result<Self, ImageError> {
        let chain = Chain::open(dir)?;
        let per_fill: Result<Vec<Vec<(u64, u64)>>, ImageError> = pool.install(|| {
            chain
                .fills()
                .par_iter()
                .map_init(Vec::new, |buf, f| {
                    let mut out = Vec::new();
                    chain.read(
                        f,
                        buf,
                        |addr, bytes| {
                            for (i, p) in bytes.chunks_exact(PAGE as usize).enumerate() {
                                out.push((addr + i as u64 * PAGE, page_hash(p)));
                            }
                            Ok(())
                        },
                        |e| image_io("reading", dir.display().to_string(), e),
                    )?;
                    Ok(out)
                })
                .collect()
        });
        Ok(Self {
            hashes: per_fill?.into_iter().flatten().collect(),
        })
    }

    /// The pages of `start..end` the chain stores, as runs.
    fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut pages: Vec<u64> = self
            .hashes
            .keys()
            .copied()
            .filter(|&a| a >= start && a < end)
            .collect();
        pages.sort_unstable();
        union_runs(pages.into_iter().map(|p| (p, 1)).collect(), Vec::new())
    }
}
