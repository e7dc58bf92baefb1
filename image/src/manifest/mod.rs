//! `manifest.img`: tagged sections describing the process.
//!
//! Payload: a sequence of sections `tag: u16, flags: u16, len: u32, body`.
//! Flag bit 0 marks a section a reader may skip if it does not know the tag;
//! any other unknown tag is an error. Exactly one `PROCESS` section, then
//! `THREAD` sections (main thread first) and `MAPPING` sections (by address).
//!
//! Each section has a file of its own here, holding its types and its
//! body's encoding and decoding side by side; this module frames the
//! sections and checks what involves several of them (order, duplicates,
//! references between sections).
//!
//! # Versions
//!
//! A manifest is written in the newest format ([`FORMAT_MINOR`]) and read
//! in the format its header names, any minor up to that. Format 1.4
//! changed one layout: an FD section ends with its kind's state, read by
//! the kind, instead of a state tag and a length-prefixed body (1.2, 1.3).
//!
//! **Every added section tag, descriptor kind, mapping kind or shared
//! memory kind bumps the minor version** (so do new flag bits and any other
//! change of layout). A reader refuses a newer minor in the header, so an
//! image it accepts never holds a tag or kind it does not know; one that
//! does anyway is refused with a message naming the image's version, never
//! skipped or guessed at. Only a section marked optional may be skipped.

use std::path::Path;

use crate::{
    codec::{Dec, DecErr, Enc},
    file::{self, FileKind, FORMAT_MAJOR, FORMAT_MINOR},
    ImageError,
};

mod cgroup_dir;
mod chain;
mod cow;
mod fd;
mod ipc;
mod lock;
mod mapping;
mod membership;
mod posix_timer;
mod process;
mod shmem;
mod thread;

pub use cgroup_dir::{CgroupDir, Owner};
pub use chain::ChainInfo;
pub use cow::CowRun;
pub use fd::{
    EpollItem, Fanotify, FanotifyMark, FdInfo, FdKind, FdState, FileOwner, InotifyWatch, LineEnd,
    MarkOn, PtyPair, QueuedInput, SockOpt, SocketFile, SocketInfo, TcpRepair, TtyInfo, TtyRole,
    FILTER_CAP, IN_FLIGHT_CAP, SOCKET_QUEUE_CAP, TCP_HALF_CLOSED, TERMIOS_LEN,
};
pub use ipc::{IpcNs, IpcPerm, SysvMsq, SysvSem, SysvShm};
pub use lock::{FileLock, LockKind};
pub use mapping::{
    MappingInfo, MappingKind, MAP_DONTDUMP, MAP_DONTFORK, MAP_DROPPABLE, MAP_GROWSDOWN,
    MAP_HUGEPAGE, MAP_INHERITS, MAP_KNOWN, MAP_LOCKED, MAP_LOCKONFAULT, MAP_MAYWRITE,
    MAP_MERGEABLE, MAP_NOHUGEPAGE, MAP_NORESERVE, MAP_RANDOM, MAP_SEQUENTIAL, MAP_SHARED,
    MAP_WIPEONFORK,
};
pub use membership::{Cgroup, Membership, Uts, UTS_NAME_CAP};
pub use posix_timer::PosixTimer;
pub use process::{Ctty, Prctl, ProcessInfo, SigAction, Terminal, MEMBARRIER_REGISTRATIONS};
pub use shmem::{
    ShmemKind, ShmemObject, GHOST_CAP, SHMEM_CAP, SHMEM_PAGES, SHMEM_PAGES_END, SHMEM_SLOT,
};
pub use thread::{
    Sched, SeccompFilter, ThreadCreds, ThreadInfo, SCHED_RESET_ON_FORK, SECCOMP_FILTER_LOG,
};

const TAG_PROCESS: u16 = 1;
const TAG_THREAD: u16 = 2;
const TAG_MAPPING: u16 = 3;
const TAG_FD: u16 = 4;
const TAG_CHAIN: u16 = 5;
const TAG_POSIX_TIMER: u16 = 6;
const TAG_SHMEM: u16 = 7;
const TAG_LOCK: u16 = 8;
const TAG_COW: u16 = 9;
const TAG_CGROUP_DIR: u16 = 10;
const TAG_NETLOCK: u16 = 11;
/// The first format with a NETLOCK section.
const NETLOCK_SINCE: u16 = 9;
const SECTION_OPTIONAL: u16 = 1;

