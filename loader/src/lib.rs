//! Loads the cr-ebpf eBPF programs, attaches them, manages the set of tracked
//! processes and turns the ring buffer into a typed event stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cr_ebpf_loader::{Tracer, TracerOptions};
//! let mut tracer = Tracer::load(&TracerOptions::default())?;
//! tracer.track(1234)?;
//! let mut events = tracer.events()?;
//! let mut batch = Vec::new();
//! events.next_batch(&mut batch).await?;
//! for event in batch {
//!     println!("{:?}", event?);
//! }
//! # Ok(()) }
//! ```
//!
//! The object is built from `../ebpf` by this crate's `build.rs` and embedded.
//! Dropping the [`Tracer`] detaches every program.

pub mod display;
mod error;
pub mod event;
mod kernel_log;
pub mod netlock;
mod proc;
mod stream;
pub mod tracefs;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{RawTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use cr_ebpf_common::{self as abi, map_names, Config, LossCounter, TrackedProcess, FIELD_ABSENT};

pub use error::LoaderError;
pub use event::{DecodeError, Event};
pub use stream::{EventStream, BATCH_MAX, POLL_INTERVAL};

/// The eBPF object built from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cr-ebpf-probes"));

/// Capacity of the tracked-process map (see `ebpf/src/main.rs`).
pub const TRACKED_CAPACITY: u32 = 16384;

/// What to log and how much room the log has.
#[derive(Debug, Clone)]
pub struct TracerOptions {
    /// Ring buffer size in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Syscall numbers to log.
    pub syscalls: Vec<u32>,
    /// Log write faults taken in user mode.
    pub user_faults: bool,
    /// Log write faults taken by the kernel on user addresses.
    pub kernel_faults: bool,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: 4 << 20,
            syscalls: abi::syscalls::RESOURCE_SYSCALLS.to_vec(),
            user_faults: true,
            kernel_faults: true,
        }
    }
}

/// Events of one process that did not fit in the ring buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Loss {
    /// The process.
    pub tgid: u32,
    /// How many records were lost since the last acknowledgement.
    pub dropped: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the first of them (earliest over CPUs).
    pub first_ns: u64,
}

/// Outcome of loading and attaching one program (for `cr-ebpf check`).
#[derive(Debug)]
pub struct ProgramStatus {
    /// Program name.
    pub program: &'static str,
    /// `category/name` of its tracepoint.
    pub tracepoint: String,
    /// `Ok` when it loaded and attached.
    pub result: Result<(), LoaderError>,
}

/// The loaded and attached programs and their maps.
pub struct Tracer {
    ebpf: Ebpf,
    logger: Option<kernel_log::KernelLogger>,
}

impl Tracer {
    /// Loads the object, configures it and attaches every program.
    pub fn load(options: &TracerOptions) -> Result<Self, LoaderError> {
        let (tracer, statuses) = Self::load_inner(options, true)?;
        for s in statuses {
            s.result?;
        }
        Ok(tracer)
    }

    /// Loads the object and tries every program on its own, reporting each.
    pub fn probe(options: &TracerOptions) -> Result<(Self, Vec<ProgramStatus>), LoaderError> {
        Self::load_inner(options, false)
    }

    fn load_inner(
        options: &TracerOptions,
        stop_on_error: bool,
    ) -> Result<(Self, Vec<ProgramStatus>), LoaderError> {
        let tracefs = tracefs::find().ok_or(LoaderError::TracefsMissing)?;
        let config = kernel_config(&tracefs, options)?;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::EVENTS, options.ring_buffer_bytes)
            .load(OBJECT)
            .map_err(|e| {
                if error::is_permission(&e) {
                    LoaderError::NotPermitted {
                        action: "load eBPF maps and programs".into(),
                        source: std::io::Error::from_raw_os_error(libc::EPERM),
                    }
                } else {
                    LoaderError::Load(Box::new(e))
                }
            })?;
        let logger = kernel_log::KernelLogger::init(&mut ebpf);

        {
            let mut cfg: Array<&mut MapData, Config> = Array::try_from(
                ebpf.map_mut(map_names::CONFIG)
                    .ok_or(LoaderError::MissingMap(map_names::CONFIG))?,
            )
            .map_err(|e| map_err(map_names::CONFIG, "open", e))?;
            cfg.set(0, config, 0)
                .map_err(|e| map_err(map_names::CONFIG, "write the configuration", e))?;
        }
        {
            let mut filter: Array<&mut MapData, u64> = Array::try_from(
                ebpf.map_mut(map_names::SYSCALL_FILTER)
                    .ok_or(LoaderError::MissingMap(map_names::SYSCALL_FILTER))?,
            )
            .map_err(|e| map_err(map_names::SYSCALL_FILTER, "open", e))?;
            for (i, word) in syscall_bitmap(&options.syscalls).into_iter().enumerate() {
                filter
                    .set(i as u32, word, 0)
                    .map_err(|e| map_err(map_names::SYSCALL_FILTER, "write the bitmap", e))?;
            }
        }

