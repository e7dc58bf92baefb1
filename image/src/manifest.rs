//! `manifest.img`: tagged sections describing the process.
//!
//! Payload: a sequence of sections `tag: u16, flags: u16, len: u32, body`.
//! Flag bit 0 marks a section a reader may skip if it does not know the tag;
//! any other unknown tag is an error. Exactly one `PROCESS` section, then
//! `THREAD` sections (main thread first) and `MAPPING` sections (by address).

use std::path::Path;

use crate::{
    codec::{Dec, DecErr, Enc},
    fdstate::FdState,
    file::{self, FileKind},
    ImageError,
};

const TAG_PROCESS: u16 = 1;
const TAG_THREAD: u16 = 2;
const TAG_MAPPING: u16 = 3;
const TAG_FD: u16 = 4;
const TAG_CHAIN: u16 = 5;
const TAG_POSIX_TIMER: u16 = 6;
const TAG_SHMEM: u16 = 7;
/// Largest shared memory object stored (its contents are in the manifest).
pub const SHMEM_CAP: u64 = 64 << 20;
/// Most POSIX timers of one process stored.
const POSIX_TIMERS_CAP: usize = 1 << 16;
/// Largest pipe contents stored.
const PIPE_DATA_CAP: usize = 16 << 20;
const SECTION_OPTIONAL: u16 = 1;

const PATH_CAP: usize = 4096;
const NAME_CAP: usize = 255;
/// SHMEM flag: the contents are in another process image of the tree.
const SHMEM_ELSEWHERE: u16 = 1;
const REGS_CAP: usize = 1024;
const XSTATE_CAP: usize = 64 * 1024;
const AUXV_CAP: usize = 4096;

/// `MappingInfo::flags`: `MAP_SHARED` (otherwise private).
pub const MAP_SHARED: u32 = 1;
/// `MappingInfo::flags`: a stack that grows down.
pub const MAP_GROWSDOWN: u32 = 2;
/// Mapping flag (format 1.1): pages of this mapping not stored in this
/// image live in the parent image's mapping with the same range.
pub const MAP_INHERITS: u32 = 4;

/// Where a checkpoint sits in a chain (format 1.1, section CHAIN).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainInfo {
    /// This checkpoint's name: its directory name in the images directory.
    pub id: String,
    /// The parent's name (a sibling directory), empty for a full image.
    pub parent: String,
    /// Position in the images directory; parents have smaller numbers.
    pub seq: u64,
    /// How the changed pages were found (`full`, `uffd-wp`, `hashing`,
    /// `soft-dirty`, `compacted`).
    pub method: String,
}

