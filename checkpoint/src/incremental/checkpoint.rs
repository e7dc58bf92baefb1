//! One incremental checkpoint of the session's tree, step by step: the
//! baselines read before the freeze, the tree stopped, each process's state
//! collected and its pages planned, pages copied while frozen (when they
//! fit in memory), the tree resumed, the image written and published.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use cr_ebpf_image::{images_dir, publish, tree::Tree, ChainInfo, Manifest, MAP_INHERITS};
use rayon::prelude::*;

use super::{
    baseline::Baseline,
    image_io,
    memory::{merge_pages, plan_pages, recount, Plan, Proc},
    page_hash, CheckpointReport, Method, Parent, Phases, Session, TreeChanges, PAGE,
};
use crate::{
    fds::{check_tree, TreeScope},
    freeze::{self, FrozenTree},
    monotonic_ns, pages,
    state::{self, Queries},
    DumpError,
};

/// The images written, counted: pages, bytes on disk and each manifest.
type Written = (u64, u64, Vec<Manifest>);

/// A checkpoint's image of each process, with its start time.
type ParentImages = HashMap<i32, (Manifest, Option<u64>)>;

impl Session {
    pub(super) fn checkpoint_inner(
        &mut self,
        changes: impl FnOnce() -> TreeChanges,
    ) -> Result<CheckpointReport, DumpError> {
        let start = Instant::now();
        let _lock = images_dir::lock(&self.dir)?;
        // After every checkpoint directory there is, damaged ones too.
        let damaged = images_dir::damaged(&self.dir).last().map_or(0, |d| d.0);
        let seq = images_dir::list(&self.dir)?
            .last()
            .map_or(1, |e| e.seq + 1)
            .max(self.parent.as_ref().map_or(1, |p| p.seq + 1))
            .max(damaged + 1);
        let name = images_dir::checkpoint_name(seq);
        let method = match (&self.parent, self.uffd) {
            (None, _) => Method::Full,
            (Some(_), true) => Method::UffdWp,
            (Some(_), false) => Method::Hashing,
        };
        let mut baselines = self.baselines()?;

        let t0 = Instant::now();
        let mut frozen = freeze::freeze_tree(self.root)?;
        let tree_img = std::mem::take(&mut frozen.tree);
        let mut window = (monotonic_ns(), 0);
        let mut phases = Phases {
            stop: t0.elapsed(),
            ..Default::default()
        };
        let t = Instant::now();
        let mut changes = changes();
        if self.stale {
            changes = TreeChanges::same(crate::state::Changes::all());
        }
        let is_tree = tree_img.processes.len() > 1;
        self.follow_frozen(&frozen)?;
        let (mut plans, queries) = collect(
            self.parent.as_ref(),
            &self.warm,
            &frozen,
            &changes,
            &mut baselines,
            is_tree,
            state::Allow {
                ext_unix_sk: self.opts.ext_unix_sk,
                limits: cr_ebpf_resources::shmem::Limits::new(0, self.opts.shm_limit),
            },
        )?;
        phases.collect = t.elapsed();

        let t = Instant::now();
        plan_memory(&mut self.procs, &self.pool, &mut plans, &changes)?;
        phases.scan = t.elapsed();

        // Copy while frozen when it fits in memory: the disk comes after.
        let bytes: u64 = plans.iter().flat_map(|p| &p.live).map(|r| r.1 * PAGE).sum();
        let mut frozen = Some(frozen);
        let mut freeze = Duration::ZERO;
        if bytes <= self.opts.buffer_budget {
            let t = Instant::now();
            copy_frozen(&self.pool, &mut plans)?;
            phases.copy = t.elapsed();
            let t = Instant::now();
            window.1 = monotonic_ns();
            let f = frozen.take().expect("frozen");
            let since = f.since();
            f.thaw()?;
            freeze = since.elapsed();
            phases.resume = t.elapsed();
        }
        let precopied = settle_buffers(&mut self.procs, &mut plans);

        let dest = self.dir.join(&name);
        let parent_name = self.parent.as_ref().map(|p| p.name.clone());
        let chain = |plan: &Plan<'_>| ChainInfo {
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
        let root = self.root;
        let (pages, page_bytes, manifests) = write(
            &self.pool,
            &dest,
            &tree_img,
            &mut plans,
            chain,
            |freeze_ns: &mut Duration| {
                // Everything read: the tree may run again.
                if let Some(f) = frozen.take() {
                    window.1 = monotonic_ns();
                    let since = f.since();
                    f.thaw()
                        .map_err(|e| image_io("resuming", format!("process tree of {root}"), e))?;
                    *freeze_ns = since.elapsed();
                }
                Ok(())
            },
            &mut freeze,
        )?;
        let n = plans.len();
        let had_parent = self.parent.is_some();
        let (images, inherited, whole, new_processes) =
            remember(&mut self.procs, had_parent, &mut plans, manifests);
        drop(plans);
        self.parent = Some(Parent {
            name: name.clone(),
            seq,
            images,
        });
        self.warm.clear();
        self.stale = false;
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

    /// Content comparison needs the chain's pages: read before freezing,
    /// for every process of the parent checkpoint still in the tree.
    fn baselines(&self) -> Result<HashMap<i32, Baseline>, DumpError> {
        let mut baselines = HashMap::new();
        if let (false, Some(parent)) = (self.uffd, &self.parent) {
            let ckpt = self.dir.join(&parent.name);
            for pid in freeze::processes(self.root) {
                if parent.images.contains_key(&pid) {
                    if let Some(image) = images_dir::process_image(&ckpt, pid)? {
                        baselines.insert(pid, Baseline::load(&image, &self.pool)?);
                    }
                }
            }
        }
        Ok(baselines)
    }

    /// The processes now frozen are the ones followed: a new one (or a pid
    /// reused) starts afresh; each tracker looks at the address space as it
    /// is now (an execve the log has not shown yet may have replaced it).
    fn follow_frozen(&mut self, frozen: &FrozenTree) -> Result<(), DumpError> {
        let live: Vec<i32> = frozen.frozen.iter().map(|f| f.pid()).collect();
        self.procs.retain(|p, _| live.contains(p));
        for (f, &st) in frozen.frozen.iter().zip(&frozen.start_times) {
            let pid = f.pid();
            if self.procs.get(&pid).is_none_or(|p| p.start_time != st) {
                self.procs.insert(pid, Proc::new(pid, st, None));
            }
            if let Some(wp) = &mut self.procs.get_mut(&pid).expect("inserted").wp {
                wp.reopen_pagemap().map_err(|e| DumpError::NotSupported {
                    pid,
                    what: format!("reopening its pagemap: {e}"),
                })?;
            }
        }
        Ok(())
    }
}

/// Plans every frozen process's pages: its own memory (inheriting from
/// the parent image where the tracker allows) and the shared memory
/// objects it stores (only the pages whose contents changed).
fn plan_memory(
    procs: &mut BTreeMap<i32, Proc>,
    pool: &rayon::ThreadPool,
    plans: &mut [Plan<'_>],
    changes: &TreeChanges,
) -> Result<(), DumpError> {
    for plan in plans.iter_mut() {
        let p = procs.get_mut(&plan.pid).expect("followed above");
        plan_pages(p, plan, changes.of(plan.pid))?;
        let known = std::mem::take(&mut p.shm);
        let baseline = plan.baseline.as_ref();
        let placed = crate::shm_pages::place(
            plan.pid,
            &mut plan.state.shmem,
            &plan.state.shm_files,
            plan.parent,
            |o| match (known.get(&o.id), baseline) {
                (Some((base, v)), _) if *base == o.base => Some(v.clone()),
                (_, Some(b)) => Some(crate::shm_pages::view_of(&b.hashes, o.base)),
                _ => None,
            },
            true,
            pool,
        )?;
        plan.buffered.extend(placed.pages);
        plan.shm = placed.views;
    }
    Ok(())
}

/// Every frozen process's state, reusing earlier answers for the very
/// same process where the log allows; checks across the tree.
#[allow(clippy::too_many_arguments, reason = "the inputs of one collection")]
fn collect<'a>(
    parent_ckpt: Option<&'a Parent>,
    warm: &'a HashMap<i32, (Manifest, u64)>,
    frozen: &FrozenTree,
    changes: &TreeChanges,
    baselines: &mut HashMap<i32, Baseline>,
    is_tree: bool,
    allow: state::Allow,
) -> Result<(Vec<Plan<'a>>, Queries), DumpError> {
    let live: Vec<i32> = frozen.frozen.iter().map(|f| f.pid()).collect();
    let mut scope = is_tree.then(|| {
        let mut s = TreeScope::new(&live);
        s.ext_unix_sk = allow.ext_unix_sk;
        s
    });
    let mut plans: Vec<Plan> = Vec::new();
    let mut queries = Queries::default();
    for (f, &st) in frozen.frozen.iter().zip(&frozen.start_times) {
        let pid = f.pid();
        let parent = parent_ckpt
            .and_then(|p| p.images.get(&pid))
            .filter(|(m, _)| m.chain.is_some());
        // Earlier answers hold only for the very same process; without a
        // checkpoint before, those of the warm-up.
        let prev = parent
            .filter(|(_, when)| *when == Some(st))
            .map(|(m, _)| m)
            .or_else(|| {
                warm.get(&pid)
                    .filter(|(_, when)| *when == st && parent.is_none())
                    .map(|(m, _)| m)
            });
        let state = state::collect(f, prev, changes.of(pid), scope.as_mut(), allow)?;
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
            shm: HashMap::new(),
            inherited: 0,
            whole: 0,
        });
    }
    let in_flight = crate::state::State::in_flight(plans.iter().map(|p| (p.pid, &p.state)));
    let mut all: Vec<(i32, &mut [cr_ebpf_image::FdInfo])> = plans
        .iter_mut()
        .map(|p| (p.pid, &mut p.state.fds[..]))
        .collect();
    cr_ebpf_resources::fd::description::share(&mut all, &in_flight);
    if is_tree {
        let all: Vec<(i32, &[cr_ebpf_image::FdInfo])> =
            plans.iter().map(|p| (p.pid, &p.state.fds[..])).collect();
        check_tree(&all, scope.as_ref().expect("a tree has its scope"))?;
    }
    Ok((plans, queries))
}

