//! What a session reports, and how it is told what changed.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use crate::state::{Changes, Queries};

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
    /// Take unix stream connections to named sockets outside the tree
    /// (see [`crate::DumpOptions::ext_unix_sk`]).
    pub ext_unix_sk: bool,
    /// Most allocated bytes of one shared memory object stored (0: the
    /// default; see [`crate::DumpOptions::shm_limit`]).
    pub shm_limit: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            buffer_budget: 2 << 30,
            ext_unix_sk: false,
            shm_limit: 0,
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
