//! A process's memory between checkpoints: what is registered with its
//! dirty tracker, what was pre-copied, and the plan of what one checkpoint
//! stores (which mappings inherit from the parent image, which pages are
//! read).

use std::collections::{BTreeMap, HashMap};

use cr_ebpf_dirty_tracker::uffd_wp::{WpError, WpTracker};
use cr_ebpf_image::{Manifest, MappingInfo, MappingKind, MAP_INHERITS};
use rayon::prelude::*;

use super::{baseline::Baseline, PAGE};
use crate::pages::union_runs;
use crate::{
    error::proc_err,
    maps::{self, MapEntry},
    pages::split_runs,
    state::{Changes, State},
    DumpError,
};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Registered {
    pub(crate) end: u64,
    /// Whether every page written before the registration is in a
    /// published image (false until the checkpoint after registering).
    pub(crate) stored: bool,
    /// Whether every page present at registration was pre-copied since.
    pub(crate) primed: bool,
}

/// What a session keeps about one process between checkpoints.
pub(crate) struct Proc {
    pub(crate) pid: i32,
    /// Its start time: the same pid with another one is another process.
    pub(crate) start_time: u64,
    pub(crate) wp: Option<WpTracker>,
    pub(crate) registered: BTreeMap<u64, Registered>,
    pub(crate) precopied: BTreeMap<u64, Vec<u8>>,
    /// The established TCP connections of the newest checkpoint, held open
    /// (see [`Session::silence_connections`]), by descriptor number.
    pub(super) connections: Vec<(i32, std::os::fd::OwnedFd)>,
    /// What the newest checkpoint's chain holds of each shared memory
    /// object this process stores, by id: its base and page hashes.
    pub(super) shm: HashMap<u64, (u64, crate::shm_pages::View)>,
}

impl Proc {
    pub(crate) fn new(pid: i32, start_time: u64, wp: Option<WpTracker>) -> Self {
        Self {
            pid,
            start_time,
            wp,
            registered: BTreeMap::new(),
            precopied: BTreeMap::new(),
            connections: Vec::new(),
            shm: HashMap::new(),
        }
    }

    pub(crate) fn forget(&mut self, start: u64, end: u64) {
        forget(&mut self.registered, &mut self.precopied, start, end);
    }

    /// Pages may have been re-armed without being stored.
    pub(crate) fn reset(&mut self) {
        self.registered.clear();
        self.precopied.clear();
    }
}

/// A mapping whose pre-copied pages are stored: (its index among the
/// plan's mappings, start, end, the page runs written since).
pub(super) type Reuse = (usize, u64, u64, Vec<(u64, u64)>);

/// What one process's checkpoint stores, planned while frozen.
pub(super) struct Plan<'a> {
    pub(super) pid: i32,
    pub(super) state: State,
    /// Its image in the parent checkpoint, when it was there.
    pub(super) parent: Option<&'a Manifest>,
    pub(super) mappings: Vec<MappingInfo>,
    /// Runs to read from the process.
    pub(super) live: Vec<(u64, u64)>,
    /// Mappings whose pre-copied pages not written since are stored: (the
    /// index of the mapping, start, end, the runs written since). Taken
    /// after the thaw, when their count is added to the mapping's.
    pub(super) reuse: Vec<Reuse>,
    /// Pages read already.
    pub(super) buffered: Vec<(u64, Vec<u8>)>,
    pub(super) baseline: Option<Baseline>,
    /// What the chain holds of each shared memory object once this
    /// checkpoint is published (see [`Proc::shm`]).
    pub(super) shm: HashMap<u64, (u64, crate::shm_pages::View)>,
    pub(super) inherited: usize,
    pub(super) whole: usize,
}

/// Whether a write tracker can follow `m`'s pages: a readable private
/// mapping, not one of the kernel's (vDSO, vvar, vsyscall).
pub(crate) fn trackable(m: &MapEntry) -> bool {
    let special = matches!(
        m.kind(),
        MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
    );
    !special && !m.shared && m.prot & libc::PROT_READ as u32 != 0
}

/// Registers every readable private mapping of `p` not registered yet and
/// returns the runs of its present pages to copy.
pub(crate) fn prime_one(p: &mut Proc) -> Result<Vec<(u64, u64)>, DumpError> {
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
        if !trackable(m) || p.registered.get(&m.start).is_some_and(|r| r.end == m.end) {
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
        let runs = maps::dumpable_runs(&pagemap, m).map_err(crate::error::runs_err(pid))?;
        split_runs(&runs, &mut work);
    }
    Ok(work)
}

/// Copies `work` runs of `p` while it runs (on the pool) and keeps them
/// page by page. Returns the pages copied.
pub(crate) fn copy_runs(pool: &rayon::ThreadPool, p: &mut Proc, work: &[(u64, u64)]) -> u64 {
    let Ok(mem) = cr_ebpf_tracee::Mem::open(p.pid) else {
        // Gone: the next checkpoint finds out.
        return 0;
    };
    let copied = pool.install(|| {
        work.par_iter()
            .map(|&(addr, n)| {
                let mut b = vec![0u8; (n * PAGE) as usize];
                (addr, mem.read(addr, &mut b).map(|()| b))
            })
            .collect::<Vec<_>>()
    });
    keep_copies(p, copied)
}

/// Copies again, while `p` runs, the pages of its primed or stored
/// registrations written since the last scan (re-arming them). Returns the
/// pages copied.
pub(crate) fn recopy_one(pool: &rayon::ThreadPool, p: &mut Proc) -> u64 {
    let Some(wp) = &p.wp else { return 0 };
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
    copy_runs(pool, p, &work)
}

/// Stores pre-copied runs page by page; a run that could not be read
/// (unmapped meanwhile) makes its mapping be stored whole next time.
pub(crate) fn keep_copies(
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
pub(super) fn plan_pages(
    p: &mut Proc,
    plan: &mut Plan,
    changes: &Changes,
) -> Result<(), DumpError> {
    let pid = plan.pid;
    let state = &plan.state;

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
                let now =
                    maps::dumpable_runs(&state.pagemap, m).map_err(crate::error::runs_err(pid))?;
                runs = union_runs(now, b.runs(m.start, m.end));
            }
            _ => {}
        }
        if inherit || primed {
            // Pre-copied pages not written since stay valid: which, once
            // the processes run again (the copies do not change).
            plan.reuse
                .push((plan.mappings.len(), m.start, m.end, runs.clone()));
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
            runs = maps::dumpable_runs(&state.pagemap, m).map_err(crate::error::runs_err(pid))?;
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
        let pages = runs.iter().map(|r| r.1).sum::<u64>();
        split_runs(&runs, &mut plan.live);
        plan.mappings.push(State::mapping(
            m,
            pages,
            if inherit { MAP_INHERITS } else { 0 },
        ));
    }
    Ok(())
}

pub(crate) fn forget(
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
pub(super) fn same_mapping<'a>(parent: &'a Manifest, m: &MapEntry) -> Option<&'a MappingInfo> {
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

/// Joins single pages at consecutive addresses back into runs.
pub(super) fn merge_pages(mut pages: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
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

pub(super) fn recount(mappings: &mut [MappingInfo], stored: &[(u64, Vec<u8>)]) {
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