        let mut statuses = Vec::new();
        for spec in abi::PROGRAMS {
            let result = attach(&mut ebpf, &spec);
            let failed = result.is_err();
            statuses.push(ProgramStatus {
                program: spec.name,
                tracepoint: match spec.attach {
                    abi::Attach::Raw => format!("raw tracepoint {}", spec.tracepoint),
                    abi::Attach::TracePoint => format!("{}/{}", spec.category, spec.tracepoint),
                },
                result,
            });
            if failed && stop_on_error {
                break;
            }
        }
        Ok((Self { ebpf, logger }, statuses))
    }

    fn tracked_map(&mut self) -> Result<HashMap<&mut MapData, u32, TrackedProcess>, LoaderError> {
        HashMap::try_from(
            self.ebpf
                .map_mut(map_names::TRACKED)
                .ok_or(LoaderError::MissingMap(map_names::TRACKED))?,
        )
        .map_err(|e| map_err(map_names::TRACKED, "open", e))
    }

    /// Starts logging process `pid` and every process it already has below it;
    /// processes it creates from now on are tracked by the kernel side.
    /// Returns the pids that were added.
    pub fn track(&mut self, pid: u32) -> Result<Vec<u32>, LoaderError> {
        if !proc::exists(pid) {
            return Err(LoaderError::NoSuchProcess { pid });
        }
        // Root first: anything it forks from now on is caught in the kernel.
        self.insert_tracked(pid, pid)?;
        let mut added = vec![pid];
        for child in proc::descendants(pid) {
            self.insert_tracked(child, pid)?;
            added.push(child);
        }
        Ok(added)
    }

    fn insert_tracked(&mut self, pid: u32, root: u32) -> Result<(), LoaderError> {
        let mut map = self.tracked_map()?;
        let value = TrackedProcess {
            root_tgid: root,
            flags: 0,
        };
        map.insert(pid, value, 0).map_err(|e| {
            if error::io_error_of(&e).and_then(std::io::Error::raw_os_error) == Some(libc::E2BIG) {
                LoaderError::TrackedMapFull {
                    pid,
                    capacity: TRACKED_CAPACITY,
                }
            } else {
                map_err(map_names::TRACKED, "add a process", e)
            }
        })
    }

    /// Stops logging process `pid` (its children stay tracked).
    pub fn untrack(&mut self, pid: u32) -> Result<(), LoaderError> {
        let mut map = self.tracked_map()?;
        match map.remove(&pid) {
            Ok(()) => Ok(()),
            Err(e)
                if error::io_error_of(&e).and_then(std::io::Error::raw_os_error)
                    == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(map_names::TRACKED, "remove a process", e)),
        }
    }

    /// The processes currently tracked, with the root each belongs to.
    pub fn tracked(&mut self) -> Result<Vec<(u32, u32)>, LoaderError> {
        let map = self.tracked_map()?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (pid, value) = item.map_err(|e| map_err(map_names::TRACKED, "list", e))?;
            out.push((pid, value.root_tgid));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Lost records per process since the last [`Tracer::acknowledge_loss`].
    pub fn losses(&mut self) -> Result<Vec<Loss>, LoaderError> {
        let map: PerCpuHashMap<&mut MapData, u32, LossCounter> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(map_names::LOSSES)
                .ok_or(LoaderError::MissingMap(map_names::LOSSES))?,
        )
        .map_err(|e| map_err(map_names::LOSSES, "open", e))?;
        let mut out = Vec::new();
        for item in map.iter() {
            let (tgid, per_cpu) = item.map_err(|e| map_err(map_names::LOSSES, "list", e))?;
            let dropped = per_cpu.iter().map(|c| c.dropped).sum();
            let first_ns = per_cpu
                .iter()
                .filter(|c| c.dropped > 0)
                .map(|c| c.first_ns)
                .min()
                .unwrap_or(0);
            out.push(Loss {
                tgid,
                dropped,
                first_ns,
            });
        }
        out.sort_unstable_by_key(|l| l.tgid);
        Ok(out)
    }

    /// Forgets the losses of `tgid` once the caller has acted on them (for a
    /// checkpoint: re-collected everything they may have covered).
    pub fn acknowledge_loss(&mut self, tgid: u32) -> Result<(), LoaderError> {
        let mut map: PerCpuHashMap<&mut MapData, u32, LossCounter> = PerCpuHashMap::try_from(
            self.ebpf
                .map_mut(map_names::LOSSES)
                .ok_or(LoaderError::MissingMap(map_names::LOSSES))?,
        )
        .map_err(|e| map_err(map_names::LOSSES, "open", e))?;
        let _ = map.remove(&tgid);
        Ok(())
    }

    /// Records lost that could not be attributed to a process (loss map full).
    pub fn unattributed_losses(&mut self) -> Result<u64, LoaderError> {
        let arr: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(map_names::UNATTRIBUTED_LOSSES)
                .ok_or(LoaderError::MissingMap(map_names::UNATTRIBUTED_LOSSES))?,
        )
        .map_err(|e| map_err(map_names::UNATTRIBUTED_LOSSES, "open", e))?;
        let values = arr
            .get(&0, 0)
            .map_err(|e| map_err(map_names::UNATTRIBUTED_LOSSES, "read", e))?;
        Ok(values.iter().sum())
    }

    /// Fault records lost, all processes together. They are not in
    /// [`Tracer::losses`]: faults are a hint (pre-copy timing), the dirty
    /// tracker's scan is what checkpoints rely on.
    pub fn fault_losses(&mut self) -> Result<u64, LoaderError> {
        let arr: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(map_names::FAULT_LOSSES)
                .ok_or(LoaderError::MissingMap(map_names::FAULT_LOSSES))?,
        )
        .map_err(|e| map_err(map_names::FAULT_LOSSES, "open", e))?;
        let values = arr
            .get(&0, 0)
            .map_err(|e| map_err(map_names::FAULT_LOSSES, "read", e))?;
        Ok(values.iter().sum())
    }

    /// Takes the event stream. Can be called once; needs a tokio runtime.
    pub fn events(&mut self) -> Result<EventStream, LoaderError> {
        let map = self
            .ebpf
            .take_map(map_names::EVENTS)
            .ok_or(LoaderError::MissingMap(map_names::EVENTS))?;
        EventStream::new(map, self.logger.take())
    }
}