/// The process-wide part of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id at checkpoint time.
    pub pid: i32,
    /// Path of the executable.
    pub exe: String,
    /// `start_code, end_code, start_data, end_data, start_brk, brk,
    /// start_stack, arg_start, arg_end, env_start, env_end`.
    pub mm: [u64; 11],
    /// The auxiliary vector (`/proc/PID/auxv`).
    pub auxv: Vec<u8>,
    /// Wall-clock time of the checkpoint (Unix nanoseconds).
    pub taken_unix_ns: u64,
    /// How long the process was frozen (first thread stopped to last resumed
    /// or killed), in nanoseconds.
    pub freeze_ns: u64,
    /// File mode creation mask.
    pub umask: u32,
    /// Execution domain (`personality(0xffffffff)`).
    pub personality: u32,
    /// Working directory.
    pub cwd: String,
    /// Resource limits, `RLIMIT_*` order: (soft, hard); `u64::MAX` is infinity.
    pub rlimits: Vec<(u64, u64)>,
    /// Signal dispositions that are not the default.
    pub sigactions: Vec<SigAction>,
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`: (interval, remaining)
    /// in microseconds.
    pub itimers: [(u64, u64); 3],
    /// Signals pending for the whole process, as 128-byte `siginfo_t`s.
    pub pending: Vec<Vec<u8>>,
    /// Credentials: real, effective, saved, filesystem uid, then the same gids.
    pub creds: [u32; 8],
    /// POSIX timers (`timer_create`), by id (format 1.2, sections POSIX_TIMER).
    pub posix_timers: Vec<PosixTimer>,
    /// Format 1.2: `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` (ns) when the
    /// process was frozen, and the kernel's boot id then: a restore after
    /// a reboot puts the process in a time namespace whose clocks go on
    /// from these instead of going backwards. Zero and empty in older images.
    pub monotonic_ns: u64,
    pub boottime_ns: u64,
    pub boot_id: String,
}

/// What kind of shared memory object.
#[repr(u16)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShmemKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, `/dev/zero (deleted)`).
    Anonymous = 1,
    /// A memfd (`memfd_create`), with its name and seals.
    Memfd = 2,
    /// A System V segment (`shmget`): `id` is its shmid.
    SysV = 3,
    /// A file on tmpfs mapped shared (`shm_open`, `/dev/shm`; format 1.3):
    /// `name` is its path, `mode` its permission bits. Its contents are the
    /// process's memory as much as its other shared memory: stored, and
    /// written back into the file at restore.
    TmpfsFile = 4,
}

/// A shared memory object without a file to reopen, with its contents
/// (format 1.2, section SHMEM). Mappings of kind [`MappingKind::Shmem`] and
/// memfd descriptors refer to it by `id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShmemObject {
    /// Its inode at checkpoint time: the id mappings and descriptors use.
    pub id: u64,
    pub kind: ShmemKind,
    /// A memfd's name (without `memfd:`), a tmpfs file's path.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `F_SEAL_*` of a memfd.
    pub seals: u32,
    /// A System V segment's key and permission bits.
    pub key: i32,
    pub mode: u32,
    /// Contents: (offset, bytes) runs; holes are zero.
    pub data: Vec<(u64, Vec<u8>)>,
    /// The contents are in the image of another process of the same tree
    /// checkpoint (format 1.3): each object is stored once per tree.
    pub elsewhere: bool,
}

/// One POSIX timer (`timer_create`), as `/proc/PID/timers` and an injected
/// `timer_gettime` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PosixTimer {
    /// The timer id the process uses.
    pub id: i32,
    /// Its clock.
    pub clockid: i32,
    /// `sigev_notify`: `SIGEV_SIGNAL` 0, `SIGEV_NONE` 1, `SIGEV_THREAD_ID` 4.
    pub notify: i32,
    /// The signal it sends.
    pub signo: i32,
    /// `sigev_value`, delivered with the signal.
    pub value: u64,
    /// For `SIGEV_THREAD_ID`: the thread the signal goes to.
    pub tid: i32,
    /// Remaining time until it fires (0: disarmed), and its interval, ns.
    pub remaining_ns: u64,
    pub interval_ns: u64,
}

/// One signal disposition, as the kernel's `struct sigaction` for `rt_sigaction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigAction {
    /// Signal number.
    pub signo: u32,
    /// Handler address, or 0 `SIG_DFL`, 1 `SIG_IGN`.
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// One thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Thread id at checkpoint time.
    pub tid: i32,
    /// `user_regs_struct` bytes.
    pub regs: Vec<u8>,
    /// XSAVE area bytes.
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Registered rseq area: address (0: none), size, signature.
    pub rseq: (u64, u32, u32),
    /// Robust futex list: head address, length.
    pub robust_list: (u64, u64),
    /// `clear_child_tid` (`set_tid_address`): zeroed and woken at thread exit.
    pub clear_child_tid: u64,
    /// Alternate signal stack: (`ss_sp`, `ss_flags`, `ss_size`).
    pub sigaltstack: (u64, u32, u64),
    /// Signals pending for this thread only, as 128-byte `siginfo_t`s.
    pub pending: Vec<Vec<u8>>,
    /// Thread name (`comm`, at most 15 bytes).
    pub comm: String,
}

