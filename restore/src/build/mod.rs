//! Building a process inside its ptrace-controlled stub: a table of
//! phases run in order ([`PHASES`]), each timed under its name in the
//! restore report. Resource kinds are restored by the resources crate's
//! registries in their phases; [`layout`] holds the memory layout.

mod creds;
mod direct;
mod layout;

use std::time::Instant;

use cr_ebpf_image::{Chain, Manifest, MappingKind};
use cr_ebpf_resources::{
    advice,
    fd::RestoreCx,
    proc::{parse_maps, MapEntry},
    process::{self, threads::restore_thread, Phase},
    sys::{CloneArgs, Injected, Sys, PAGE},
};
use cr_ebpf_tracee::{regs, Tracee};
use rayon::prelude::*;

use crate::{
    release::Ready,
    stub::{KillGuard, Natives},
    RestoreError,
};

/// A process being built: what the phases read and what they leave for
/// the next ones.
struct Build<'a> {
    /// The stub's main thread (absent when the phases run on the fake).
    t: Option<&'a Tracee>,
    s: &'a dyn Sys,
    pid: i32,
    m: &'a Manifest,
    chain: Option<&'a Chain>,
    workers: usize,
    natives: &'a Natives,
    tramp: u64,
    vdso_tmp: u64,
    /// The stub's own mappings, as found before clearing them.
    stub_maps: Vec<MapEntry>,
    /// Mappings inherited from the parent's stub with the pages the process
    /// shares with its parent (see the inherit module): kept, not remade.
    kept: Vec<(u64, u64)>,
    /// The other threads, made, with the registers they resume with and
    /// their signal masks.
    others: Vec<(Tracee, regs::Regs, u64)>,
    /// The registers the main thread resumes with.
    final_regs: Option<regs::Regs>,
    filled: crate::Filled,
    /// It shares its parent's descriptor table (`CLONE_FILES`): the
    /// parent restores the descriptors.
    shares_files: bool,
}

type PhaseFn = fn(&mut Build<'_>) -> Result<(), RestoreError>;

/// The phases, in order, with the names the report uses: the first
/// [`MEMORY_PHASES`] build the memory (children are made from it, sharing
/// its pages), the others the rest.
const PHASES: &[(&str, PhaseFn)] = &[
    ("stub", forget_rseq),
    ("clear", layout::clear),
    ("vdso", layout::vdso),
    ("map", layout::map),
    ("fill", fill),
    ("mm", mm),
    ("advice", advice_phase),
    ("process", process_wide),
    ("fds", fds),
    ("threads", threads),
    ("creds", creds::creds),
    ("signals", signals),
];

/// How many of [`PHASES`] build the memory.
const MEMORY_PHASES: usize = 6;

/// A process whose memory is built, in its stub: children may be made from
/// it now.
pub(crate) struct Memory {
    // The guard first: a stub dropped is killed while traced, not let go
    // first (fields drop in order).
    guard: KillGuard,
    t: Tracee,
    filled: crate::Filled,
    /// It shares its parent's descriptor table (see [`Build`]).
    pub(crate) shares_files: bool,
}

impl Memory {
    /// The stub's main thread (children are made through it).
    pub(crate) fn tracee(&self) -> &Tracee {
        &self.t
    }
}

/// Builds the process `m` inside the stub `t` (everything but letting it run).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per kind of restore"
)]
pub(crate) fn build_in(
    t: Tracee,
    guard: KillGuard,
    m: &Manifest,
    chain: &Chain,
    workers: usize,
    natives: &Natives,
    clock: &mut crate::Clock,
    tramp: u64,
    vdso_tmp: u64,
) -> Result<Ready, RestoreError> {
    let mem = build_memory(
        t,
        guard,
        m,
        chain,
        workers,
        natives,
        clock,
        (tramp, vdso_tmp),
        Vec::new(),
    )?;
    build_rest(mem, m, natives, clock, tramp, vdso_tmp)
}

/// The pidfd descriptors are handed over through stays clear of the
/// process's own numbers.
fn floor(m: &Manifest) -> u64 {
    m.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) as u64 + 32
}