/// Copies every planned page out of the frozen processes, on all cores.
fn copy_frozen(pool: &rayon::ThreadPool, plans: &mut [Plan<'_>]) -> Result<(), DumpError> {
    let work: Vec<(usize, u64, u64)> = plans
        .iter()
        .enumerate()
        .flat_map(|(i, p)| p.live.iter().map(move |&(a, n)| (i, a, n)))
        .collect();
    // Each process's memory opened once (frozen: it cannot change).
    let mems = plans
        .iter()
        .map(|p| match p.live.is_empty() {
            true => Ok(None),
            false => cr_ebpf_tracee::Mem::open(p.pid)
                .map(Some)
                .map_err(|source| DumpError::Trace { pid: p.pid, source }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let copied = pool.install(|| {
        work.par_iter()
            .map(|&(i, addr, n)| {
                let pid = plans[i].pid;
                let mut b = vec![0u8; (n * PAGE) as usize];
                let mem = mems[i].as_ref().expect("opened for live runs");
                mem.read(addr, &mut b)
                    .map(|()| (i, addr, b))
                    .map_err(|source| DumpError::Trace { pid, source })
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    for (i, addr, b) in copied {
        plans[i].buffered.push((addr, b));
    }
    for p in plans.iter_mut() {
        p.live.clear();
    }
    Ok(())
}

/// After the thaw: content comparison keeps only pages that differ from
/// the chain; pre-copied pages still valid join the buffers. Returns how
/// many pages were pre-copied.
fn settle_buffers(procs: &mut BTreeMap<i32, Proc>, plans: &mut [Plan<'_>]) -> u64 {
    let mut precopied = 0u64;
    for plan in plans.iter_mut() {
        let p = procs.get_mut(&plan.pid).expect("followed above");
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
        for (i, start, end, written) in std::mem::take(&mut plan.reuse) {
            let written: std::collections::HashSet<u64> = written
                .iter()
                .flat_map(|&(a, n)| (0..n).map(move |k| a + k * PAGE))
                .collect();
            let valid: Vec<u64> = p
                .precopied
                .range(start..end)
                .map(|(&a, _)| a)
                .filter(|a| !written.contains(a))
                .collect();
            for a in &valid {
                if let Some(pg) = p.precopied.remove(a) {
                    plan.buffered.push((*a, pg));
                }
            }
            plan.mappings[i].pages_stored += valid.len() as u64;
            precopied += valid.len() as u64;
        }
        p.precopied.clear();
    }
    precopied
}

/// Writes and publishes the checkpoint `dest`: the tree image, each
/// process's page store (`read_done` runs once every page is read from
/// the processes) and manifest.
#[allow(clippy::too_many_arguments, reason = "the steps of one checkpoint")]
fn write(
    pool: &rayon::ThreadPool,
    dest: &Path,
    tree_img: &Tree,
    plans: &mut [Plan<'_>],
    chain: impl Fn(&Plan<'_>) -> ChainInfo,
    read_done: impl FnOnce(&mut Duration) -> Result<(), cr_ebpf_image::ImageError>,
    freeze: &mut Duration,
) -> Result<Written, DumpError> {
    let is_tree = tree_img.processes.len() > 1;
    Ok(publish(dest, |tmp| {
        if is_tree {
            tree_img.write(tmp)?;
        }
        let procs = plans
            .iter_mut()
            .map(|p| pages::ProcessPages {
                pid: p.pid,
                live: &p.live[..],
                buffered: std::mem::take(&mut p.buffered),
                streamed: None,
            })
            .collect();
        let (dirs, pages, page_bytes) =
            pages::write_processes(tmp, is_tree, pool, procs, || read_done(freeze))?;
        let mut manifests = Vec::new();
        for (plan, sub) in plans.iter_mut().zip(&dirs) {
            let manifest = plan.state.manifest(
                std::mem::take(&mut plan.mappings),
                freeze.as_nanos() as u64,
                Some(chain(plan)),
            );
            manifest.write(sub)?;
            manifests.push(manifest);
        }
        Ok((pages, page_bytes, manifests))
    })?)
}

/// Every registered range of the published checkpoint is now stored;
/// connections are held from it. Returns each process's image (for the
/// next checkpoint's parent), and the mappings inherited, stored whole and
/// the new processes.
fn remember(
    procs: &mut BTreeMap<i32, Proc>,
    had_parent: bool,
    plans: &mut [Plan<'_>],
    manifests: Vec<Manifest>,
) -> (ParentImages, usize, usize, usize) {
    let mut images = HashMap::new();
    let (mut inherited, mut whole, mut new_processes) = (0, 0, 0);
    for (plan, manifest) in plans.iter_mut().zip(manifests) {
        inherited += plan.inherited;
        whole += plan.whole;
        new_processes += usize::from(plan.parent.is_none() && had_parent);
        let p = procs.get_mut(&plan.pid).expect("followed above");
        for r in p.registered.values_mut() {
            r.stored = true;
            r.primed = false;
        }
        p.connections = std::mem::take(&mut plan.state.tcp);
        p.shm = std::mem::take(&mut plan.shm);
        images.insert(plan.pid, (manifest, Some(p.start_time)));
    }
    (images, inherited, whole, new_processes)
}