/// What a mapping is. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MappingKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// Anonymous memory.
    Anon = 1,
    /// Backed by a file (`path`).
    File = 2,
    /// `[heap]`.
    Heap = 3,
    /// `[stack]`.
    Stack = 4,
    /// `[vdso]`: kernel-provided code, moved to its address at restore.
    Vdso = 5,
    /// `[vvar]`, `[vvar_vclock]`: kernel data pages of the vDSO.
    Vvar = 6,
    /// `[vsyscall]`: fixed by the kernel, nothing to restore.
    Vsyscall = 7,
    /// Format 1.2: a shared memory object with no file to reopen (shared
    /// anonymous memory, a memfd); `inode` names it in [`Manifest::shmem`].
    Shmem = 8,
}

impl TryFrom<u16> for MappingKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Anon,
            2 => Self::File,
            3 => Self::Heap,
            4 => Self::Stack,
            5 => Self::Vdso,
            6 => Self::Vvar,
            7 => Self::Vsyscall,
            8 => Self::Shmem,
            other => return Err(other),
        })
    }
}

/// One memory mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingInfo {
    /// First address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_SHARED`, `MAP_GROWSDOWN` of this module.
    pub flags: u32,
    /// File offset.
    pub offset: u64,
    /// Kind.
    pub kind: MappingKind,
    /// File path, or the kernel's name (`[vvar]`) for special mappings.
    pub path: String,
    /// Device of the file (`major << 32 | minor`).
    pub dev: u64,
    /// Inode of the file.
    pub inode: u64,
    /// Pages of this mapping stored in the page store.
    pub pages_stored: u64,
}

/// What an open file descriptor refers to. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FdKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// A regular file or directory, reopened by path and checked by identity.
    File = 1,
    /// A character device (`/dev/null`, a terminal), reopened by path.
    CharDevice = 2,
    /// One end of a pipe whose both ends the process holds; recreated with
    /// its buffered bytes.
    Pipe = 3,
    /// Connected to the outside (a pipe end whose other end is elsewhere):
    /// the restorer passes its own descriptor of the same number.
    Inherited = 4,
    /// An epoll set (format 1.2; state [`FdState::Epoll`]).
    Epoll = 5,
    /// An eventfd (format 1.2; state [`FdState::EventFd`]).
    EventFd = 6,
    /// A timerfd (format 1.2; state [`FdState::TimerFd`]).
    TimerFd = 7,
    /// A signalfd (format 1.2; state [`FdState::SignalFd`]).
    SignalFd = 8,
    /// A socket (format 1.2; state [`FdState::Socket`]).
    Socket = 9,
    /// An inotify instance (format 1.2; state [`FdState::Inotify`]).
    Inotify = 10,
    /// A memfd (format 1.2; state [`FdState::Memfd`], contents in [`Manifest::shmem`]).
    Memfd = 11,
    /// A pidfd (format 1.2; state [`FdState::Pidfd`]).
    Pidfd = 12,
}

impl TryFrom<u16> for FdKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::File,
            2 => Self::CharDevice,
            3 => Self::Pipe,
            4 => Self::Inherited,
            5 => Self::Epoll,
            6 => Self::EventFd,
            7 => Self::TimerFd,
            8 => Self::SignalFd,
            9 => Self::Socket,
            10 => Self::Inotify,
            11 => Self::Memfd,
            12 => Self::Pidfd,
            other => return Err(other),
        })
    }
}

/// One open file descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// Descriptor number.
    pub fd: i32,
    /// What it refers to.
    pub kind: FdKind,
    /// `O_*` status flags and access mode, as in `/proc/PID/fdinfo`.
    pub flags: u32,
    /// Close-on-exec.
    pub cloexec: bool,
    /// File position.
    pub pos: u64,
    /// Path (files, devices).
    pub path: String,
    /// Inode (files: checked at restore; pipes: identifies the pipe).
    pub inode: u64,
    /// Device of the file.
    pub dev: u64,
    /// Size of the file at checkpoint time.
    pub size: u64,
    /// Modification time of the file, nanoseconds since the epoch.
    pub mtime_ns: u64,
    /// Pipe buffer size (`F_GETPIPE_SZ`).
    pub pipe_size: u32,
    /// Bytes buffered in the pipe (stored once, on its read end).
    pub data: Vec<u8>,
    /// What the kinds added in format 1.2 hold.
    pub state: FdState,
}