/// Runs `phases` on a build of `m` in the stub `t`.
#[allow(
    clippy::too_many_arguments,
    reason = "the halves of one build share its inputs"
)]
fn run_phases<'a>(
    t: &'a Tracee,
    s: &'a dyn Sys,
    m: &'a Manifest,
    chain: Option<&'a Chain>,
    workers: usize,
    natives: &'a Natives,
    (tramp, vdso_tmp): (u64, u64),
    (stub_maps, kept): (Vec<MapEntry>, Vec<(u64, u64)>),
    phases: &[(&'static str, PhaseFn)],
    clock: &mut crate::Clock,
    shares_files: bool,
) -> Result<Build<'a>, RestoreError> {
    let mut b = Build {
        t: Some(t),
        s,
        pid: t.tid(),
        m,
        chain,
        workers,
        natives,
        tramp,
        vdso_tmp,
        stub_maps,
        kept,
        others: Vec::new(),
        final_regs: None,
        filled: crate::Filled::default(),
        shares_files,
    };
    for (name, phase) in phases {
        phase(&mut b)?;
        clock.mark(name);
    }
    Ok(b)
}

/// The memory of `m` in the stub `t`: its mappings, pages and protections,
/// keeping the mappings `kept` that `t` inherited from its parent with the
/// pages they share.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per kind of restore"
)]
pub(crate) fn build_memory(
    t: Tracee,
    guard: KillGuard,
    m: &Manifest,
    chain: &Chain,
    workers: usize,
    natives: &Natives,
    clock: &mut crate::Clock,
    addrs: (u64, u64),
    kept: Vec<(u64, u64)>,
) -> Result<Memory, RestoreError> {
    let got = t.tid();
    let stub_maps = std::fs::read_to_string(format!("/proc/{got}/maps"))
        .ok()
        .and_then(|t| parse_maps(&t).ok())
        .ok_or_else(|| RestoreError::stub("cannot read the stub's maps"))?;
    let filled = {
        let s = Injected::new(&t, got, addrs.0, addrs.0 + PAGE).with_floor(floor(m));
        let b = run_phases(
            &t,
            &s,
            m,
            Some(chain),
            workers,
            natives,
            addrs,
            (stub_maps, kept),
            &PHASES[..MEMORY_PHASES],
            clock,
            false,
        )?;
        // Children made from this stub must not inherit its descriptors.
        s.release_adopter()?;
        b.filled
    };
    Ok(Memory {
        t,
        guard,
        filled,
        shares_files: false,
    })
}

/// Everything of `m` but its memory and letting it run, in the stub whose
/// memory `mem` built.
pub(crate) fn build_rest(
    mem: Memory,
    m: &Manifest,
    natives: &Natives,
    clock: &mut crate::Clock,
    tramp: u64,
    vdso_tmp: u64,
) -> Result<Ready, RestoreError> {
    let shares_files = mem.shares_files;
    let Memory {
        t, guard, filled, ..
    } = mem;
    let got = t.tid();
    let (others, final_regs) = {
        let s = Injected::new(&t, got, tramp, tramp + PAGE).with_floor(floor(m));
        let b = run_phases(
            &t,
            &s,
            m,
            None,
            1,
            natives,
            (tramp, vdso_tmp),
            (Vec::new(), Vec::new()),
            &PHASES[MEMORY_PHASES..],
            clock,
            shares_files,
        )?;
        let final_regs = b
            .final_regs
            .ok_or_else(|| RestoreError::NotSupported("the image has no thread".into()))?;
        (b.others, final_regs)
    };
    let vdso_insn = vdso_syscall_insn(got, m)?;
    Ok(Ready {
        t,
        guard,
        others,
        final_regs,
        sigmask: m.threads[0].sigmask,
        vdso_insn,
        tramp,
        filled,
    })
}

