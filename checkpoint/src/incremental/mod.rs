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
use cr_ebpf_image::{images_dir, ImageError, Manifest};

mod baseline;
mod checkpoint;
pub(crate) mod memory;
mod report;
mod warm;

pub use baseline::page_hash;
use memory::{copy_runs, forget, prime_one, recopy_one, Proc, Registered};
pub use report::{
    CheckpointReport, Followed, Method, Phases, PrecopyReport, SessionOptions, TreeChanges,
};
pub use warm::WarmUp;

use crate::{freeze, pages::worker_pool, state::Changes, DumpError};

pub(super) const PAGE: u64 = 4096;

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
    /// What [`Session::warm_up`] collected of each process while it ran,
    /// with its start time: the first checkpoint's previous answers.
    warm: HashMap<i32, (Manifest, u64)>,
    /// A checkpoint failed after taking the log's changes: the next one
    /// reuses no earlier answer.
    stale: bool,
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
        crate::freeze::checkable(pid)?;
        cr_ebpf_image::trust::check_destination(dir)?;
        cr_ebpf_image::trust::create_private_dir(dir)
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
            warm: HashMap::new(),
            stale: false,
        };
        let start_time = freeze::stat(pid)?.start_time;
        s.procs.insert(pid, Proc::new(pid, start_time, tracker));
        let newest_damaged = images_dir::damaged(dir).last().map(|d| d.0);
        let newest = images_dir::list(dir)?.pop();
        // A damaged newest checkpoint is not chained on (nor is the one
        // before it, skipping it): the next one is full, and its report
        // says so.
        let newest = newest.filter(|n| newest_damaged.is_none_or(|d| d < n.seq));
        if let Some(newest) = newest {
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
                // Refused: said now for the process tracked, before its first
                // checkpoint (a descendant's is said by the checkpoint).
                Err(e @ DumpError::NotSupported { .. }) if pid == self.root => return Err(e),
                // Exited or replaced its memory meanwhile (an exec between
                // reading its maps and its pagemap): whatever it is now is
                // stored whole by the next checkpoint, which also finds out
                // whether it is gone.
                Err(_) => p.reset(),
            }
        }
        Ok(PrecopyReport {
            pages,
            took: t.elapsed(),
        })
    }

    /// Collects, while the processes run, what the next checkpoint would
    /// otherwise collect frozen for the processes that have no previous
    /// checkpoint (see `warm.rs`): each injected question in a stop of its
    /// own. Only sound when the resource log has been running since before
    /// this call (`track`), as the next checkpoint re-asks only what it
    /// shows changed. A process that cannot be warmed up (it refuses
    /// something, say: the checkpoint says what) is collected at the
    /// freeze. Returns the stops made, the longest and when each was: the
    /// log must not take the questions asked then for the process's own
    /// calls.
    pub fn warm_up(&mut self) -> WarmUp {
        let mut all = WarmUp::default();
        let pids = self.pids();
        for &pid in &pids {
            let has_parent = self
                .parent
                .as_ref()
                .is_some_and(|p| p.images.contains_key(&pid));
            let Some(p) = self.procs.get(&pid).filter(|_| !has_parent) else {
                continue;
            };
            let start_time = p.start_time;
            if let Ok((m, w)) = warm::warm_up(pid, &pids) {
                // Still the same process (no pid reuse meanwhile).
                if freeze::stat(pid).is_ok_and(|st| st.start_time == start_time) {
                    self.warm.insert(pid, (m, start_time));
                }
                all.stops += w.stops;
                all.worst_stop = all.worst_stop.max(w.worst_stop);
                all.windows.extend(w.windows);
            }
        }
        all
    }

    /// Copies the pages written since the last scan while the processes
    /// run, re-arming them, so the next freeze copies only pages written
    /// after.
    pub fn precopy(&mut self) -> Result<PrecopyReport, DumpError> {
        let t = Instant::now();
        let pool = &self.pool;
        let pages = self.procs.values_mut().map(|p| recopy_one(pool, p)).sum();
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
            // The log's changes were taken by this one: the next cannot
            // know what changed since the answers it would reuse.
            self.stale = true;
            self.warm.clear();
        }
        r
    }
}