fn map_err(map: &'static str, what: &str, e: aya::maps::MapError) -> LoaderError {
    LoaderError::Map {
        map,
        what: what.into(),
        source: Box::new(e),
    }
}

fn attach(ebpf: &mut Ebpf, spec: &abi::ProgramSpec) -> Result<(), LoaderError> {
    let (program, category, name) = (spec.name, spec.category, spec.tracepoint);
    let wrap = |action: &'static str, e: aya::programs::ProgramError| {
        if error::is_permission(&e) {
            LoaderError::NotPermitted {
                action: format!(
                    "{} program {program}",
                    if action == "loaded" { "load" } else { "attach" }
                ),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            }
        } else {
            LoaderError::Program {
                program: program.into(),
                action,
                category: category.into(),
                name: name.into(),
                source: Box::new(e),
            }
        }
    };
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| LoaderError::Program {
            program: program.into(),
            action: "found",
            category: category.into(),
            name: name.into(),
            source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?;
    match spec.attach {
        abi::Attach::Raw => {
            let prog: &mut RawTracePoint = prog.try_into().map_err(|e| wrap("loaded", e))?;
            prog.load().map_err(|e| wrap("loaded", e))?;
            prog.attach(name).map_err(|e| wrap("attached", e))?;
        }
        abi::Attach::TracePoint => {
            let prog: &mut TracePoint = prog.try_into().map_err(|e| wrap("loaded", e))?;
            prog.load().map_err(|e| wrap("loaded", e))?;
            prog.attach(category, name)
                .map_err(|e| wrap("attached", e))?;
        }
    }
    Ok(())
}

/// The `SYSCALL_FILTER` words for a set of syscall numbers.
pub fn syscall_bitmap(syscalls: &[u32]) -> [u64; abi::SYSCALL_FILTER_WORDS as usize] {
    let mut words = [0u64; abi::SYSCALL_FILTER_WORDS as usize];
    for &nr in syscalls {
        if (nr as usize) < abi::SYSCALL_FILTER_BITS {
            words[nr as usize / 64] |= 1 << (nr % 64);
        }
    }
    words
}

/// Reads this kernel's `sched_*` layouts into the programs' configuration.
fn kernel_config(
    tracefs: &std::path::Path,
    options: &TracerOptions,
) -> Result<Config, LoaderError> {
    let need = |category: &str, event: &str, field: &str| -> Result<u32, LoaderError> {
        let format = tracefs::Format::read(tracefs, category, event)?;
        format
            .field(field)
            .map(|f| f.offset)
            .ok_or_else(|| LoaderError::TracepointField {
                event: format!("{category}/{event}"),
                field: field.into(),
            })
    };
    // The other programs' tracepoints must exist too: fail early with their name.
    for spec in abi::PROGRAMS {
        tracefs::Format::read(tracefs, spec.category, spec.tracepoint)?;
    }
    let exit = tracefs::Format::read(tracefs, "sched", "sched_process_exit")?;
    let mut flags = 0;
    if options.user_faults {
        flags |= abi::CONFIG_F_USER_FAULTS;
    }
    if options.kernel_faults {
        flags |= abi::CONFIG_F_KERNEL_FAULTS;
    }
    Ok(Config {
        flags,
        fork_child_pid: need("sched", "sched_process_fork", "child_pid")?,
        exit_group_dead: exit
            .field("group_dead")
            .map(|f| f.offset)
            .unwrap_or(FIELD_ABSENT),
        exec_old_pid: need("sched", "sched_process_exec", "old_pid")?,
        exec_filename: need("sched", "sched_process_exec", "filename")?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sets_exactly_the_given_bits() {
        let w = syscall_bitmap(&[0, 63, 64, 435, 9999]);
        assert_eq!(w[0], 1 | (1 << 63));
        assert_eq!(w[1], 1);
        assert_eq!(w[6], 1 << (435 - 384));
        assert_eq!(w.iter().map(|x| x.count_ones()).sum::<u32>(), 4);
    }
}