/// The stub's rseq area is about to vanish: the kernel would fault on it
/// at the next preemption. A stub made from its parent's after that one's
/// memory was built drops any descriptor it inherited above stdio.
fn forget_rseq(b: &mut Build<'_>) -> Result<(), RestoreError> {
    b.s.call(
        "close_range",
        libc::SYS_close_range,
        [3, u32::MAX as u64, 0, 0, 0, 0],
    )?;
    let (Some(t), s) = (b.t, b.s) else {
        return Ok(());
    };
    if let Some(q) = t.rseq().map_err(|source| RestoreError::Build {
        what: "reading the stub's rseq area".into(),
        source,
    })? {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        s.call(
            "rseq(unregister)",
            libc::SYS_rseq,
            [
                q.ptr,
                q.len as u64,
                RSEQ_FLAG_UNREGISTER,
                q.sig as u64,
                0,
                0,
            ],
        )?;
    }

    Ok(())
}

/// Pages, on all cores. A lazy restore fills only what it does not
/// register for its fill thread, which it starts here (see `lazy.rs`).
fn fill(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (workers, got) = (b.workers, b.pid);
    let chain = b
        .chain
        .ok_or_else(|| RestoreError::stub("no chain to fill pages from"))?;
    let fill_start = Instant::now();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("restore-fill-{i}"))
        .build()
        .map_err(|e| RestoreError::stub(format!("starting the fill threads: {e}")))?;
    b.filled.pages = chain.pages();
    let lazy_ranges = match &b.natives.lazy {
        Some(_) => crate::lazy::lazy_ranges(b.m),
        None => Vec::new(),
    };
    let eager =
        |f: &&cr_ebpf_image::chain::Fill| !f.is_shmem() && !crate::lazy::is_lazy(&lazy_ranges, f);
    let own: u64 = chain.fills().iter().filter(eager).map(|f| f.pages()).sum();
    cr_ebpf_image::progress::start("filling memory", own);
    let write = |addr: u64, bytes: &[u8]| {
        cr_ebpf_tracee::write_memory(got, addr, bytes).map_err(|source| RestoreError::Build {
            what: format!("filling pages at {addr:#x}"),
            source,
        })
    };
    let bad = |e: String| RestoreError::PageData { what: e };
    // A store not in the page cache is read directly, in file order; the
    // rest through the stores' mappings.
    let direct = |f: &cr_ebpf_image::chain::Fill, ext: &[u8], buf: &mut Vec<u8>| {
        cr_ebpf_image::progress::add(f.pages());
        chain.read_from(f, ext, buf, write, bad)
    };
    let (left, direct_pages) = direct::fill(
        &pool,
        chain,
        chain.fills().iter().filter(eager).collect(),
        &direct,
    )?;
    pool.install(|| {
        left.par_iter().try_for_each_init(Vec::new, |buf, f| {
            cr_ebpf_image::progress::add(f.pages());
            chain.read(f, buf, write, bad)
        })
    })?;
    if let Some(shared) = &b.natives.lazy {
        let lazy = crate::lazy::lazy_fills(chain, &lazy_ranges);
        let hot = crate::lazy::hot_addresses(b.m, chain, &lazy);
        let s = b.s;
        let uffd = crate::lazy::take_uffd(got, |name, nr, args| s.call(name, nr, args))?;
        crate::lazy::register(&uffd, &lazy_ranges)?;
        let started = crate::lazy::start(shared.clone(), lazy, uffd, got, hot)?;
        *b.natives.lazy_fill.lock().expect("not poisoned") = Some(started);
    }
    b.filled.direct_pages = direct_pages;
    b.filled.took = fill_start.elapsed();
    Ok(())
}

/// Final protections, then the mm fields, auxv and executable.
fn mm(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (s, m) = (b.s, b.m);
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for x in &m.mappings {
        if x.pages_stored > 0
            && x.prot != x.prot | rw
            && !matches!(
                x.kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
            )
        {
            s.call(
                "mprotect",
                libc::SYS_mprotect,
                [x.start, x.end - x.start, x.prot as u64, 0, 0, 0],
            )?;
        }
    }

    process::restore(Phase::Mm, s, &m.process)
}