/// Everything in `manifest.img`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The process.
    pub process: ProcessInfo,
    /// Its threads, main thread first.
    pub threads: Vec<ThreadInfo>,
    /// Its mappings, by address.
    pub mappings: Vec<MappingInfo>,
    /// Its open file descriptors, by number.
    pub fds: Vec<FdInfo>,
    /// Its place in a chain of checkpoints; `None` for a standalone image.
    pub chain: Option<ChainInfo>,
    /// Shared memory objects its mappings and descriptors refer to (format 1.2).
    pub shmem: Vec<ShmemObject>,
}

/// Size of a `siginfo_t`.
pub const SIGINFO_LEN: usize = 128;

fn decode_siginfos(b: &mut Dec<'_>) -> Result<Vec<Vec<u8>>, DecErr> {
    let n = b.u32()? as usize;
    if n > 4096 {
        return Err(b.err(format!("{n} pending signals (at most 4096)")));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let at = b.offset();
        let info = b.bytes(SIGINFO_LEN, "siginfo")?;
        if info.len() != SIGINFO_LEN {
            return Err(DecErr {
                offset: at,
                what: format!("siginfo of {} bytes, expected {SIGINFO_LEN}", info.len()),
            });
        }
        out.push(info.to_vec());
    }
    Ok(out)
}

fn section(out: &mut Enc, tag: u16, body: Enc) {
    out.u16(tag);
    out.u16(0);
    out.u32(body.buf.len() as u32);
    out.buf.extend_from_slice(&body.buf);
}

