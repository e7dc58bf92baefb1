//! Kernel-side programs of cr-ebpf: a continuous log of what tracked processes change.
//!
//! * raw tracepoints `sys_enter` + `sys_exit`: one [`SyscallEvent`] per completed
//!   resource-changing syscall of a tracked process (arguments, return value,
//!   path argument). The syscall set is the `SYSCALL_FILTER` bitmap.
//! * raw tracepoints `page_fault_user` + `page_fault_kernel`: one [`FaultEvent`] per
//!   write fault on a user address of a tracked process.
//! * `sched/sched_process_fork|exit|exec`: children of a tracked process are
//!   tracked from their first instruction, exited processes leave the set.
//!
//! Filtering happens here: an untracked task costs one hash lookup per
//! syscall. A record that does not fit in the ring buffer is counted in
//! `LOSSES` for its process, never silently lost.
// For the BPF target. A host build of the workspace (`cargo build
// --workspace`, `cargo test --workspace`) compiles the programs as a plain
// binary that does nothing; the real objects are built by loader/build.rs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference, as the BPF helpers take them: the code the verifier accepts stays as it is"
)]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_probe_read_kernel,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::error;
use cr_ebpf_common::{
    syscalls, Config, EventHeader, EventKind, ExecEvent, ExitEvent, FaultEvent, ForkEvent,
    LossCounter, PendingSyscall, SyscallEvent, TrackedProcess, CONFIG_F_KERNEL_FAULTS,
    CONFIG_F_USER_FAULTS, EVENT_ABI_VERSION, EXEC_F_TRUNCATED, EXIT_F_GROUP_DEAD,
    EXIT_F_GROUP_UNKNOWN, FAULT_F_KERNEL, FIELD_ABSENT, FORK_F_FLAGS_UNKNOWN, FORK_F_THREAD,
    PATH_CAPTURE, SYSCALL_FILTER_BITS, SYSCALL_FILTER_WORDS, SYSCALL_F_NO_RETURN, SYSCALL_F_PATH,
    SYSCALL_F_PATH_FAULT, SYSCALL_F_PATH_TRUNCATED,
};

/// Processes whose events are logged, by tgid.
#[map]
static TRACKED: HashMap<u32, TrackedProcess> = HashMap::with_max_entries(16384, 0);

/// Bit `nr` set: syscall `nr` is logged.
#[map]
static SYSCALL_FILTER: Array<u64> = Array::with_max_entries(SYSCALL_FILTER_WORDS, 0);

/// Tracepoint field offsets and switches, written by the loader.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Syscalls entered by tracked threads and not returned yet, by tid. A plain
/// hash, not an LRU: an entry must never be evicted silently. When it is
/// full the syscall is counted as a loss. Entries of threads that exit
/// inside a syscall are removed by `sched_process_exit`.
#[map]
static PENDING: HashMap<u32, PendingSyscall> = HashMap::with_max_entries(16384, 0);

/// The event log. The loader may resize it before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Records lost per process, by tgid, one counter per CPU (no atomics
/// needed). Userspace sums the CPUs and acknowledges by deleting.
#[map]
static LOSSES: PerCpuHashMap<u32, LossCounter> = PerCpuHashMap::with_max_entries(16384, 0);

/// Losses that could not be attributed (LOSSES full).
#[map]
static UNATTRIBUTED_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Fault records lost (a hint only: never a reason to re-collect state).
#[map]
static FAULT_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x10000;
const SIGCHLD: u64 = 17;
/// First address above the x86_64 user half.
const USER_ADDR_END: u64 = 0x0000_8000_0000_0000;

/// Byte offsets in x86_64 `struct pt_regs` (a fixed kernel ABI: ptrace and
/// the syscall entry code depend on it).
mod regs {
    pub const R10: usize = 7 * 8;
    pub const R9: usize = 8 * 8;
    pub const R8: usize = 9 * 8;
    pub const DX: usize = 12 * 8;
    pub const SI: usize = 13 * 8;
    pub const DI: usize = 14 * 8;
    pub const ORIG_AX: usize = 15 * 8;
    pub const IP: usize = 16 * 8;
}
/// Write bit of the x86 page-fault error code.
const PF_WRITE: u64 = 2;

/// Reads the u64 at `offset` in the `struct pt_regs` at `regs`.
#[inline(always)]
fn reg(regs: *const u8, offset: usize) -> u64 {
    // SAFETY: `regs` is the pt_regs pointer the tracepoint passed; the read
    // goes through the helper, which cannot fault the kernel.
    unsafe { bpf_probe_read_kernel(regs.add(offset) as *const u64) }.unwrap_or(0)
}

