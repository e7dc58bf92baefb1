//! Incremental checkpoints into an images directory.
//!
//! A [`Session`] keeps a dirty tracker attached to one process between
//! checkpoints. Each [`Session::checkpoint`] freezes the process, collects
//! its state, and stores only what changed since the previous checkpoint:
//!
//! * a mapping that is the same as in the parent (same range, protection,
//!   backing) and stayed registered with the tracker the whole time is
//!   *inherited*: only the pages `PAGEMAP_SCAN` reports written are stored,
//!   the rest live in the parent. A mapping that was replaced in between is
//!   no longer registered, which the scan reports, so it cannot be mistaken
//!   for the old one;
//! * any other mapping is stored whole (its present pages) and registered.
//!
//! Pages are copied into memory while the process is frozen and compressed
//! and written after it runs again, so the pause is the copy, not the disk.
//! [`Session::precopy`] copies the pages written so far while the process
//! runs (and re-arms them), so the freeze only copies what was written after.
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
use cr_ebpf_tracee::Frozen;
use rayon::prelude::*;

use crate::{
    dump::{split_runs, worker_pool, write_pages},
    maps::{self, MapEntry},
    state::{self, proc_err, Changes, Queries, State},
    DumpError,
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
    /// compressed while the process stays frozen, as a full dump does.
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
    /// moment they were resumed. Syscalls the resource log shows the process
    /// making inside this window are the ones we injected.
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
    /// Time it took (the process kept running).
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

struct Parent {
    name: String,
    seq: u64,
    manifest: Manifest,
}

/// An incremental checkpointing session on one process.
pub struct Session {
    pid: i32,
    dir: PathBuf,
    wp: Option<WpTracker>,
    registered: BTreeMap<u64, Registered>,
    parent: Option<Parent>,
    precopied: BTreeMap<u64, Vec<u8>>,
    pool: rayon::ThreadPool,
    opts: SessionOptions,
    /// The established TCP connections of the newest checkpoint, held open
    /// (see [`Session::silence_connections`]), by descriptor number.
    connections: Vec<(i32, std::os::fd::OwnedFd)>,
}

fn image_io(what: &'static str, path: String, e: impl std::fmt::Display) -> ImageError {
    ImageError::Io {
        path,
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

impl Session {
    /// Starts a session on `pid` writing into the images directory `dir`
    /// (created if needed). With `tracker`, pages are found by uffd-wp
    /// (see `cr_ebpf_dirty_tracker::attach`); without, by content. The
    /// first checkpoint's parent is the newest checkpoint of the same pid
    /// already in `dir` (compared by content), else it is a full image.
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
            pid,
            dir: dir.to_path_buf(),
            wp: tracker,
            registered: BTreeMap::new(),
            parent: None,
            precopied: BTreeMap::new(),
            pool,
            opts,
            connections: Vec::new(),
        };
        if let Some(newest) = images_dir::list(dir)?.pop() {
            let manifest = Manifest::read(&newest.dir)?;
            if manifest.process.pid == pid && manifest.chain.is_some() {
                s.parent = Some(Parent {
                    name: newest.name,
                    seq: newest.seq,
                    manifest,
                });
            }
        }
        Ok(s)
    }

    /// Replaces the dirty tracker, after the process replaced its memory
    /// (`execve`): the old one watches an address space that is gone.
    /// Everything is stored whole by the next checkpoint.
    pub fn replace_tracker(&mut self, tracker: Option<WpTracker>) {
        self.wp = tracker;
        self.registered.clear();
        self.precopied.clear();
    }

    /// Lets go of the held connections the process had on descriptors
    /// `fds` (it closed or replaced them): holding one would delay the
    /// peer's FIN.
    pub fn release_connections(&mut self, fds: std::ops::RangeInclusive<i32>) {
        self.connections.retain(|(n, _)| !fds.contains(n));
    }

    /// The process died: its established TCP connections, kept open by
    /// the duplicates this session holds since the newest checkpoint (so
    /// the kernel sent the peers neither FIN nor RST), are put in repair
    /// mode and closed, which closes them silently. A process restored from
    /// that checkpoint then re-establishes them with `TCP_REPAIR`, and the
    /// peers carry on (if no byte moved on a connection since the
    /// checkpoint). Returns how many.
    pub fn silence_connections(&mut self) -> usize {
        let n = self.connections.len();
        for (_, sock) in self.connections.drain(..) {
            let _ = crate::sockets::setsockopt_int(
                &sock,
                libc::IPPROTO_TCP,
                crate::sockets::TCP_REPAIR,
                1,
            );
        }
        n
    }

    /// Makes the next checkpoint a full image (no parent).
    pub fn start_new_chain(&mut self) {
        self.parent = None;
    }

    /// The process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The images directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers `range` with the tracker as soon as the resource log
    /// reports a new mapping there, so the freeze does not have to. Its
    /// pages are stored whole by the next checkpoint all the same.
    pub fn register_early(&mut self, start: u64, end: u64) {
        let Some(wp) = &self.wp else { return };
        let (start, end) = (start & !(PAGE - 1), (end + PAGE - 1) & !(PAGE - 1));
        if start >= end {
            return;
        }
        forget(&mut self.registered, &mut self.precopied, start, end);
        if wp.register(start..end).is_ok() {
            self.registered.insert(
                start,
                Registered {
                    end,
                    stored: false,
                    primed: false,
                },
            );
        }
    }

    /// Drops what is known about `start..end` (its pages will be stored whole).
    fn forget(&mut self, start: u64, end: u64) {
        forget(&mut self.registered, &mut self.precopied, start, end);
    }

    /// Registers every mapping not registered yet and copies its present
    /// pages while the process runs, so the next checkpoint only copies,
    /// during its freeze, the pages written after that (the first, full
    /// checkpoint included). Returns what was copied.
    pub fn prime(&mut self) -> Result<PrecopyReport, DumpError> {
        let t = Instant::now();
        let Some(wp) = &self.wp else {
            return Ok(PrecopyReport::default());
        };
        let pid = self.pid;
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
                || self
                    .registered
                    .get(&m.start)
                    .is_some_and(|r| r.end == m.end)
            {
                continue;
            }
            forget(&mut self.registered, &mut self.precopied, m.start, m.end);
            // Registered first: a write after this point is seen by the next scan.
            if wp.register(m.start..m.end).is_err() {
                continue;
            }
            self.registered.insert(
                m.start,
                Registered {
                    end: m.end,
                    stored: false,
                    primed: true,
                },
            );
            let runs =
                maps::dumpable_runs(&pagemap, m).map_err(proc_err(pid, pagemap_path.clone()))?;
            split_runs(&runs, &mut work);
        }
        let pages = self.copy_runs(&work);
        Ok(PrecopyReport {
            pages,
            took: t.elapsed(),
        })
    }

    /// Copies `work` runs while the process runs (on the pool) and keeps
    /// them page by page. Returns the pages copied.
    fn copy_runs(&mut self, work: &[(u64, u64)]) -> u64 {
        let pid = self.pid;
        let copied = self.pool.install(|| {
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
        self.keep_copies(copied)
    }

    /// Stores pre-copied runs page by page; a run that could not be read
    /// (unmapped meanwhile) makes its mapping be stored whole next time.
    fn keep_copies(
        &mut self,
        copied: Vec<(u64, Result<Vec<u8>, cr_ebpf_tracee::TraceError>)>,
    ) -> u64 {
        let mut pages = 0;
        for (addr, c) in copied {
            match c {
                Ok(b) => {
                    for (i, p) in b.chunks_exact(PAGE as usize).enumerate() {
                        self.precopied.insert(addr + i as u64 * PAGE, p.to_vec());
                        pages += 1;
                    }
                }
                Err(_) => {
                    let hit = self
                        .registered
                        .range(..=addr)
                        .next_back()
                        .filter(|(_, r)| r.end > addr)
                        .map(|(&s, r)| (s, r.end));
                    if let Some((s, e)) = hit {
                        forget(&mut self.registered, &mut self.precopied, s, e);
                    }
                }
            }
        }
        pages
    }

    /// Copies the pages written since the last scan while the process runs,
    /// re-arming them, so the next freeze copies only pages written after.
    pub fn precopy(&mut self) -> Result<PrecopyReport, DumpError> {
        let t = Instant::now();
        let Some(wp) = &self.wp else {
            return Ok(PrecopyReport::default());
        };
        let mut runs = Vec::new();
        let mut broken = Vec::new();
        for (&start, r) in &self.registered {
            // Early registrations hold pages nobody copied yet: those mappings
            // are stored whole anyway.
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
            self.forget(s, e);
        }
        let mut work = Vec::new();
        split_runs(
            &runs
                .iter()
                .map(|r| (r.start, (r.end - r.start) / PAGE))
                .collect::<Vec<_>>(),
            &mut work,
        );
        let pages = self.copy_runs(&work);
        Ok(PrecopyReport {
            pages,
            took: t.elapsed(),
        })
    }

    /// Takes an incremental checkpoint now. `changes` is what the resource
    /// log saw since the previous one ([`Changes::all`] when unknown). On
    /// failure the process runs on untouched, nothing is published, and the
    /// next checkpoint stores every mapping whole.
    pub fn checkpoint(&mut self, changes: &Changes) -> Result<CheckpointReport, DumpError> {
        self.checkpoint_with(|| changes.clone())
    }

    /// Like [`Session::checkpoint`], with the changes asked for once the
    /// process is frozen, so that a log read then covers everything the
    /// process did before the checkpoint.
    pub fn checkpoint_with(
        &mut self,
        changes: impl FnOnce() -> Changes,
    ) -> Result<CheckpointReport, DumpError> {
        let r = self.checkpoint_inner(changes);
        if r.is_err() {
            // Pages may have been re-armed without being stored.
            self.registered.clear();
            self.precopied.clear();
        }
        r
    }

    fn checkpoint_inner(
        &mut self,
        changes: impl FnOnce() -> Changes,
    ) -> Result<CheckpointReport, DumpError> {
        let start = Instant::now();
        let pid = self.pid;
        let _lock = images_dir::lock(&self.dir)?;
        let seq = images_dir::list(&self.dir)?
            .last()
            .map_or(1, |e| e.seq + 1)
            .max(self.parent.as_ref().map_or(1, |p| p.seq + 1));
        let name = images_dir::checkpoint_name(seq);
        let dest = self.dir.join(&name);
        // Content comparison needs the chain's pages: read before freezing.
        let baseline = match (&self.wp, &self.parent) {
            (None, Some(p)) => Some(Baseline::load(&self.dir.join(&p.name), &self.pool)?),
            _ => None,
        };
        let method = match (&self.parent, &self.wp) {
            (None, _) => Method::Full,
            (Some(_), Some(_)) => Method::UffdWp,
            (Some(_), None) => Method::Hashing,
        };

        let t0 = Instant::now();
        let frozen = Frozen::freeze(pid).map_err(|source| DumpError::Trace { pid, source })?;
        if let Some(wp) = &mut self.wp {
            // The address space as it is now (it may have been replaced by an
            // execve the log has not shown us yet).
            wp.reopen_pagemap().map_err(|e| DumpError::NotSupported {
                pid,
                what: format!("reopening its pagemap: {e}"),
            })?;
        }
        let mut window = (monotonic_ns(), 0);
        let mut phases = Phases {
            stop: t0.elapsed(),
            ..Default::default()
        };
        let t = Instant::now();
        let changes = &changes();
        let mut state =
            state::collect(&frozen, self.parent.as_ref().map(|p| &p.manifest), changes)?;
        let connections = std::mem::take(&mut state.tcp);
        phases.collect = t.elapsed();
        let t = Instant::now();
        let pagemap_err = || proc_err(pid, format!("/proc/{pid}/pagemap"));

        // Registrations that no longer match a mapping are dropped.
        let current: HashMap<u64, u64> = state.entries.iter().map(|m| (m.start, m.end)).collect();
        let stale: Vec<(u64, u64)> = self
            .registered
            .iter()
            .filter(|(s, r)| current.get(s) != Some(&r.end))
            .map(|(&s, r)| (s, r.end))
            .collect();
        for (s, e) in stale {
            self.forget(s, e);
        }

        let mut mappings: Vec<MappingInfo> = Vec::new();
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut reuse: Vec<u64> = Vec::new();
        let (mut inherited, mut whole) = (0, 0);
        for m in &state.entries {
            let kind = m.kind();
            if matches!(
                kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
            ) || m.shared
            {
                mappings.push(State::mapping(m, 0, 0));
                continue;
            }
            // Without read access pages cannot be copied by the tracker
            // (guard regions): such a mapping is stored whole, as dumps do.
            let readable = m.prot & libc::PROT_READ as u32 != 0;
            let same = readable
                && self
                    .parent
                    .as_ref()
                    .and_then(|p| same_mapping(&p.manifest, m))
                    .is_some();
            let mut runs = Vec::new();
            let mut inherit = false;
            // Registered and pre-copied while running: the pre-copy and the
            // pages written since make the whole mapping.
            let mut primed = false;
            let reg = self
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
            match (&self.wp, &baseline) {
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
                (None, Some(_)) if same => {
                    // Candidates: present now or stored in the chain;
                    // compared by content after reading.
                    inherit = true;
                    let now = maps::dumpable_runs(&state.pagemap, m).map_err(pagemap_err())?;
                    runs = union_runs(
                        now,
                        baseline
                            .as_ref()
                            .map_or(Vec::new(), |b| b.runs(m.start, m.end)),
                    );
                }
                _ => {}
            }
            let before = reuse.len();
            if inherit || primed {
                // Pre-copied pages not written since stay valid.
                let written: std::collections::HashSet<u64> = runs
                    .iter()
                    .flat_map(|&(a, n)| (0..n).map(move |i| a + i * PAGE))
                    .collect();
                for &a in self.precopied.range(m.start..m.end).map(|(a, _)| a) {
                    if !written.contains(&a) {
                        reuse.push(a);
                    }
                }
            }
            if inherit {
                inherited += 1;
            } else if primed {
                whole += 1;
                if let Some(r) = self.registered.get_mut(&m.start) {
                    r.primed = false;
                }
            } else {
                whole += 1;
                runs = maps::dumpable_runs(&state.pagemap, m).map_err(pagemap_err())?;
                if let Some(wp) = self.wp.as_ref().filter(|_| readable) {
                    forget(&mut self.registered, &mut self.precopied, m.start, m.end);
                    // Some mappings cannot be registered (e.g. device
                    // memory): they are stored whole every time.
                    if wp.register(m.start..m.end).is_ok() {
                        self.registered.insert(
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
            let pages = runs.iter().map(|r| r.1).sum::<u64>() + (reuse.len() - before) as u64;
            split_runs(&runs, &mut live);
            mappings.push(State::mapping(
                m,
                pages,
                if inherit { MAP_INHERITS } else { 0 },
            ));
        }

        phases.scan = t.elapsed();
        let t = Instant::now();
        // Copy while frozen when it fits in memory: the disk comes after.
        let bytes: u64 = live.iter().map(|r| r.1 * PAGE).sum();
        let mut buffered: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut frozen = Some(frozen);
        let mut freeze = Duration::ZERO;
        if bytes <= self.opts.buffer_budget {
            let copied = self.pool.install(|| {
                live.par_iter()
                    .map(|&(addr, n)| {
                        let mut b = vec![0u8; (n * PAGE) as usize];
                        cr_ebpf_tracee::read_memory(pid, addr, &mut b).map(|()| (addr, b))
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
            buffered = copied.map_err(|source| DumpError::Trace { pid, source })?;
            live.clear();
            phases.copy = t.elapsed();
            let t = Instant::now();
            window.1 = monotonic_ns();
            let f = frozen.take().expect("frozen");
            let since = f.since;
            f.thaw()
                .map_err(|source| DumpError::Trace { pid, source })?;
            freeze = since.elapsed();
            phases.resume = t.elapsed();
        }
        // Content comparison: keep only pages that differ from the chain.
        if let Some(b) = &baseline {
            let inheriting: Vec<(u64, u64)> = mappings
                .iter()
                .filter(|m| m.flags & MAP_INHERITS != 0)
                .map(|m| (m.start, m.end))
                .collect();
            let inherits = |a: u64| {
                let i = inheriting.partition_point(|r| r.1 <= a);
                inheriting.get(i).is_some_and(|r| r.0 <= a)
            };
            let mut kept = Vec::new();
            for (addr, data) in buffered.drain(..) {
                for (i, p) in data.chunks_exact(PAGE as usize).enumerate() {
                    let a = addr + i as u64 * PAGE;
                    if !inherits(a) || b.hashes.get(&a) != Some(&page_hash(p)) {
                        kept.push((a, p.to_vec()));
                    }
                }
            }
            buffered = merge_pages(kept);
            recount(&mut mappings, &buffered);
        }
        for a in &reuse {
            if let Some(p) = self.precopied.remove(a) {
                buffered.push((*a, p));
            }
        }
        let precopied = reuse.len() as u64;
        self.precopied.clear();

        let parent = self.parent.as_ref().map(|p| p.name.clone());
        let chain = ChainInfo {
            id: name.clone(),
            parent: parent.clone().unwrap_or_default(),
            seq,
            method: method.name().into(),
        };
        let pool = &self.pool;
        let (pages, page_bytes, manifest) = publish(&dest, |tmp| {
            let (pages, page_bytes) = write_pages(tmp, pool, pid, &live, buffered, || {
                if let Some(f) = frozen.take() {
                    window.1 = monotonic_ns();
                    let since = f.since;
                    f.thaw()
                        .map_err(|e| image_io("resuming", format!("process {pid}"), e))?;
                    freeze = since.elapsed();
                }
                Ok(())
            })?;
            let manifest = state.manifest(mappings, freeze.as_nanos() as u64, Some(chain));
            manifest.write(tmp)?;
            Ok((pages, page_bytes, manifest))
        })?;
        for r in self.registered.values_mut() {
            r.stored = true;
            r.primed = false;
        }
        self.parent = Some(Parent {
            name: name.clone(),
            seq,
            manifest,
        });
        self.connections = connections;
        Ok(CheckpointReport {
            name,
            seq,
            dir: dest,
            parent,
            method,
            pages,
            precopied,
            page_bytes,
            inherited,
            whole,
            freeze,
            total: start.elapsed(),
            queries: state.queries,
            phases,
            stopped_window: window,
        })
    }
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
