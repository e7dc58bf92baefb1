//! `dump`: a full checkpoint of one live process.

use std::{
    fs::File,
    path::Path,
    time::{Duration, Instant},
};

use cr_ebpf_image::{
    pages::{Chunk, PageWriter, MAX_CHUNK_PAGES},
    publish, ImageError, Manifest, MappingInfo, MappingKind, ProcessInfo, SigAction, ThreadInfo,
};
use cr_ebpf_tracee::{regs, Frozen, Injector, TraceError};
use rayon::prelude::*;

use crate::{maps, proc};

/// How to dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Resume the process afterwards instead of killing it.
    pub leave_running: bool,
    /// Threads reading and compressing pages (0: all cores).
    pub threads: usize,
}

/// What a dump did.
#[derive(Debug, Clone)]
pub struct DumpReport {
    /// The process.
    pub pid: i32,
    /// Its threads.
    pub threads: usize,
    /// Its mappings.
    pub mappings: usize,
    /// Pages stored.
    pub pages: u64,
    /// Size of the page store on disk.
    pub page_bytes: u64,
    /// First thread stopped until the last resumed (or the process was killed).
    pub freeze: Duration,
    /// The whole dump.
    pub total: Duration,
    /// Threads that read and compressed pages.
    pub workers: usize,
}

impl DumpReport {
    /// Page data read per second of freeze, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        (self.pages * 4096) as f64 / self.total.as_secs_f64() / 1e9
    }
}

/// Why a dump failed. The process is running again (never left stopped or
/// killed by a failure), and no image was published.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Freezing or inspecting with ptrace failed.
    #[error("freezing or inspecting process {pid}")]
    Trace {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: TraceError,
    },
    /// Reading /proc failed.
    #[error("reading {path} of process {pid}")]
    Proc {
        /// The process.
        pid: i32,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("writing the image")]
    Image(#[from] ImageError),
    /// The process cannot be checkpointed by this version.
    #[error("not supported: {what} in process {pid}")]
    NotSupported {
        /// The process.
        pid: i32,
        /// What.
        what: String,
    },
}

fn proc_err(pid: i32, path: String) -> impl FnOnce(std::io::Error) -> DumpError {
    move |source| DumpError::Proc { pid, path, source }
}