/// The six syscall arguments from the entry registers.
#[inline(always)]
fn syscall_args(regs: *const u8) -> [u64; 6] {
    [
        reg(regs, regs::DI),
        reg(regs, regs::SI),
        reg(regs, regs::DX),
        reg(regs, regs::R10),
        reg(regs, regs::R8),
        reg(regs, regs::R9),
    ]
}

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

#[inline(always)]
fn header(kind: EventKind, size: usize, tgid: u32, tid: u32) -> EventHeader {
    EventHeader {
        abi: EVENT_ABI_VERSION,
        kind: kind as u16,
        size: size as u32,
        tgid,
        tid,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn is_tracked(tgid: u32) -> bool {
    TRACKED.get_ptr(&tgid).is_some()
}

/// Counts one record of `tgid` that did not fit in the ring buffer.
#[inline(always)]
fn count_loss(tgid: u32) {
    if let Some(counter) = LOSSES.get_ptr_mut(&tgid) {
        // SAFETY: this CPU's slot of a per-CPU value from a successful
        // lookup; nothing else writes it while this program runs.
        unsafe { (*counter).dropped += 1 };
        return;
    }
    let first = LossCounter {
        dropped: 1,
        // SAFETY: helper without preconditions.
        first_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LOSSES.insert(&tgid, &first, 0).is_err() {
        // The map is full: count it where userspace still sees it.
        if let Some(n) = UNATTRIBUTED_LOSSES.get_ptr_mut(0) {
            // SAFETY: per-CPU slot of this CPU; no other writer while we run.
            unsafe { *n += 1 };
        }
    }
}

#[inline(always)]
fn syscall_wanted(nr: u64) -> bool {
    if nr >= SYSCALL_FILTER_BITS as u64 {
        return false;
    }
    match SYSCALL_FILTER.get((nr / 64) as u32) {
        Some(word) => (*word >> (nr % 64)) & 1 == 1,
        None => false,
    }
}

/// Writes one syscall record.
#[inline(always)]
fn emit_syscall(tgid: u32, tid: u32, p: &PendingSyscall, ret: i64, flags: u32) {
    let Some(mut entry) = EVENTS.reserve::<SyscallEvent>(0) else {
        count_loss(tgid);
        return;
    };
    let ev = entry.as_mut_ptr();
    let nr = p.nr as u32;
    let mut flags = flags;
    let mut path_len = 0u32;
    // SAFETY: `ev` points to a reserved, writable record of the right size.
    unsafe {
        (*ev).header = header(
            EventKind::Syscall,
            core::mem::size_of::<SyscallEvent>(),
            tgid,
            tid,
        );
        (*ev).nr = nr;
        (*ev).args = p.args;
        (*ev).ret = ret;
        (*ev).enter_ns = p.enter_ns;
        (*ev)._pad = 0;
        (*ev).path[0] = 0;
        let arg = match nr {
            syscalls::OPEN | syscalls::CREAT | syscalls::CHDIR | syscalls::MEMFD_CREATE => {
                Some(p.args[0])
            }
            syscalls::OPENAT | syscalls::OPENAT2 => Some(p.args[1]),
            _ => None,
        };
        if let Some(ptr) = arg {
            let buf = &mut (*ev).path;
            match bpf_probe_read_user_str_bytes(ptr as *const u8, buf) {
                Ok(s) => {
                    path_len = s.len() as u32;
                    flags |= SYSCALL_F_PATH;
                    if s.len() >= PATH_CAPTURE - 1 {
                        flags |= SYSCALL_F_PATH_TRUNCATED;
                    }
                }
                Err(_) => flags |= SYSCALL_F_PATH_FAULT,
            }
        }
        (*ev).path_len = path_len;
        (*ev).flags = flags;
    }
    // A syscall-heavy process makes hundreds of thousands of these a second:
    // waking the reader for each costs the process more than the record.
    entry.submit(wake_lazily(core::mem::size_of::<SyscallEvent>()));
}

/// Raw tracepoint `sys_enter(struct pt_regs *regs, long id)`: no record is
/// formatted for us, so an untracked task costs one hash lookup.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_tracked(tgid) {
        return 0;
    }
    let tid = pid_tgid as u32;
    let nr: i64 = ctx.arg(1);
    if nr < 0 || !syscall_wanted(nr as u64) {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let args = syscall_args(regs);
    let mut p = PendingSyscall {
        nr: nr as u64,
        // SAFETY: helper without preconditions.
        enter_ns: unsafe { bpf_ktime_get_ns() },
        args,
        clone_flags: 0,
    };
    let nr = nr as u32;
    if nr == syscalls::CLONE3 {
        // `struct clone_args` starts with the u64 flags word.
        // SAFETY: reading user memory through the helper cannot fault the kernel.
        p.clone_flags = unsafe { bpf_probe_read_user(args[0] as *const u64) }.unwrap_or(0);
    }
    if nr == syscalls::EXIT || nr == syscalls::EXIT_GROUP {
        emit_syscall(tgid, tid, &p, 0, SYSCALL_F_NO_RETURN);
        return 0;
    }
    if PENDING.insert(&tid, &p, 0).is_err() {
        count_loss(tgid);
    }
    0
}

/// Raw tracepoint `sys_exit(struct pt_regs *regs, long ret)`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(pending) = PENDING.get_ptr(&tid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup; copied out before removal.
    let p = unsafe { *pending };
    let _ = PENDING.remove(&tid);
    let tgid = (pid_tgid >> 32) as u32;
    let regs: *const u8 = ctx.arg(0);
    let id = reg(regs, regs::ORIG_AX);
    let ret: i64 = ctx.arg(1);
    if id != p.nr || !is_tracked(tgid) {
        return 0;
    }
    emit_syscall(tgid, tid, &p, ret, 0);
    0
}

/// Raw tracepoints `page_fault_user|kernel(unsigned long address,
/// struct pt_regs *regs, unsigned long error_code)`.
#[inline(always)]
fn on_fault(ctx: &RawTracePointContext, kernel: bool) -> i32 {
    let error_code: u64 = ctx.arg(2);
    if error_code & PF_WRITE == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_tracked(tgid) {
        return 0;
    }
    let wanted = if kernel {
        CONFIG_F_KERNEL_FAULTS
    } else {
        CONFIG_F_USER_FAULTS
    };
    if config().flags & wanted == 0 {
        return 0;
    }
    let address: u64 = ctx.arg(0);
    if address >= USER_ADDR_END {
        return 0;
    }
    let regs: *const u8 = ctx.arg(1);
    let event = FaultEvent {
        header: header(
            EventKind::Fault,
            core::mem::size_of::<FaultEvent>(),
            tgid,
            pid_tgid as u32,
        ),
        address,
        ip: reg(regs, regs::IP),
        error_code,
        flags: if kernel { FAULT_F_KERNEL } else { 0 },
        _pad: 0,
    };
    // Faults come in bursts of thousands: waking the reader for each would
    // cost the faulting task an interrupt every time.
    let wake = wake_lazily(core::mem::size_of::<FaultEvent>());
    if EVENTS.output::<FaultEvent>(&event, wake).is_err() {
        if let Some(n) = FAULT_LOSSES.get_ptr_mut(0) {
            // SAFETY: per-CPU slot of this CPU; no other writer while we run.
            unsafe { *n += 1 };
        }
    }
    0
}

/// Pending bytes in the ring buffer at each multiple of which a fault or
/// syscall record wakes the reader.
const LAZY_WAKEUP_BYTES: u64 = 64 << 10;

/// Wake-up flags for a fault or syscall record (`size` bytes): the reader is
/// woken once per `LAZY_WAKEUP_BYTES` of pending records, by the record that
/// crosses a multiple of it, and drains on its own timer otherwise (the
/// loader's stream polls every few tens of milliseconds).
#[inline(always)]
fn wake_lazily(size: usize) -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let record = (size as u64 + 8 + 7) & !7;
    if pending / LAZY_WAKEUP_BYTES != (pending + record) / LAZY_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Wake-up flags for a fork, exit or exec record: these wake the reader at
/// once (the service re-attaches after an exec and stops after an exit).
/// The kernel's default would not when lazy records are pending (it wakes
/// only a reader that had caught up), so the wake-up is forced, unless so
/// much is pending that the reader was already woken at a 64 KiB crossing.
#[inline(always)]
fn wake_now() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) < LAZY_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        0
    }
}