/// Each mapping's own settings, once the children were made from this
/// process's memory (`MADV_DONTFORK`, `MADV_WIPEONFORK` would keep them
/// from inheriting what they shared).
fn advice_phase(b: &mut Build<'_>) -> Result<(), RestoreError> {
    for x in &b.m.mappings {
        let special = matches!(
            x.kind,
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        );
        if x.flags & advice::ADVICE != 0 && !special {
            advice::restore(b.s, x)?;
        }
        advice::install_guards(b.s, x)?;
    }
    Ok(())
}

/// Process-wide state set before the descriptors.
fn process_wide(b: &mut Build<'_>) -> Result<(), RestoreError> {
    process::restore(Phase::Process, b.s, &b.m.process)
}

/// File descriptors, each kind from the resources registry.
fn fds(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (s, m, shm) = (b.s, b.m, &b.natives.shmem);
    let cx = RestoreCx {
        sys: s,
        shared: &b.natives.fds,
        shmem: shm,
    };
    // A table shared with the parent is the parent's to fill (it is
    // built after its children); its image holds the same descriptors.
    if !b.shares_files {
        cr_ebpf_resources::fd::inherited::close_unheld(s, m)?;
        cr_ebpf_resources::fd::restore(&cx, m)?;
    }
    cr_ebpf_resources::ghost::enter_cwd(s, m, shm)?;
    // Last of what is opened by a path of the restorer's root.
    process::settings::enter_root(s, &m.process)?;
    s.release_adopter()?;
    cr_ebpf_resources::shmem::seal(&m.shmem, shm)
}

/// Threads, each with its own tid, then each thread's own state.
fn threads(b: &mut Build<'_>) -> Result<(), RestoreError> {
    const THREAD_FLAGS: u64 = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    for info in &b.m.threads[1..] {
        let new = b.s.clone3(&CloneArgs {
            flags: THREAD_FLAGS,
            exit_signal: 0,
            set_tid: info.tid,
        })?;
        if new != info.tid as i64 {
            return Err(RestoreError::stub(format!(
                "thread {} came back as {new}",
                info.tid
            )));
        }
        let nt = Tracee::adopt_clone(info.tid).map_err(|source| RestoreError::Build {
            what: format!("taking over thread {}", info.tid),
            source,
        })?;
        b.natives.cgroups.enter_thread(info.tid)?;
        let regs = thread_state(b, &nt, info)?;
        b.others.push((nt, regs, info.sigmask));
    }
    let main =
        b.t.ok_or_else(|| RestoreError::stub("no stub to make threads in"))?;
    b.final_regs = Some(thread_state(b, main, &b.m.threads[0])?);
    Ok(())
}

/// Sets a thread's own kernel state by syscalls in that thread, then its
/// FPU state; returns the registers it must resume with.
fn thread_state(
    b: &Build<'_>,
    t: &Tracee,
    info: &cr_ebpf_image::ThreadInfo,
) -> Result<regs::Regs, RestoreError> {
    let in_thread = Injected::new(t, b.pid, b.tramp, b.tramp + PAGE);
    restore_thread(&in_thread, b.pid, info)?;
    if !info.xstate.is_empty() {
        t.set_xstate(&info.xstate)
            .map_err(|source| RestoreError::Build {
                what: format!("setting the FPU state of thread {}", info.tid),
                source,
            })?;
    }
    let saved = regs::from_bytes(&info.regs)
        .ok_or_else(|| RestoreError::stub("registers of an unknown size"))?;
    Ok(regs::restarted(&saved, true))
}

/// Pending signals and timers last: a timer firing or a signal delivered
/// earlier would interrupt the build.
fn signals(b: &mut Build<'_>) -> Result<(), RestoreError> {
    process::restore(Phase::Signals, b.s, &b.m.process)
}

/// The address of a `syscall` instruction in the restored process: in its
/// vDSO, or, for a process that unmapped its vDSO, in another of its
/// executable mappings (any `0f 05` is one when jumped to).
fn vdso_syscall_insn(pid: i32, m: &Manifest) -> Result<u64, RestoreError> {
    let vdso = m.mappings.iter().filter(|x| x.kind == MappingKind::Vdso);
    let code = m.mappings.iter().filter(|x| {
        x.kind != MappingKind::Vdso && x.prot & libc::PROT_EXEC as u32 != 0 && x.end > x.start
    });
    for x in vdso.chain(code) {
        let mut bytes = vec![0u8; (x.end - x.start) as usize];
        if cr_ebpf_tracee::read_memory(pid, x.start, &mut bytes).is_err() {
            continue;
        }
        if let Some(i) = bytes.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(x.start + i as u64);
        }
    }
    Err(RestoreError::stub(
        "no syscall instruction in the vDSO or any executable mapping",
    ))
}