/// Checkpoints process `pid` into a new image directory `dir`.
pub fn dump(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpReport, DumpError> {
    let start = Instant::now();
    if pid == std::process::id() as i32 {
        return Err(DumpError::NotSupported {
            pid,
            what: "cr-ebpf cannot checkpoint itself".into(),
        });
    }
    if dir.exists() {
        return Err(ImageError::Exists {
            path: dir.display().to_string(),
        }
        .into());
    }
    let workers = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("dump-reader-{i}"))
        .build()
        .map_err(|e| DumpError::NotSupported {
            pid,
            what: format!("starting the reader threads: {e}"),
        })?;

    // From here on an error drops `frozen`, which resumes every thread.
    let frozen = Frozen::freeze(pid).map_err(|source| DumpError::Trace { pid, source })?;
    let trace = |source| DumpError::Trace { pid, source };

    let maps_path = format!("/proc/{pid}/maps");
    let maps_text =
        std::fs::read_to_string(&maps_path).map_err(proc_err(pid, maps_path.clone()))?;
    let entries = maps::parse_maps(&maps_text).map_err(|e| DumpError::Proc {
        pid,
        path: maps_path.clone(),
        source: std::io::Error::other(e),
    })?;
    if let Some(shared) = entries
        .iter()
        .find(|m| m.shared && m.kind() != MappingKind::File)
    {
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "shared anonymous memory at {:#x}-{:#x} (comes with process trees)",
                shared.start, shared.end
            ),
        });
    }
    // A process confined to another root directory cannot be rebuilt yet.
    let root = std::fs::read_link(format!("/proc/{pid}/root"))
        .map_err(proc_err(pid, format!("/proc/{pid}/root")))?;
    if root != Path::new("/") {
        return Err(DumpError::NotSupported {
            pid,
            what: format!("a root directory other than / ({})", root.display()),
        });
    }
    // Descriptors first: an unsupported one fails the dump before the long part.
    let fds = crate::fds::collect(pid)?;
    let pagemap_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pagemap_path).map_err(proc_err(pid, pagemap_path.clone()))?;

    let injector = Injector::new(pid).map_err(trace)?;
    let mut threads = Vec::new();
    for t in frozen.threads() {
        // Registers first: injected calls below must not show in them.
        let r = t.regs().map_err(trace)?;
        let rseq = t.rseq().map_err(trace)?;
        let (ret, out) = injector
            .call_out(t, libc::SYS_prctl, 8, |at| {
                [libc::PR_GET_TID_ADDRESS as u64, at, 0, 0, 0, 0]
            })
            .map_err(trace)?;
        let clear_child_tid = if ret == 0 {
            u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
        } else {
            0
        };
        let (ret, ss) = injector
            .call_out(t, libc::SYS_sigaltstack, 24, |at| [0, at, 0, 0, 0, 0])
            .map_err(trace)?;
        let sigaltstack = if ret == 0 {
            let w = |i: usize| u64::from_le_bytes(ss[i..i + 8].try_into().expect("8 bytes"));
            (w(0), w(8) as u32, w(16))
        } else {
            (0, libc::SS_DISABLE as u32, 0)
        };
        threads.push(ThreadInfo {
            tid: t.tid(),
            regs: regs::to_bytes(&r),
            xstate: t.xstate().map_err(trace)?,
            rseq: rseq.map_or((0, 0, 0), |q| (q.ptr, q.len, q.sig)),
            robust_list: t.robust_list().map_err(trace)?,
            clear_child_tid,
            sigaltstack,
            pending: t.pending_signals(false).map_err(trace)?,
            comm: std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", t.tid()))
                .map(|c| c.trim_end_matches('\n').chars().take(15).collect())
                .unwrap_or_default(),
            sigmask: proc::sigmask(pid, t.tid()).map_err(proc_err(
                pid,
                format!("/proc/{pid}/task/{}/status", t.tid()),
            ))?,
        });
    }
    let brk = entries
        .iter()
        .find(|m| m.kind() == MappingKind::Heap)
        .map(|m| m.end);
    let mm = proc::mm_fields(pid, 0).map_err(proc_err(pid, format!("/proc/{pid}/stat")))?;
    let mut mm = mm;
    mm[5] = brk.unwrap_or(mm[4]);
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))
        .map_err(proc_err(pid, format!("/proc/{pid}/auxv")))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(proc_err(pid, format!("/proc/{pid}/exe")))?
        .display()
        .to_string();

    // Process-wide state only the process can be asked for.
    let main = &frozen.threads()[0];
    let mut sigactions = Vec::new();
    for signo in 1..=64u32 {
        if signo == libc::SIGKILL as u32 || signo == libc::SIGSTOP as u32 {
            continue;
        }
        let (ret, out) = injector
            .call_out(main, libc::SYS_rt_sigaction, 32, |at| {
                [signo as u64, 0, at, 8, 0, 0]
            })
            .map_err(trace)?;
        if ret != 0 {
            continue;
        }
        let w = |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let a = SigAction {
            signo,
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        };
        if a.handler != 0 || a.flags != 0 || a.mask != 0 {
            sigactions.push(a);
        }
    }
    let mut itimers = [(0u64, 0u64); 3];
    for (which, slot) in itimers.iter_mut().enumerate() {
        let (ret, out) = injector
            .call_out(main, libc::SYS_getitimer, 32, |at| {
                [which as u64, at, 0, 0, 0, 0]
            })
            .map_err(trace)?;
        if ret == 0 {
            let w =
                |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *slot = (w(0) * 1_000_000 + w(1), w(2) * 1_000_000 + w(3));
        }
    }
    let pending = main.pending_signals(true).map_err(trace)?;
    let creds = proc::creds(pid).map_err(proc_err(pid, format!("/proc/{pid}/status")))?;
    let umask = proc::umask(pid).map_err(proc_err(pid, format!("/proc/{pid}/status")))?;
    let personality =
        proc::personality(pid).map_err(proc_err(pid, format!("/proc/{pid}/personality")))?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map_err(proc_err(pid, format!("/proc/{pid}/cwd")))?
        .display()
        .to_string();
    let rlimits = proc::rlimits(pid).map_err(proc_err(pid, "prlimit64".into()))?;

    // Which pages to store, split into chunks for the readers.
    let mut mappings = Vec::new();
    let mut work: Vec<(u64, u64)> = Vec::new();
    for m in &entries {
        let runs = maps::dumpable_runs(&pagemap, m).map_err(proc_err(pid, pagemap_path.clone()))?;
        let stored: u64 = runs.iter().map(|r| r.1).sum();
        for (addr, n) in runs {
            let mut off = 0;
            while off < n {
                let k = (n - off).min(256.min(MAX_CHUNK_PAGES as u64));
                work.push((addr + off * 4096, k));
                off += k;
            }
        }
        mappings.push(MappingInfo {
            start: m.start,
            end: m.end,
            prot: m.prot,
            flags: m.image_flags(),
            offset: m.offset,
            kind: m.kind(),
            path: m.path.clone(),
            dev: m.dev,
            inode: m.inode,
            pages_stored: stored,
        });
    }

    let mut frozen = Some(frozen);
    let mut freeze = Duration::ZERO;
    let (pages, page_bytes) = publish(dir, |tmp| {
        let mut writer = PageWriter::create(tmp)?;
        // Readers compress in parallel; one writer thread appends in
        // arrival order, overlapping reading, compressing and writing.
        let (tx, rx) = crossbeam_channel::bounded::<Chunk>(workers * 4);
        let written = std::thread::scope(|s| {
            let w = s.spawn(move || -> Result<PageWriter, ImageError> {
                for c in rx {
                    writer.write(&c)?;
                }
                Ok(writer)
            });
            let read: Result<(), TraceError> = pool.install(|| {
                work.par_iter().try_for_each_init(
                    || vec![0u8; 256 * 4096],
                    |buf, &(addr, n)| {
                        let b = &mut buf[..n as usize * 4096];
                        cr_ebpf_tracee::read_memory(pid, addr, b)?;
                        // A closed channel means the writer failed: its error wins.
                        let _ = tx.send(Chunk::compress(addr, b));
                        Ok(())
                    },
                )
            });
            drop(tx);
            let writer = w.join().expect("page writer thread panicked");
            (read, writer)
        });
        let (read, writer) = written;
        read.map_err(|e| ImageError::Io {
            path: format!("memory of process {pid}"),
            what: "reading",
            source: std::io::Error::other(e.to_string()),
        })?;
        let writer = writer?;
        // Everything is read: a process that stays alive can run again
        // while the files are finished.
        if opts.leave_running {
            if let Some(f) = frozen.take() {
                let since = f.since;
                f.thaw().map_err(|e| ImageError::Io {
                    path: format!("process {pid}"),
                    what: "resuming",
                    source: std::io::Error::other(e.to_string()),
                })?;
                freeze = since.elapsed();
            }
        }
        let (pages, bytes) = writer.finish()?;
        let taken_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let freeze_ns = match &frozen {
            // Killed right after publication: count up to now.
            Some(f) => f.since.elapsed().as_nanos() as u64,
            None => freeze.as_nanos() as u64,
        };
        let manifest = Manifest {
            process: ProcessInfo {
                pid,
                exe: exe.clone(),
                mm,
                auxv: auxv.clone(),
                taken_unix_ns,
                freeze_ns,
                umask,
                personality,
                cwd: cwd.clone(),
                rlimits: rlimits.clone(),
                sigactions: sigactions.clone(),
                itimers,
                pending: pending.clone(),
                creds,
            },
            threads: threads.clone(),
            mappings: mappings.clone(),
            fds: fds.clone(),
        };
        manifest.write(tmp)?;
        Ok((pages, bytes))
    })?;

    // Published: only now may the process go, as `criu dump` does.
    if let Some(f) = frozen.take() {
        let since = f.since;
        f.kill().map_err(trace)?;
        freeze = since.elapsed();
    }
    Ok(DumpReport {
        pid,
        threads: threads.len(),
        mappings: mappings.len(),
        pages,
        page_bytes,
        freeze,
        total: start.elapsed(),
        workers,
    })
}