#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn page_fault_user(ctx: RawTracePointContext) -> i32 {
    on_fault(&ctx, false)
}

#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn page_fault_kernel(ctx: RawTracePointContext) -> i32 {
    on_fault(&ctx, true)
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // Runs in the parent's context, before the child's first instruction.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(parent) = TRACKED.get_ptr(&tgid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup.
    let root_tgid = unsafe { (*parent).root_tgid };
    let tid = pid_tgid as u32;
    let cfg = config();
    // SAFETY: offset read from this kernel's tracefs format by the loader.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(cfg.fork_child_pid as usize) }) else {
        return 0;
    };
    let child = child as u32;

    let mut flags = 0u32;
    let clone_flags = match PENDING.get_ptr(&tid) {
        // SAFETY: pointer from a successful lookup.
        Some(p) => match unsafe { ((*p).nr as u32, (*p).args[0], (*p).clone_flags) } {
            (syscalls::CLONE, f, _) => f,
            (syscalls::CLONE3, _, f) => f,
            (syscalls::FORK, _, _) => SIGCHLD,
            (syscalls::VFORK, _, _) => CLONE_VM | CLONE_VFORK | SIGCHLD,
            _ => {
                flags |= FORK_F_FLAGS_UNKNOWN;
                0
            }
        },
        None => {
            flags |= FORK_F_FLAGS_UNKNOWN;
            0
        }
    };
    let child_tgid = if clone_flags & CLONE_THREAD != 0 {
        flags |= FORK_F_THREAD;
        tgid
    } else {
        // A new process (or, with unknown flags, possibly a kernel-created
        // thread such as an io_uring worker: its stray entry goes when it exits).
        let value = TrackedProcess {
            root_tgid,
            flags: 0,
        };
        if TRACKED.insert(&child, &value, 0).is_err() {
            error!(
                &ctx,
                "cr-ebpf: tracked-process map full: child {} of {} is NOT tracked", child, tgid
            );
            count_loss(tgid);
        }
        child
    };
    let event = ForkEvent {
        header: header(
            EventKind::Fork,
            core::mem::size_of::<ForkEvent>(),
            tgid,
            tid,
        ),
        child_tid: child,
        child_tgid,
        clone_flags,
        flags,
        _pad: 0,
    };
    if EVENTS.output::<ForkEvent>(&event, wake_now()).is_err() {
        count_loss(tgid);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // A thread that dies inside a logged syscall never reaches sys_exit; its
    // process may have been untracked meanwhile, so clean up regardless.
    let _ = PENDING.remove(&tid);
    if tid != tgid {
        // A thread never owns a TRACKED entry; drop a stray one (see fork).
        let _ = TRACKED.remove(&tid);
    }
    if !is_tracked(tgid) {
        return 0;
    }
    let cfg = config();
    let flags = if cfg.exit_group_dead == FIELD_ABSENT {
        EXIT_F_GROUP_UNKNOWN
    } else {
        // SAFETY: offset read from this kernel's tracefs format by the loader.
        match unsafe { ctx.read_at::<u8>(cfg.exit_group_dead as usize) } {
            Ok(0) => 0,
            Ok(_) => EXIT_F_GROUP_DEAD,
            Err(_) => EXIT_F_GROUP_UNKNOWN,
        }
    };
    let event = ExitEvent {
        header: header(
            EventKind::Exit,
            core::mem::size_of::<ExitEvent>(),
            tgid,
            tid,
        ),
        flags,
        _pad: 0,
    };
    if EVENTS.output::<ExitEvent>(&event, wake_now()).is_err() {
        count_loss(tgid);
    }
    if flags & EXIT_F_GROUP_DEAD != 0 {
        let _ = TRACKED.remove(&tgid);
    }
    0
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_tracked(tgid) {
        return 0;
    }
    let tid = pid_tgid as u32;
    let cfg = config();
    // SAFETY: offset read from this kernel's tracefs format by the loader.
    let old_tid = unsafe { ctx.read_at::<i32>(cfg.exec_old_pid as usize) }.unwrap_or(0) as u32;
    if old_tid != tid {
        // A non-leader thread exec'd and took over the leader's id: its
        // pending execve now returns under the new id.
        if let Some(p) = PENDING.get_ptr(&old_tid) {
            // SAFETY: pointer from a successful lookup; copied before removal.
            let p = unsafe { *p };
            let _ = PENDING.remove(&old_tid);
            let _ = PENDING.insert(&tid, &p, 0);
        }
    }
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_loss(tgid);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, writable record of the right size;
    // the filename is read from the tracepoint record through the helper.
    unsafe {
        (*ev).header = header(
            EventKind::Exec,
            core::mem::size_of::<ExecEvent>(),
            tgid,
            tid,
        );
        (*ev).old_tid = old_tid;
        (*ev)._pad = 0;
        (*ev).filename[0] = 0;
        let mut flags = 0;
        let mut len = 0u32;
        if let Ok(loc) = ctx.read_at::<u32>(cfg.exec_filename as usize) {
            let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
            if let Ok(s) = bpf_probe_read_kernel_str_bytes(src, &mut (*ev).filename) {
                len = s.len() as u32;
                if s.len() >= PATH_CAPTURE - 1 {
                    flags |= EXEC_F_TRUNCATED;
                }
            }
        }
        (*ev).filename_len = len;
        (*ev).flags = flags;
    }
    entry.submit(wake_now());
    0
}

#[cfg(not(test))]
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// A host build's entry point: the programs only run in the kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