/// Most POSIX timers of one process stored.
const POSIX_TIMERS_CAP: usize = 1 << 16;
/// Most file locks of one process stored.
const LOCKS_CAP: usize = 1 << 16;
/// Most runs of pages shared with the parent process.
const COW_CAP: usize = 1 << 24;
/// Longest path (files, mappings, the executable, the working directory).
const PATH_CAP: usize = 4096;
/// Longest name (checkpoints, memfds).
const NAME_CAP: usize = 255;
/// Size of a `siginfo_t`.
const SIGINFO_LEN: usize = 128;
/// Most pending signals of a thread or of the process.
const SIGINFOS_CAP: usize = 4096;

/// The message for a value that image format 1.`minor` does not define.
fn unknown(what: &str, value: impl std::fmt::Display, minor: u16) -> String {
    format!("unknown {what} {value} (not defined in image format {FORMAT_MAJOR}.{minor})")
}

/// Pending signals: a `u32` count, then each `siginfo_t` as `bytes`.
fn encode_siginfos(b: &mut Enc, infos: &[Vec<u8>]) {
    b.u32(infos.len() as u32);
    for info in infos {
        b.bytes(info);
    }
}

fn decode_siginfos(b: &mut Dec<'_>) -> Result<Vec<Vec<u8>>, DecErr> {
    let n = b.u32()? as usize;
    if n > SIGINFOS_CAP {
        return Err(b.err(format!("{n} pending signals (at most {SIGINFOS_CAP})")));
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
    /// File locks it holds (format 1.6), each through one of its descriptors.
    pub locks: Vec<FileLock>,
    /// Runs of its pages that are its parent's, shared copy-on-write, and
    /// not in its page store (format 1.8), by increasing address.
    pub cow: Vec<CowRun>,
    /// The network lock holding its TCP connections until a restore
    /// (format 1.9): the name of a directory below `/sys/fs/bpf/cr-ebpf`.
    pub network_lock: Option<String>,
}

/// Appends a section: its header, then the body `body` writes.
fn section(out: &mut Enc, tag: u16, body: impl FnOnce(&mut Enc)) {
    let mut b = Enc::default();
    body(&mut b);
    out.u16(tag);
    out.u16(0);
    out.u32(b.buf.len() as u32);
    out.buf.extend_from_slice(&b.buf);
}

impl Manifest {
    /// The payload bytes, in format 1.[`FORMAT_MINOR`].
    ///
    /// Each descriptor's [`FdInfo::state`] must be its kind's. One that is
    /// not is a bug of the caller: debug builds panic; release builds write
    /// that descriptor with kind 0, so that every reader refuses the image
    /// rather than restore a descriptor of the wrong kind.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Enc::default();
        section(&mut out, TAG_PROCESS, |b| self.process.encode(b));
        for t in &self.process.posix_timers {
            section(&mut out, TAG_POSIX_TIMER, |b| t.encode(b));
        }
        for d in &self.process.cgroup_dirs {
            section(&mut out, TAG_CGROUP_DIR, |b| d.encode(b));
        }
        for t in &self.threads {
            section(&mut out, TAG_THREAD, |b| t.encode(b));
        }
        for m in &self.mappings {
            section(&mut out, TAG_MAPPING, |b| m.encode(b));
        }
        for f in &self.fds {
            section(&mut out, TAG_FD, |b| f.encode(b));
        }
        for o in &self.shmem {
            section(&mut out, TAG_SHMEM, |b| o.encode(b));
        }
        for l in &self.locks {
            section(&mut out, TAG_LOCK, |b| l.encode(b));
        }
        for r in &self.cow {
            section(&mut out, TAG_COW, |b| r.encode(b));
        }
        if let Some(c) = &self.chain {
            section(&mut out, TAG_CHAIN, |b| c.encode(b));
        }
        if let Some(name) = &self.network_lock {
            section(&mut out, TAG_NETLOCK, |b| b.str(name));
        }
        out.buf
    }

    /// Parses a payload of the current format ([`FORMAT_MINOR`], as
    /// [`Manifest::encode`] writes it); `base` is its offset in the file
    /// (for messages).
    pub fn decode(payload: &[u8], base: u64) -> Result<Self, DecErr> {
        Self::decode_version(payload, base, FORMAT_MINOR)
    }

    /// Parses a payload written in format 1.`minor` (the minor version in
    /// its file's header); newer than [`FORMAT_MINOR`] is an error.
    pub fn decode_version(payload: &[u8], base: u64, minor: u16) -> Result<Self, DecErr> {
        if minor > FORMAT_MINOR {
            return Err(DecErr {
                offset: base,
                what: format!(
                    "image format {FORMAT_MAJOR}.{minor} is newer than this reader's \
                     {FORMAT_MAJOR}.{FORMAT_MINOR}"
                ),
            });
        }
        let mut d = Dec::new(payload, base);
        let mut s = Sections::default();
        while !d.done() {
            let at = d.offset();
            let tag = d.u16()?;
            let flags = d.u16()?;
            let len = d.u32()? as usize;
            let body = d.take(len)?;
            let mut b = Dec::new(body, at + 8);
            if !s.add(tag, flags, at, &mut b, minor)? {
                continue;
            }
            if !b.done() {
                return Err(b.err(format!(
                    "{} unexpected bytes at the end of section {tag}",
                    body.len() as u64 - (b.offset() - at - 8)
                )));
            }
        }
        s.finish(&d)
    }

    /// Writes `manifest.img` into `dir`; one larger than a reader accepts
    /// ([`file::MANIFEST_CAP`]: shared memory contents live in it) is an
    /// error, not an image that could not be read back.
    pub fn write(&self, dir: &Path) -> Result<(), ImageError> {
        let path = dir.join(crate::MANIFEST_FILE);
        let payload = self.encode();
        if payload.len() as u64 > file::MANIFEST_CAP {
            return Err(ImageError::TooLarge {
                path: path.display().to_string(),
                size: payload.len() as u64,
                cap: file::MANIFEST_CAP,
            });
        }
        file::write_whole(&path, FileKind::Manifest, &payload)
    }

    /// Reads and validates `manifest.img` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(crate::MANIFEST_FILE);
        let (header, payload) =
            file::read_whole_with_header(&path, FileKind::Manifest, file::MANIFEST_CAP)?;
        Self::decode_version(&payload, file::HEADER_LEN as u64, header.minor).map_err(|e| {
            ImageError::Corrupt {
                path: path.display().to_string(),
                offset: e.offset,
                what: e.what,
            }
        })
    }
}