impl Manifest {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Enc::default();
        let p = &self.process;
        let mut b = Enc::default();
        b.i32(p.pid);
        b.str(&p.exe);
        for v in p.mm {
            b.u64(v);
        }
        b.bytes(&p.auxv);
        b.u64(p.taken_unix_ns);
        b.u64(p.freeze_ns);
        b.u32(p.umask);
        b.u32(p.personality);
        b.str(&p.cwd);
        b.u32(p.rlimits.len() as u32);
        for (cur, max) in &p.rlimits {
            b.u64(*cur);
            b.u64(*max);
        }
        b.u32(p.sigactions.len() as u32);
        for a in &p.sigactions {
            b.u32(a.signo);
            b.u32(0);
            b.u64(a.handler);
            b.u64(a.flags);
            b.u64(a.restorer);
            b.u64(a.mask);
        }
        for (interval, value) in p.itimers {
            b.u64(interval);
            b.u64(value);
        }
        b.u32(p.pending.len() as u32);
        for info in &p.pending {
            b.bytes(info);
        }
        for c in p.creds {
            b.u32(c);
        }
        b.u64(p.monotonic_ns);
        b.u64(p.boottime_ns);
        b.str(&p.boot_id);
        section(&mut out, TAG_PROCESS, b);
        for t in &p.posix_timers {
            let mut b = Enc::default();
            b.i32(t.id);
            b.i32(t.clockid);
            b.i32(t.notify);
            b.i32(t.signo);
            b.u64(t.value);
            b.i32(t.tid);
            b.u32(0);
            b.u64(t.remaining_ns);
            b.u64(t.interval_ns);
            section(&mut out, TAG_POSIX_TIMER, b);
        }
        for t in &self.threads {
            let mut b = Enc::default();
            b.i32(t.tid);
            b.bytes(&t.regs);
            b.bytes(&t.xstate);
            b.u64(t.sigmask);
            b.u64(t.rseq.0);
            b.u32(t.rseq.1);
            b.u32(t.rseq.2);
            b.u64(t.robust_list.0);
            b.u64(t.robust_list.1);
            b.u64(t.clear_child_tid);
            b.u64(t.sigaltstack.0);
            b.u32(t.sigaltstack.1);
            b.u64(t.sigaltstack.2);
            b.u32(t.pending.len() as u32);
            for info in &t.pending {
                b.bytes(info);
            }
            b.str(&t.comm);
            section(&mut out, TAG_THREAD, b);
        }
        for m in &self.mappings {
            let mut b = Enc::default();
            b.u64(m.start);
            b.u64(m.end);
            b.u32(m.prot);
            b.u32(m.flags);
            b.u64(m.offset);
            b.u16(m.kind as u16);
            b.str(&m.path);
            b.u64(m.dev);
            b.u64(m.inode);
            b.u64(m.pages_stored);
            section(&mut out, TAG_MAPPING, b);
        }
        for f in &self.fds {
            let mut b = Enc::default();
            b.i32(f.fd);
            b.u16(f.kind as u16);
            b.u16(f.cloexec as u16);
            b.u32(f.flags);
            b.u64(f.pos);
            b.str(&f.path);
            b.u64(f.inode);
            b.u64(f.dev);
            b.u64(f.size);
            b.u64(f.mtime_ns);
            b.u32(f.pipe_size);
            b.bytes(&f.data);
            f.state.encode(&mut b);
            section(&mut out, TAG_FD, b);
        }
        for o in &self.shmem {
            let mut b = Enc::default();
            b.u64(o.id);
            b.u16(o.kind as u16);
            b.u16(u16::from(o.elsewhere));
            b.u32(o.seals);
            b.i32(o.key);
            b.u32(o.mode);
            b.str(&o.name);
            b.u64(o.size);
            b.u32(o.data.len() as u32);
            for (off, bytes) in &o.data {
                b.u64(*off);
                b.bytes(bytes);
            }
            section(&mut out, TAG_SHMEM, b);
        }
        if let Some(c) = &self.chain {
            let mut b = Enc::default();
            b.str(&c.id);
            b.str(&c.parent);
            b.u64(c.seq);
            b.str(&c.method);
            section(&mut out, TAG_CHAIN, b);
        }
        out.buf
    }

    /// Parses a payload; `base` is its offset in the file (for messages).
    pub fn decode(payload: &[u8], base: u64) -> Result<Self, DecErr> {
        let mut d = Dec::new(payload, base);
        let mut process = None;
        let mut threads = Vec::new();
        let mut mappings: Vec<MappingInfo> = Vec::new();
        let mut fds: Vec<FdInfo> = Vec::new();
        let mut chain = None;
        let mut posix_timers: Vec<PosixTimer> = Vec::new();
        let mut shmem: Vec<ShmemObject> = Vec::new();
        while !d.done() {
            let at = d.offset();
            let tag = d.u16()?;
            let flags = d.u16()?;
            let len = d.u32()? as usize;
            let body = d.take(len)?;
            let mut b = Dec::new(body, at + 8);
            match tag {
                TAG_PROCESS => {
                    if process.is_some() {
                        return Err(DecErr {
                            offset: at,
                            what: "a second PROCESS section".into(),
                        });
                    }
                    let pid = b.i32()?;
                    let exe = b.str(PATH_CAP, "exe path")?;
                    let mut mm = [0u64; 11];
                    for v in &mut mm {
                        *v = b.u64()?;
                    }
                    let auxv = b.bytes(AUXV_CAP, "auxv")?.to_vec();
                    let taken_unix_ns = b.u64()?;
                    let freeze_ns = b.u64()?;
                    let umask = b.u32()?;
                    let personality = b.u32()?;
                    let cwd = b.str(PATH_CAP, "working directory")?;
                    let n = b.u32()? as usize;
                    if n > 64 {
                        return Err(b.err(format!("{n} resource limits (at most 64)")));
                    }
                    let mut rlimits = Vec::with_capacity(n);
                    for _ in 0..n {
                        rlimits.push((b.u64()?, b.u64()?));
                    }
                    let n = b.u32()? as usize;
                    if n > 64 {
                        return Err(b.err(format!("{n} signal dispositions (at most 64)")));
                    }
                    let mut sigactions = Vec::with_capacity(n);
                    for _ in 0..n {
                        let signo = b.u32()?;
                        let _pad = b.u32()?;
                        if !(1..=64).contains(&signo) {
                            return Err(b.err(format!("signal number {signo}")));
                        }
                        sigactions.push(SigAction {
                            signo,
                            handler: b.u64()?,
                            flags: b.u64()?,
                            restorer: b.u64()?,
                            mask: b.u64()?,
                        });
                    }
                    let mut itimers = [(0, 0); 3];
                    for t in &mut itimers {
                        *t = (b.u64()?, b.u64()?);
                    }
                    let pending = decode_siginfos(&mut b)?;
                    let mut creds = [0u32; 8];
                    for c in &mut creds {
                        *c = b.u32()?;
                    }
                    // Format 1.2 appends the clocks; 1.0/1.1 end here.
                    let (monotonic_ns, boottime_ns, boot_id) = if b.done() {
                        (0, 0, String::new())
                    } else {
                        (b.u64()?, b.u64()?, b.str(NAME_CAP, "boot id")?)
                    };
                    process = Some(ProcessInfo {
                        pid,
                        exe,
                        mm,
                        auxv,
                        taken_unix_ns,
                        freeze_ns,
                        umask,
                        personality,
                        cwd,
                        rlimits,
                        sigactions,
                        itimers,
                        pending,
                        creds,
                        posix_timers: Vec::new(),
                        monotonic_ns,
                        boottime_ns,
                        boot_id,
                    });
                }
                TAG_SHMEM => {
                    let id = b.u64()?;
                    let kind_at = b.offset();
                    let kind = match b.u16()? {
                        1 => ShmemKind::Anonymous,
                        2 => ShmemKind::Memfd,
                        3 => ShmemKind::SysV,
                        4 => ShmemKind::TmpfsFile,
                        k => {
                            return Err(DecErr {
                                offset: kind_at,
                                what: format!("unknown shared memory kind {k}"),
                            })
                        }
                    };
                    let flags_at = b.offset();
                    let flags = b.u16()?;
                    if flags & !SHMEM_ELSEWHERE != 0 {
                        return Err(DecErr {
                            offset: flags_at,
                            what: format!("unknown shared memory flags {flags:#x}"),
                        });
                    }
                    let elsewhere = flags & SHMEM_ELSEWHERE != 0;
                    let seals = b.u32()?;
                    let key = b.i32()?;
                    let mode = b.u32()?;
                    let name = match kind {
                        ShmemKind::TmpfsFile => b.str(PATH_CAP, "tmpfs file path")?,
                        _ => b.str(NAME_CAP, "memfd name")?,
                    };
                    let size = b.u64()?;
                    if size > SHMEM_CAP {
                        return Err(b.err(format!(
                            "shared memory object of {size} bytes (at most {SHMEM_CAP})"
                        )));
                    }
                    let n = b.u32()? as usize;
                    let mut data = Vec::new();
                    for _ in 0..n {
                        let off = b.u64()?;
                        let bytes = b.bytes(SHMEM_CAP as usize, "shared memory contents")?;
                        if off.checked_add(bytes.len() as u64).is_none_or(|e| e > size) {
                            return Err(
                                b.err(format!("shared memory contents past its size {size}"))
                            );
                        }
                        data.push((off, bytes.to_vec()));
                    }
                    if elsewhere && !data.is_empty() {
                        return Err(b.err(format!(
                            "shared memory object {id} stored elsewhere has contents here"
                        )));
                    }
                    if shmem.iter().any(|o: &ShmemObject| o.id == id) {
                        return Err(DecErr {
                            offset: at,
                            what: format!("shared memory object {id} twice"),
                        });
                    }
                    shmem.push(ShmemObject {
                        id,
                        kind,
                        name,
                        size,
                        seals,
                        key,
                        mode,
                        data,
                        elsewhere,
                    });
                }
                TAG_POSIX_TIMER => {
                    if posix_timers.len() >= POSIX_TIMERS_CAP {
                        return Err(b.err(format!("more than {POSIX_TIMERS_CAP} POSIX timers")));
                    }
                    let t = PosixTimer {
                        id: b.i32()?,
                        clockid: b.i32()?,
                        notify: b.i32()?,
                        signo: b.i32()?,
                        value: b.u64()?,
                        tid: b.i32()?,
                        remaining_ns: {
                            b.u32()?;
                            b.u64()?
                        },
                        interval_ns: b.u64()?,
                    };
                    if posix_timers.iter().any(|o: &PosixTimer| o.id == t.id) {
                        return Err(DecErr {
                            offset: at,
                            what: format!("POSIX timer {} twice", t.id),
                        });
                    }
                    posix_timers.push(t);
                }
                TAG_THREAD => threads.push(ThreadInfo {
                    tid: b.i32()?,
                    regs: b.bytes(REGS_CAP, "registers")?.to_vec(),
                    xstate: b.bytes(XSTATE_CAP, "xstate")?.to_vec(),
                    sigmask: b.u64()?,
                    rseq: (b.u64()?, b.u32()?, b.u32()?),
                    robust_list: (b.u64()?, b.u64()?),
                    clear_child_tid: b.u64()?,
                    sigaltstack: (b.u64()?, b.u32()?, b.u64()?),
                    pending: decode_siginfos(&mut b)?,
                    comm: b.str(16, "thread name")?,
                }),
                TAG_MAPPING => {
                    let start = b.u64()?;
                    let end = b.u64()?;
                    let prot = b.u32()?;
                    let mflags = b.u32()?;
                    let offset = b.u64()?;
                    let kind_at = b.offset();
                    let kind = MappingKind::try_from(b.u16()?).map_err(|k| DecErr {
                        offset: kind_at,
                        what: format!("unknown mapping kind {k}"),
                    })?;
                    let m = MappingInfo {
                        start,
                        end,
                        prot,
                        flags: mflags,
                        offset,
                        kind,
                        path: b.str(PATH_CAP, "mapping path")?,
                        dev: b.u64()?,
                        inode: b.u64()?,
                        pages_stored: b.u64()?,
                    };
                    if m.start >= m.end
                        || !m.start.is_multiple_of(4096)
                        || !m.end.is_multiple_of(4096)
                    {
                        return Err(DecErr {
                            offset: at,
                            what: format!("bad mapping range {:#x}-{:#x}", m.start, m.end),
                        });
                    }
                    if mappings.last().is_some_and(|p| p.end > m.start) {
                        return Err(DecErr {
                            offset: at,
                            what: format!("mapping at {:#x} overlaps or is out of order", m.start),
                        });
                    }
                    mappings.push(m);
                }
                TAG_FD => {
                    let fd = b.i32()?;
                    let kind_at = b.offset();
                    let kind = FdKind::try_from(b.u16()?).map_err(|k| DecErr {
                        offset: kind_at,
                        what: format!("unknown descriptor kind {k}"),
                    })?;
                    let cloexec = b.u16()? != 0;
                    let f = FdInfo {
                        fd,
                        kind,
                        cloexec,
                        flags: b.u32()?,
                        pos: b.u64()?,
                        path: b.str(PATH_CAP, "descriptor path")?,
                        inode: b.u64()?,
                        dev: b.u64()?,
                        size: b.u64()?,
                        mtime_ns: b.u64()?,
                        pipe_size: b.u32()?,
                        data: b.bytes(PIPE_DATA_CAP, "pipe contents")?.to_vec(),
                        state: FdState::decode(&mut b)?,
                    };
                    let fits = matches!(
                        (f.kind, &f.state),
                        (FdKind::Epoll, FdState::Epoll(_))
                            | (FdKind::EventFd, FdState::EventFd { .. })
                            | (FdKind::TimerFd, FdState::TimerFd { .. })
                            | (FdKind::SignalFd, FdState::SignalFd { .. })
                            | (FdKind::Socket, FdState::Socket(_))
                            | (FdKind::Inotify, FdState::Inotify(_))
                            | (FdKind::Memfd, FdState::Memfd { .. })
                            | (FdKind::Pidfd, FdState::Pidfd { .. })
                            | (
                                FdKind::File
                                    | FdKind::CharDevice
                                    | FdKind::Pipe
                                    | FdKind::Inherited,
                                FdState::None
                            )
                    );
                    if !fits {
                        return Err(DecErr {
                            offset: at,
                            what: format!(
                                "descriptor {} of kind {:?} with the state of another kind",
                                f.fd, f.kind
                            ),
                        });
                    }
                    if f.fd < 0 || fds.last().is_some_and(|p| p.fd >= f.fd) {
                        return Err(DecErr {
                            offset: at,
                            what: format!("descriptor {} negative or out of order", f.fd),
                        });
                    }
                    fds.push(f);
                }
                TAG_CHAIN => {
                    if chain.is_some() {
                        return Err(DecErr {
                            offset: at,
                            what: "a second CHAIN section".into(),
                        });
                    }
                    let c = ChainInfo {
                        id: b.str(NAME_CAP, "checkpoint name")?,
                        parent: b.str(NAME_CAP, "parent name")?,
                        seq: b.u64()?,
                        method: b.str(NAME_CAP, "method")?,
                    };
                    for name in [&c.id, &c.parent] {
                        if name.contains('/') || name == "." || name == ".." {
                            return Err(DecErr {
                                offset: at,
                                what: format!("checkpoint name {name:?} is not a plain name"),
                            });
                        }
                    }
                    if c.id.is_empty() {
                        return Err(DecErr {
                            offset: at,
                            what: "empty checkpoint name".into(),
                        });
                    }
                    chain = Some(c);
                }
                _ if flags & SECTION_OPTIONAL != 0 => continue,
                other => {
                    return Err(DecErr {
                        offset: at,
                        what: format!("unknown section tag {other} (from a newer cr-ebpf?)"),
                    });
                }
            }
            if !b.done() {
                return Err(b.err(format!(
                    "{} unexpected bytes at the end of section {tag}",
                    body.len() as u64 - (b.offset() - at - 8)
                )));
            }
        }
        let mut process = process.ok_or_else(|| d.err("no PROCESS section"))?;
        process.posix_timers = posix_timers;
        if threads.is_empty() {
            return Err(d.err("no THREAD section"));
        }
        if chain.is_none() && mappings.iter().any(|m| m.flags & MAP_INHERITS != 0) {
            return Err(d.err("a mapping inherits pages but the image has no parent"));
        }
        for f in &fds {
            if let FdState::Memfd { id } = f.state {
                if !shmem.iter().any(|o| o.id == id) {
                    return Err(d.err(format!(
                        "descriptor {} refers to shared memory object {id} that is not in the image",
                        f.fd
                    )));
                }
            }
        }
        for m in mappings.iter().filter(|m| m.kind == MappingKind::Shmem) {
            if !shmem.iter().any(|o| o.id == m.inode) {
                return Err(d.err(format!(
                    "the mapping at {:#x} refers to shared memory object {} that is not in the image",
                    m.start, m.inode
                )));
            }
        }
        if let Some(c) = &chain {
            if c.parent.is_empty() && mappings.iter().any(|m| m.flags & MAP_INHERITS != 0) {
                return Err(d.err("a mapping inherits pages but the image has no parent"));
            }
        }
        Ok(Self {
            process,
            threads,
            mappings,
            fds,
            chain,
            shmem,
        })
    }

    /// Writes `manifest.img` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ImageError> {
        file::write_whole(
            &dir.join(crate::MANIFEST_FILE),
            FileKind::Manifest,
            &self.encode(),
        )
    }

    /// Reads and validates `manifest.img` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(crate::MANIFEST_FILE);
        let payload = file::read_whole(&path, FileKind::Manifest, file::MANIFEST_CAP)?;
        Self::decode(&payload, file::HEADER_LEN as u64).map_err(|e| ImageError::Corrupt {
            path: path.display().to_string(),
            offset: e.offset,
            what: e.what,
        })
    }
}
