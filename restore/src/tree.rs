//! Restoring a process tree: every image verified, then a stub per process
//! made by its parent's stub (an injected `clone3` with the original pid,
//! so parent links are the real ones), sessions and process groups set as
//! each is made, zombies made to exit with their status, then every
//! process built, and all of them let run, children first.

use std::{collections::HashMap, path::Path, time::Instant};

use cr_ebpf_image::{tree::Tree, Chain};
use cr_ebpf_resources::process::namespaces::NsIds;
use cr_ebpf_tracee::Tracee;

use crate::{
    pid_free, preflight,
    stub::{self, Natives},
    time_namespace, Clock, RestoreError, RestoreOptions, RestoreReport,
};

pub(crate) fn restore_tree(
    dir: &Path,
    opts: &RestoreOptions,
    start: Instant,
    clock: Clock,
) -> Result<RestoreReport, RestoreError> {
    // Stubs killed by a failure come to us to be reaped (see `reap`).
    let restoring = crate::reap::TreeRestore::start();
    let mut made = Vec::new();
    let r = restore_stubs(dir, opts, start, clock, &mut made);
    if r.is_err() {
        restoring.reap(&made);
    }
    r
}

/// [`restore_tree`]; `made` gets the pids of the stubs it makes (and of
/// the stand-in group leaders), before each is made.
fn restore_stubs(
    dir: &Path,
    opts: &RestoreOptions,
    start: Instant,
    mut clock: Clock,
    made: &mut Vec<i32>,
) -> Result<RestoreReport, RestoreError> {
    let tree = Tree::read(dir)?;
    let mut chains: HashMap<i32, Chain> = HashMap::new();
    for p in tree.processes.iter().filter(|p| p.zombie.is_none()) {
        cr_ebpf_image::progress::start("reading the images", 0);
        let mut chain = Chain::open(&dir.join(&p.dir))?;
        chain.load_shmem()?;
        if chain.manifest().process.pid != p.pid {
            return Err(RestoreError::NotSupported(format!(
                "{} holds process {}, not {}",
                p.dir,
                chain.manifest().process.pid,
                p.pid
            )));
        }
        chains.insert(p.pid, chain);
    }
    clock.mark("read");
    for p in &tree.processes {
        match chains.get(&p.pid) {
            Some(c) => preflight(c.manifest(), opts)?,
            None => pid_free(p.pid)?,
        }
    }
    let root = &tree.processes[0];
    let time_offsets = time_namespace(&chains[&root.pid].manifest().process, opts.time_namespace)?;
    clock.mark("preflight");
    let manifests: Vec<&cr_ebpf_image::Manifest> = tree
        .processes
        .iter()
        .filter_map(|p| chains.get(&p.pid).map(Chain::manifest))
        .collect();
    let (tramp, vdso_tmp) = stub::addresses(&manifests)?;
    let natives = Natives::build(&manifests, opts)?;
    let workers = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };

    // The stubs, parents first: each is made by its parent's stub, joins
    // its session and group, and gets its memory before it makes children
    // of its own (which so share the pages they shared before).
    let mut built: HashMap<i32, crate::build::Memory> = HashMap::new();
    let mut zombies = Vec::new();
    // Each process's UTS and IPC namespaces, and a process in each
    // namespace made.
    let mut ns: HashMap<i32, NsIds> = HashMap::new();
    let mut made_ns = HashMap::new();
    // Process groups made so far.
    let mut groups = std::collections::HashSet::new();
    for p in &tree.processes {
        made.extend([p.pid, p.pgid]);
        let (t, guard) = make_stub(p, &tree, &built, &groups, tramp)?;
        // Into its cgroups and namespaces before it makes children (they
        // inherit them).
        let inherited = ns.get(&p.ppid).copied().unwrap_or_default();
        let info = chains.get(&p.pid).map(|c| &c.manifest().process);
        let mine = place(&t, tramp, p.pid, info, &natives, inherited, &mut made_ns)
            .map_err(|e| e.in_process(p.pid))?;
        ns.insert(p.pid, mine);
        join_session(&t, tramp, p, &tree.processes)?;
        groups.insert(p.pgid);
        if let Some(c) = chains.get(&p.pid) {
            stub::terminal(&t, tramp, &natives, &c.manifest().process)
                .map_err(|e| e.in_process(p.pid))?;
        }
        match p.zombie {
            Some(status) => zombies.push((p.pid, status, t, guard)),
            None => {
                let m = chains[&p.pid].manifest();
                let kept = kept(m, chains.get(&p.ppid).map(Chain::manifest))?;
                let mem = crate::build::build_memory(
                    t,
                    guard,
                    m,
                    &chains[&p.pid],
                    workers,
                    &natives,
                    &mut clock,
                    (tramp, vdso_tmp),
                    kept,
                )
                .map_err(|e| e.in_process(p.pid))?;
                let mut mem = mem;
                mem.shares_files = p.shares_files;
                built.insert(p.pid, mem);
            }
        }
    }
    // Every group exists: the terminals' foreground groups.
    for (pid, mem) in &built {
        stub::foreground(mem.tracee(), tramp, &chains[pid].manifest().process)
            .map_err(|e| e.in_process(*pid))?;
    }
    // Zombies: they exit as they did; their parents reap them.
    for (pid, status, t, guard) in zombies {
        crate::zombie::exit_as_zombie(pid, status, t, guard, tramp)
            .map_err(|e| e.in_process(pid))?;
    }
    clock.mark("stub");

    // Everything else of every process, children first (each keeps its
    // stub stopped).
    let mut ready = Vec::new();
    let mut filled = crate::Filled::default();
    for p in tree.processes.iter().rev().filter(|p| p.zombie.is_none()) {
        let mem = built.remove(&p.pid).expect("made above");
        let r = crate::build::build_rest(
            mem,
            chains[&p.pid].manifest(),
            &natives,
            &mut clock,
            tramp,
            vdso_tmp,
        )
        .map_err(|e| e.in_process(p.pid))?;
        ready.push(r);
    }
    // The restorer's own ends of pipes and FIFOs go before any process
    // runs. Then let all of them run.
    let cgroups_made = natives.cgroups.made.clone();
    drop(natives);
    for r in ready {
        let pid = r.t.tid();
        let (_, f) = crate::release::release(r).map_err(|e| e.in_process(pid))?;
        filled += f;
    }
    clock.mark("resume");
    Ok(RestoreReport {
        lazy: None,
        pid: root.pid,
        image: dir.to_path_buf(),
        pages: filled.pages,
        direct_pages: filled.direct_pages,
        fill: filled.took,
        total: start.elapsed(),
        workers,
        phases: clock.phases,
        time_offsets,
        cgroups_made,
    })
}