#[cfg(test)]
mod tests {
    use cr_ebpf_image::{FdInfo, FdKind, MappingInfo, ProcessInfo, SigAction, ThreadInfo};
    use cr_ebpf_resources::sys::fake::Recording;

    use super::*;

    const TRAMP: u64 = 0x5f00_0000_0000;
    const VDSO_TMP: u64 = 0x5f01_0000_0000;

    fn entry(start: u64, pages: u64, path: &str) -> MapEntry {
        MapEntry {
            start,
            end: start + pages * PAGE,
            prot: 5,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            path: path.into(),
            tmpfs: false,
            ghost: false,
            advice: 0,
            guards: Vec::new(),
        }
    }

    fn mapping(start: u64, pages: u64, prot: i32, kind: MappingKind, stored: u64) -> MappingInfo {
        MappingInfo {
            start,
            end: start + pages * PAGE,
            prot: prot as u32,
            kind,
            pages_stored: stored,
            ..MappingInfo::default()
        }
    }

    /// Runs the phases `names` of a build of `m` on the fake.
    fn run(
        m: &Manifest,
        stub_maps: Vec<MapEntry>,
        names: &[&str],
    ) -> Result<Recording, RestoreError> {
        let rec = Recording::new();
        let natives = Natives::build(&[m], &crate::RestoreOptions::default())?;
        let mut b = Build {
            t: None,
            s: &rec,
            pid: 4242,
            m,
            chain: None,
            workers: 1,
            natives: &natives,
            tramp: TRAMP,
            vdso_tmp: VDSO_TMP,
            stub_maps,
            kept: Vec::new(),
            others: Vec::new(),
            final_regs: None,
            filled: crate::Filled::default(),
            shares_files: false,
        };
        for (_, phase) in PHASES.iter().filter(|(n, _)| names.contains(n)) {
            phase(&mut b)?;
        }
        Ok(rec)
    }

    fn layout() -> Vec<MapEntry> {
        vec![
            entry(0x5555_0000_0000, 3, "/usr/bin/cr-ebpf"),
            entry(TRAMP, 2, ""),
            entry(0x7ffd_000f_0000, 4, "[vvar]"),
            entry(0x7ffd_000f_4000, 2, "[vvar_vclock]"),
            entry(0x7ffd_000f_6000, 2, "[vdso]"),
            entry(0x7ffd_0010_0000, 33, "[stack]"),
        ]
    }

