//! Everything but memory contents, collected while the process is frozen.
//! Shared by full dumps and incremental checkpoints; the latter may reuse
//! what the previous checkpoint asked the process for when the resource log
//! says it cannot have changed.

use std::fs::File;

use cr_ebpf_image::{
    ChainInfo, FdInfo, Manifest, MappingInfo, MappingKind, ProcessInfo, ShmemObject, ThreadInfo,
};
pub use cr_ebpf_resources::process::{Changes, Queries};
use cr_ebpf_resources::{advice, process};
use cr_ebpf_tracee::{Frozen, Injector};

use crate::{error::proc_err, maps, maps::MapEntry, proc, DumpError};

/// The frozen process's state, memory contents excepted.
pub(crate) struct State {
    pub entries: Vec<MapEntry>,
    pub process: ProcessInfo,
    pub threads: Vec<ThreadInfo>,
    pub fds: Vec<FdInfo>,
    /// Shared memory objects, without their contents.
    pub shmem: Vec<ShmemObject>,
    /// The file to read the contents of each object this process stores,
    /// by id (see [`crate::shm_pages::place`]).
    pub shm_files: std::collections::HashMap<u64, File>,
    /// Duplicates of the established TCP connections (see [`crate::fds::Fds`]).
    pub tcp: Vec<(i32, std::os::fd::OwnedFd)>,
    /// File locks held, each through one descriptor.
    pub locks: Vec<cr_ebpf_image::FileLock>,
    /// The files in flight on its unix sockets (see [`crate::fds::Fds`]).
    pub in_flight: Vec<(i32, std::os::fd::OwnedFd)>,
    pub pagemap: File,
    pub queries: Queries,
}

/// What the user allowed a checkpoint to take.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Allow {
    /// Unix connections to named sockets outside (`--ext-unix-sk`).
    pub ext_unix_sk: bool,
    /// Most contents stored per deleted file and shared memory object.
    pub limits: cr_ebpf_resources::shmem::Limits,
}

/// Collects the state of the frozen process. `prev` is the previous
/// checkpoint of the same process, whose injected answers are reused where
/// `changes` says they still hold. `tree`: the scope shared by the
/// processes checkpointed together (their children are part of the
/// checkpoint); without it, a process with children is refused.
pub(crate) fn collect(
    frozen: &Frozen,
    prev: Option<&Manifest>,
    changes: &Changes,
    tree: Option<&mut crate::fds::TreeScope>,
    allow: Allow,
) -> Result<State, DumpError> {
    let pid = frozen.pid();
    // Read from /proc and the cgroup file systems alone: on a thread of its
    // own while the rest is collected (joined before the process runs).
    let mut cgroups = CgroupsRead(
        std::thread::Builder::new()
            .name("cgroups".into())
            .spawn(move || process::cgroup::record(pid))
            .ok(),
    );
    let trace = |source| DumpError::Trace { pid, source };
    let mut queries = Queries::default();
    let maps_path = format!("/proc/{pid}/maps");
    let maps_text =
        std::fs::read_to_string(&maps_path).map_err(proc_err(pid, maps_path.clone()))?;
    let mut entries = maps::parse_maps(&maps_text).map_err(|e| DumpError::Proc {
        pid,
        path: maps_path.clone(),
        source: std::io::Error::other(e),
    })?;
    maps::mark_tmpfs(pid, &mut entries);
    maps::mark_ghosts(pid, &mut entries);
    // Each mapping's own settings: carried over while the log shows no
    // change, read from smaps (a page-table walk) otherwise.
    let carried = prev.is_some_and(|p| advice::inherit(&mut entries, &p.mappings, changes));
    if !carried {
        let smaps = format!("/proc/{pid}/smaps");
        if let Some(at) = advice::read(pid, &mut entries).map_err(proc_err(pid, smaps))? {
            return Err(DumpError::NotSupported {
                pid,
                what: format!(
                    "a sealed mapping (mseal) at {at:#x}: it would not be sealed after a restore"
                ),
            });
        }
    }
    refuse_deleted_mappings(pid, &entries)?;
    // Children would be lost: a restored parent waiting for them would
    // wait forever. (A process with children is checkpointed as a tree; one
    // forked after the tree was listed lands here.)
    let children = proc::children(pid);
    if !children.is_empty() && tree.is_none() {
        let list: Vec<String> = children.iter().map(i32::to_string).collect();
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "child processes ({}) that appeared while it was being checkpointed (try again)",
                list.join(", ")
            ),
        });
    }
    // Descriptors first: an unsupported one fails before the long part.
    let mut tree = tree;
    let crate::fds::Fds {
        fds,
        tcp,
        locks,
        in_flight,
    } = crate::fds::collect(pid, tree.as_deref_mut(), allow.ext_unix_sk, peeked(prev))?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).map_err(proc_err(pid, pagemap_path.clone()))?;
    // Guard regions, recorded with their mappings and installed again;
    // carried over, like the settings, where the log shows no change.
    let known = prev.filter(|_| carried).map(|p| &p.mappings[..]);
    let touched = |s, e| changes.layout_touched(s, e);
    cr_ebpf_resources::proc::guards::mark(&pagemap, &mut entries, known, &touched)
        .map_err(proc_err(pid, format!("{pagemap_path} (PAGEMAP_SCAN)")))?;

    let injector = Injector::new(pid).map_err(trace)?;
    let threads = process::threads::save_threads(
        pid,
        &injector,
        frozen.threads(),
        prev,
        changes,
        &mut queries,
    )?;
    let together: Vec<i32> = tree.as_ref().map_or(vec![pid], |t| t.pids.clone());
    let shell_job = tree.as_ref().is_some_and(|t| t.shell_job);
    let (shmem, shm_files) = crate::shmem::capture(
        pid,
        &entries,
        &fds,
        tree.map(|t| &mut t.shmem_taken),
        allow.limits,
    )?;
    // Process-wide state, each kind from its own file.
    let mut info = ProcessInfo {
        pid,
        monotonic_ns: crate::monotonic_ns(),
        boottime_ns: crate::clock_ns(libc::CLOCK_BOOTTIME),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_string(),
        ..ProcessInfo::default()
    };
    let ask = cr_ebpf_resources::sys::ask::Frozen {
        pid,
        injector: &injector,
        main: &frozen.threads()[0],
    };
    let mut cx = process::SaveCx {
        pid,
        together: &together,
        shell_job,
        ask: &ask,
        known: prev.filter(|_| !changes.unknown),
        changes,
        queries: &mut queries,
        brk: entries
            .iter()
            .find(|m| m.kind() == MappingKind::Heap)
            .map(|m| m.end),
        cgroups: cgroups.take(),
    };
    process::save(&mut cx, &mut info)?;
    Ok(State {
        entries,
        process: info,
        threads,
        fds,
        shmem,
        shm_files,
        tcp,
        locks,
        in_flight,
        pagemap,
        queries,
    })
}