/// The stub of `p`: the root's spawned, any other made by its parent's
/// stub (in `built`); one in a process group that no process made (among
/// `groups`: its leader exited) through a stand-in leader.
fn make_stub(
    p: &cr_ebpf_image::tree::TreeProcess,
    tree: &Tree,
    built: &HashMap<i32, crate::build::Memory>,
    groups: &std::collections::HashSet<i32>,
    tramp: u64,
) -> Result<(Tracee, stub::KillGuard), RestoreError> {
    if p.ppid == 0 {
        return stub::spawn_root(p.pid, tramp).map_err(|e| e.in_process(p.pid));
    }
    let parent = built.get(&p.ppid).ok_or_else(|| {
        RestoreError::NotSupported(format!(
            "the parent {} of process {} is not in the tree",
            p.ppid, p.pid
        ))
    })?;
    let flags = if p.shares_files {
        libc::CLONE_FILES as u64
    } else {
        0
    };
    let parent_pgid = tree
        .processes
        .iter()
        .find(|q| q.pid == p.ppid)
        .map(|q| q.pgid);
    let orphan = p.pgid != p.pid && Some(p.pgid) != parent_pgid && !groups.contains(&p.pgid);
    if orphan {
        stub::spawn_in_orphan_group(parent.tracee(), tramp, p.pid, p.pgid, flags)
    } else {
        stub::spawn_child(parent.tracee(), tramp, p.pid, flags)
    }
    .map_err(|e| e.in_process(p.pid))
}

/// The mappings the process of `m` keeps from its parent's (`parent`)
/// stub: those with pages it shares with it.
fn kept(
    m: &cr_ebpf_image::Manifest,
    parent: Option<&cr_ebpf_image::Manifest>,
) -> Result<Vec<(u64, u64)>, RestoreError> {
    match parent {
        _ if m.cow.is_empty() => Ok(Vec::new()),
        Some(pm) => crate::inherit::kept(m, pm),
        None => Err(RestoreError::NotSupported(format!(
            "process {} shares pages with a parent that is not restored with it",
            m.process.pid
        ))),
    }
}

/// The new stub `t` of `p` leads its session or group, or joins its
/// parent's group (among `all`), as `p` did.
fn join_session(
    t: &Tracee,
    tramp: u64,
    p: &cr_ebpf_image::tree::TreeProcess,
    all: &[cr_ebpf_image::tree::TreeProcess],
) -> Result<(), RestoreError> {
    let parent_pgid = all.iter().find(|q| q.pid == p.ppid).map(|q| q.pgid);
    let sys = |name: &str, nr: i64, args: [u64; 6]| stub::stub_syscall(t, tramp, name, nr, args);
    if p.sid == p.pid {
        sys("setsid", libc::SYS_setsid, [0; 6]).map_err(|e| e.in_process(p.pid))?;
    } else if p.pgid == p.pid {
        sys("setpgid", libc::SYS_setpgid, [0, 0, 0, 0, 0, 0]).map_err(|e| e.in_process(p.pid))?;
    } else if p.ppid != 0 && Some(p.pgid) != parent_pgid {
        sys("setpgid", libc::SYS_setpgid, [0, p.pgid as u64, 0, 0, 0, 0]).map_err(|e| {
            RestoreError::NotSupported(format!(
                "process {} joining process group {}: {e}",
                p.pid, p.pgid
            ))
        })?;
    }
    Ok(())
}

/// Puts the new stub `t` of process `pid` (recorded as `info`; `None`
/// for a zombie, which stays where its parent is) into its cgroups and
/// namespaces; returns its namespaces.
fn place(
    t: &Tracee,
    tramp: u64,
    pid: i32,
    info: Option<&cr_ebpf_image::ProcessInfo>,
    natives: &Natives,
    inherited: NsIds,
    made: &mut HashMap<u64, i32>,
) -> Result<NsIds, RestoreError> {
    natives.cgroups.enter(pid)?;
    match info {
        Some(info) => stub::enter_namespaces(t, tramp, info, inherited, made),
        None => Ok(inherited),
    }
}