/// The sections of a payload decoded so far.
#[derive(Default)]
struct Sections {
    process: Option<ProcessInfo>,
    threads: Vec<ThreadInfo>,
    mappings: Vec<MappingInfo>,
    fds: Vec<FdInfo>,
    chain: Option<ChainInfo>,
    posix_timers: Vec<PosixTimer>,
    cgroup_dirs: Vec<CgroupDir>,
    shmem: Vec<ShmemObject>,
    locks: Vec<FileLock>,
    cow: Vec<CowRun>,
    network_lock: Option<String>,
}

impl Sections {
    /// Decodes the body `b` of a section starting at `at` in an image of
    /// format 1.`minor`, checking it against the sections before it. False
    /// for an optional section this reader does not know (skipped).
    fn add(
        &mut self,
        tag: u16,
        flags: u16,
        at: u64,
        b: &mut Dec<'_>,
        minor: u16,
    ) -> Result<bool, DecErr> {
        let err = |what: String| DecErr { offset: at, what };
        match tag {
            TAG_PROCESS => {
                if self.process.is_some() {
                    return Err(err("a second PROCESS section".into()));
                }
                self.process = Some(ProcessInfo::decode(b, minor)?);
            }
            TAG_SHMEM => {
                let o = ShmemObject::decode(b, minor)?;
                if self.shmem.iter().any(|p| p.id == o.id) {
                    return Err(err(format!("shared memory object {} twice", o.id)));
                }
                self.shmem.push(o);
            }
            TAG_POSIX_TIMER => {
                if self.posix_timers.len() >= POSIX_TIMERS_CAP {
                    return Err(b.err(format!("more than {POSIX_TIMERS_CAP} POSIX timers")));
                }
                let t = PosixTimer::decode(b)?;
                if self.posix_timers.iter().any(|o| o.id == t.id) {
                    return Err(err(format!("POSIX timer {} twice", t.id)));
                }
                self.posix_timers.push(t);
            }
            TAG_CGROUP_DIR if minor >= cgroup_dir::SINCE => {
                if self.cgroup_dirs.len() >= cgroup_dir::CGROUP_DIRS_CAP {
                    return Err(b.err(format!(
                        "more than {} cgroup directories",
                        cgroup_dir::CGROUP_DIRS_CAP
                    )));
                }
                self.cgroup_dirs.push(CgroupDir::decode(b)?);
            }
            TAG_THREAD => self.threads.push(ThreadInfo::decode(b, minor)?),
            TAG_LOCK if minor >= lock::SINCE => {
                if self.locks.len() >= LOCKS_CAP {
                    return Err(b.err(format!("more than {LOCKS_CAP} file locks")));
                }
                self.locks.push(FileLock::decode(b, minor)?);
            }
            TAG_COW if minor >= cow::SINCE => {
                if self.cow.len() >= COW_CAP {
                    return Err(b.err(format!("more than {COW_CAP} shared page runs")));
                }
                let r = CowRun::decode(b, self.cow.last())?;
                self.cow.push(r);
            }
            TAG_NETLOCK if minor >= NETLOCK_SINCE => {
                if self.network_lock.is_some() {
                    return Err(err("a second NETLOCK section".into()));
                }
                let name = b.str(NAME_CAP, "network lock name")?;
                let ok = !name.is_empty()
                    && !name.starts_with('.')
                    && name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
                if !ok {
                    return Err(err(format!("network lock name {name:?}")));
                }
                self.network_lock = Some(name);
            }
            TAG_MAPPING => {
                let m = MappingInfo::decode(b, at, minor)?;
                if self.mappings.last().is_some_and(|p| p.end > m.start) {
                    return Err(err(format!(
                        "mapping at {:#x} overlaps or is out of order",
                        m.start
                    )));
                }
                self.mappings.push(m);
            }
            TAG_FD => {
                let f = FdInfo::decode(b, at, minor)?;
                if f.fd < 0 || self.fds.last().is_some_and(|p| p.fd >= f.fd) {
                    return Err(err(format!("descriptor {} negative or out of order", f.fd)));
                }
                self.fds.push(f);
            }
            TAG_CHAIN => {
                if self.chain.is_some() {
                    return Err(err("a second CHAIN section".into()));
                }
                self.chain = Some(ChainInfo::decode(b, at)?);
            }
            _ if flags & SECTION_OPTIONAL != 0 => return Ok(false),
            other => return Err(err(unknown("section tag", other, minor))),
        }
        Ok(true)
    }