/// Deleted files with no link left are stored (marked by
/// `maps::mark_ghosts`); a mapping of one with a link left, or of a kernel
/// object's file (`/[aio]`), is refused.
fn refuse_deleted_mappings(pid: i32, entries: &[MapEntry]) -> Result<(), DumpError> {
    let Some(m) = entries
        .iter()
        .find(|m| m.kind() == MappingKind::File && m.path.ends_with(" (deleted)"))
    else {
        return Ok(());
    };
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let why = if m.path.starts_with("/[") {
        format!("the kernel's {} (an AIO ring or the like)", m.path)
    } else {
        std::fs::metadata(&path)
            .ok()
            .and_then(|meta| cr_ebpf_resources::ghost::refusal(&m.path, &meta))
            .unwrap_or_else(|| format!("the deleted file {}", m.path))
    };
    Err(DumpError::NotSupported {
        pid,
        what: format!("a mapping of {why} at {:#x}-{:#x}", m.start, m.end),
    })
}

/// The thread reading a process's cgroups during its collection: joined
/// when taken, or when dropped (an early error), so that nothing of it (a
/// hierarchy it mounted for the read) outlives the collection.
struct CgroupsRead(
    Option<
        std::thread::JoinHandle<Result<process::cgroup::Recorded, cr_ebpf_resources::SaveError>>,
    >,
);

impl CgroupsRead {
    fn take(&mut self) -> Option<Result<process::cgroup::Recorded, cr_ebpf_resources::SaveError>> {
        Some(self.0.take()?.join().expect("the cgroups thread panicked"))
    }
}

impl Drop for CgroupsRead {
    fn drop(&mut self) {
        let _ = self.take();
    }
}

impl State {
    /// Where the files in flight of the processes of `states` (by pid) are
    /// held here, for [`crate::fds::description::share`].
    pub fn in_flight<'a>(
        states: impl IntoIterator<Item = (i32, &'a State)>,
    ) -> crate::fds::description::InFlight {
        use std::os::fd::AsRawFd as _;
        states
            .into_iter()
            .flat_map(|(pid, s)| {
                s.in_flight
                    .iter()
                    .map(move |(n, own)| ((pid, *n), own.as_raw_fd()))
            })
            .collect()
    }

    /// The image record of mapping `m`.
    pub fn mapping(m: &MapEntry, pages_stored: u64, flags: u32) -> MappingInfo {
        MappingInfo {
            start: m.start,
            end: m.end,
            prot: m.prot,
            flags: m.image_flags() | flags,
            offset: m.offset,
            kind: m.kind(),
            path: m.path.clone(),
            dev: m.dev,
            inode: m.inode,
            pages_stored,
            guards: m.guards.clone(),
        }
    }

    /// The manifest, stamped with the time of writing and the freeze.
    pub fn manifest(
        &self,
        mappings: Vec<MappingInfo>,
        freeze_ns: u64,
        chain: Option<ChainInfo>,
    ) -> Manifest {
        let mut process = self.process.clone();
        process.taken_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        process.freeze_ns = freeze_ns;
        Manifest {
            process,
            threads: self.threads.clone(),
            mappings,
            fds: self.fds.clone(),
            chain,
            shmem: self.shmem.clone(),
            locks: self.locks.clone(),
            cow: Vec::new(),
            network_lock: None,
        }
    }
}

/// The unix sockets whose queue held an empty message in `prev` (the
/// checkpoint before): that checkpoint's read marked it peeked, and the
/// kernel passes over a marked empty message in every later read.
fn peeked(prev: Option<&Manifest>) -> std::collections::HashSet<u64> {
    let sockets = prev
        .into_iter()
        .flat_map(|m| &m.fds)
        .filter_map(|f| match &f.state {
            cr_ebpf_image::FdState::Socket(s) => Some(s),
            _ => None,
        });
    sockets
        .filter(|s| s.family == libc::AF_UNIX as u16 && s.queue.iter().any(Vec::is_empty))
        .map(|s| s.inode)
        .collect()
}