    #[test]
    fn the_stub_is_cleared_and_its_vdso_moved_to_the_recorded_place() {
        let mut m = Manifest::default();
        for (start, pages, name) in [
            (0x7fff_1000_0000u64, 4, "[vvar]"),
            (0x7fff_1000_4000, 2, "[vvar_vclock]"),
            (0x7fff_1000_6000, 2, "[vdso]"),
        ] {
            let mut x = mapping(start, pages, 1, MappingKind::Vvar, 0);
            x.path = name.into();
            m.mappings.push(x);
        }
        let rec = run(&m, layout(), &["clear", "vdso"]).unwrap();
        // Only the binary and the stack go: the trampoline and vDSO stay.
        let unmapped: Vec<u64> = rec.calls("munmap").iter().map(|a| a[0]).collect();
        assert_eq!(unmapped, [0x5555_0000_0000, 0x7ffd_0010_0000]);
        // Each special mapping through the free area, keeping its place
        // relative to the others, then to the recorded address.
        let moves: Vec<(u64, u64)> = rec.calls("mremap").iter().map(|a| (a[0], a[4])).collect();
        assert_eq!(
            moves,
            [
                (0x7ffd_000f_0000, VDSO_TMP),
                (0x7ffd_000f_4000, VDSO_TMP + 0x4000),
                (0x7ffd_000f_6000, VDSO_TMP + 0x6000),
                (VDSO_TMP, 0x7fff_1000_0000),
                (VDSO_TMP + 0x4000, 0x7fff_1000_4000),
                (VDSO_TMP + 0x6000, 0x7fff_1000_6000),
            ]
        );
        // A vDSO of another size (another kernel) is refused.
        m.mappings[2].end += PAGE;
        let err = run(&m, layout(), &["clear", "vdso"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("[vdso] is 2 pages on this kernel, 3"),
            "{err}"
        );
    }

    #[test]
    fn mappings_are_writable_while_filled_then_get_their_protection() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let mut code = mapping(0x5555_0000_0000, 2, rx, MappingKind::File, 1);
        code.path = "/usr/bin/true".into();
        let mut stack = mapping(0x7ffd_0010_0000, 33, rw, MappingKind::Stack, 3);
        stack.flags = cr_ebpf_image::MAP_GROWSDOWN;
        let m = Manifest {
            mappings: vec![
                code,
                mapping(0x5555_1000_0000, 8, rw, MappingKind::Anon, 8),
                mapping(0x5555_2000_0000, 1, libc::PROT_READ, MappingKind::Anon, 0),
                stack,
            ],
            ..Manifest::default()
        };
        let rec = run(&m, Vec::new(), &["map", "mm"]).unwrap();
        let mmaps = rec.calls("mmap");
        assert_eq!(mmaps.len(), 4);
        let fixed_private = (libc::MAP_FIXED | libc::MAP_PRIVATE) as u64;
        // The code: opened by path, mapped writable for its copied page.
        let open = rec.calls("openat")[0];
        assert_eq!(rec.memory("openat", 0, open[1], 14), b"/usr/bin/true\0");
        assert_eq!(mmaps[0][2], (rx | libc::PROT_WRITE) as u64);
        assert_eq!(mmaps[0][3], fixed_private);
        assert_eq!(
            rec.calls("close")[0][0],
            mmaps[0][4],
            "the file is closed once mapped"
        );
        assert_eq!(mmaps[1][3], fixed_private | libc::MAP_ANONYMOUS as u64);
        assert_eq!(
            mmaps[2][2],
            libc::PROT_READ as u64,
            "no pages: its own protection"
        );
        assert_eq!(
            mmaps[3][3],
            fixed_private | (libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN) as u64
        );
        // After the fill only the code needs its protection back.
        let protect = rec.calls("mprotect");
        assert_eq!(protect.len(), 1);
        assert_eq!(
            (protect[0][0], protect[0][2]),
            (0x5555_0000_0000, rx as u64)
        );
        assert!(rec.names().contains(&"prctl(PR_SET_MM_MAP)".to_string()));
    }

    #[test]
    fn process_descriptors_and_signals_follow_the_registries_in_order() {
        let m = Manifest {
            process: ProcessInfo {
                pid: 4242,
                cwd: "/".into(),
                sigactions: vec![SigAction {
                    signo: 10,
                    handler: 0x5555_0000_1000,
                    ..SigAction::default()
                }],
                itimers: [(0, 500_000), (0, 0), (0, 0)],
                ..ProcessInfo::default()
            },
            threads: vec![ThreadInfo::default()],
            fds: vec![FdInfo {
                fd: 7,
                kind: FdKind::CharDevice,
                path: "/dev/null".into(),
                flags: libc::O_RDWR as u32,
                ..FdInfo::default()
            }],
            ..Manifest::default()
        };
        let rec = run(&m, Vec::new(), &["process", "fds", "signals"]).unwrap();
        let names = rec.names();
        let at = |n: &str| {
            names
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("{n} in {names:?}"))
        };
        assert!(at("chdir") < at("rt_sigaction"));
        assert!(
            at("rt_sigaction") < at("openat"),
            "handlers before descriptors"
        );
        assert!(at("dup3") < at("setitimer"), "timers last");
        assert_eq!(rec.calls("dup3")[0][1], 7);
    }
}