    /// The manifest, once every section is read (`d` is at the payload's
    /// end): what sections refer to must be in the image.
    fn finish(self, d: &Dec<'_>) -> Result<Manifest, DecErr> {
        let mut process = self.process.ok_or_else(|| d.err("no PROCESS section"))?;
        process.posix_timers = self.posix_timers;
        process.cgroup_dirs = self.cgroup_dirs;
        if self.threads.is_empty() {
            return Err(d.err("no THREAD section"));
        }
        let inherits = self.mappings.iter().any(|m| m.flags & MAP_INHERITS != 0);
        if inherits && self.chain.as_ref().is_none_or(|c| c.parent.is_empty()) {
            return Err(d.err("a mapping inherits pages but the image has no parent"));
        }
        let stored = |id: u64| self.shmem.iter().any(|o| o.id == id);
        for f in &self.fds {
            if let FdState::Memfd { id } = f.state {
                if !stored(id) {
                    return Err(d.err(format!(
                        "descriptor {} refers to shared memory object {id} that is not in the image",
                        f.fd
                    )));
                }
            }
        }
        for m in self
            .mappings
            .iter()
            .filter(|m| m.kind == MappingKind::Shmem)
        {
            if !stored(m.inode) {
                return Err(d.err(format!(
                    "the mapping at {:#x} refers to shared memory object {} that is not in the image",
                    m.start, m.inode
                )));
            }
        }
        for l in &self.locks {
            if !self.fds.iter().any(|f| f.fd == l.fd) {
                return Err(d.err(format!(
                    "a file lock held through descriptor {} that is not in the image",
                    l.fd
                )));
            }
        }
        for r in &self.cow {
            let end = r.start + r.pages * 4096;
            let private = self
                .mappings
                .iter()
                .any(|m| m.start <= r.start && end <= m.end && m.flags & MAP_SHARED == 0);
            if !private {
                return Err(d.err(format!(
                    "pages shared with the parent at {:#x} outside a private mapping",
                    r.start
                )));
            }
        }
        Ok(Manifest {
            process,
            threads: self.threads,
            mappings: self.mappings,
            fds: self.fds,
            chain: self.chain,
            shmem: self.shmem,
            locks: self.locks,
            cow: self.cow,
            network_lock: self.network_lock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Manifest {
        Manifest {
            process: ProcessInfo {
                pid: 7,
                ..ProcessInfo::default()
            },
            threads: vec![ThreadInfo {
                tid: 7,
                ..ThreadInfo::default()
            }],
            ..Manifest::default()
        }
    }

    fn rich() -> Manifest {
        let mut m = minimal();
        m.process.posix_timers = vec![PosixTimer {
            id: 1,
            ..PosixTimer::default()
        }];
        m.mappings = vec![
            MappingInfo {
                start: 0x1000,
                end: 0x2000,
                kind: MappingKind::Anon,
                flags: MAP_INHERITS,
                ..MappingInfo::default()
            },
            MappingInfo {
                start: 0x2000,
                end: 0x4000,
                kind: MappingKind::Shmem,
                flags: MAP_SHARED,
                inode: 9,
                ..MappingInfo::default()
            },
        ];
        m.fds = vec![
            FdInfo {
                fd: 0,
                kind: FdKind::Inherited,
                ..FdInfo::default()
            },
            FdInfo {
                fd: 4,
                kind: FdKind::Memfd,
                state: FdState::Memfd { id: 9 },
                ..FdInfo::default()
            },
        ];
        m.shmem = vec![ShmemObject {
            id: 9,
            kind: ShmemKind::Memfd,
            size: 8192,
            ..ShmemObject::default()
        }];
        m.chain = Some(ChainInfo {
            id: "b".into(),
            parent: "a".into(),
            seq: 2,
            method: "full".into(),
        });
        m
    }

    /// A section: tag, flags, body.
    type Raw = (u16, u16, Vec<u8>);

    /// A payload of the given sections.
    fn payload(sections: &[Raw]) -> Vec<u8> {
        let mut out = Enc::default();
        for (tag, flags, body) in sections {
            out.u16(*tag);
            out.u16(*flags);
            out.u32(body.len() as u32);
            out.buf.extend_from_slice(body);
        }
        out.buf
    }

    fn body(f: impl FnOnce(&mut Enc)) -> Vec<u8> {
        let mut e = Enc::default();
        f(&mut e);
        e.buf
    }

    #[test]
    fn a_manifest_round_trips() {
        for m in [minimal(), rich()] {
            assert_eq!(Manifest::decode(&m.encode(), 32).unwrap(), m);
        }
    }

    #[test]
    fn unknown_tags_name_the_version_and_optional_ones_are_skipped() {
        let m = minimal();
        let mut p = m.encode();
        p.extend(payload(&[(99, SECTION_OPTIONAL, vec![1, 2, 3])]));
        assert_eq!(Manifest::decode(&p, 32).unwrap(), m);
        let mut p = m.encode();
        p.extend(payload(&[(99, 0, vec![1, 2, 3])]));
        for minor in [1, 4] {
            let e = Manifest::decode_version(&p, 32, minor).unwrap_err();
            assert_eq!(
                e.what,
                format!("unknown section tag 99 (not defined in image format 1.{minor})")
            );
        }
        let e = Manifest::decode_version(&m.encode(), 32, FORMAT_MINOR + 1).unwrap_err();
        let newer = format!("image format 1.{} is newer", FORMAT_MINOR + 1);
        assert!(e.what.contains(&newer), "{}", e.what);
    }

    #[test]
    fn sections_that_clash_are_refused() {
        let process = body(|b| minimal().process.encode(b));
        let thread = body(|b| minimal().threads[0].encode(b));
        let scheduled = body(|b| {
            ThreadInfo {
                creds: Some(ThreadCreds::default()),
                sched: Some(Sched::default()),
                ..minimal().threads[0].clone()
            }
            .encode(b)
        });
        let cases: Vec<(Vec<Raw>, &str)> = vec![
            (vec![(TAG_THREAD, 0, thread.clone())], "no PROCESS section"),
            (vec![(TAG_PROCESS, 0, process.clone())], "no THREAD section"),
            (
                vec![
                    (TAG_PROCESS, 0, process.clone()),
                    (TAG_PROCESS, 0, process.clone()),
                ],
                "a second PROCESS section",
            ),
            (
                vec![
                    (TAG_PROCESS, 0, process.clone()),
                    (TAG_THREAD, 0, [scheduled, vec![0]].concat()),
                ],
                "1 unexpected bytes at the end of section 2",
            ),
        ];
        for (sections, what) in cases {
            let e = Manifest::decode(&payload(&sections), 32).unwrap_err();
            assert!(e.what.contains(what), "{} / {what}", e.what);
        }
        let mut m = rich();
        m.mappings[1].start = 0x1000;
        let mut twice = rich();
        twice.shmem.push(twice.shmem[0].clone());
        let mut timers = rich();
        timers.process.posix_timers.push(PosixTimer {
            id: 1,
            ..PosixTimer::default()
        });
        let mut fds = rich();
        fds.fds.swap(0, 1);
        let mut chains = rich().encode();
        chains.extend(payload(&[(
            TAG_CHAIN,
            0,
            body(|b| rich().chain.unwrap().encode(b)),
        )]));
        for (p, what) in [
            (m.encode(), "overlaps or is out of order"),
            (twice.encode(), "shared memory object 9 twice"),
            (timers.encode(), "POSIX timer 1 twice"),
            (fds.encode(), "descriptor 0 negative or out of order"),
            (chains, "a second CHAIN section"),
        ] {
            let e = Manifest::decode(&p, 32).unwrap_err();
            assert!(e.what.contains(what), "{} / {what}", e.what);
        }
    }

    #[test]
    fn references_between_sections_must_resolve() {
        let mut m = rich();
        m.shmem.clear();
        m.mappings.pop();
        let e = Manifest::decode(&m.encode(), 32).unwrap_err();
        assert!(
            e.what
                .contains("descriptor 4 refers to shared memory object 9"),
            "{}",
            e.what
        );
        let mut m = rich();
        m.shmem.clear();
        m.fds.pop();
        let e = Manifest::decode(&m.encode(), 32).unwrap_err();
        assert!(
            e.what
                .contains("the mapping at 0x2000 refers to shared memory object 9"),
            "{}",
            e.what
        );
        let mut m = rich();
        m.chain = None;
        let e = Manifest::decode(&m.encode(), 32).unwrap_err();
        assert!(e.what.contains("no parent"), "{}", e.what);
    }

    #[test]
    fn too_many_pending_signals_are_refused_before_reading_them() {
        let mut e = Enc::default();
        e.u32(SIGINFOS_CAP as u32 + 1);
        let err = decode_siginfos(&mut Dec::new(&e.buf, 0)).unwrap_err();
        assert!(err.what.contains("pending signals"), "{}", err.what);
    }
}
