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

use std::path::Path;

use crate::{
    codec::{Dec, DecErr, Enc},
    file::{self, FileKind},
    ImageError,
};

mod chain;
mod fd;
mod mapping;
mod posix_timer;
mod process;
mod shmem;
mod thread;

pub use chain::ChainInfo;
pub use fd::{
    EpollItem, FdInfo, FdKind, FdState, InotifyWatch, SockOpt, SocketInfo, TcpRepair,
    SOCKET_QUEUE_CAP,
};
pub use mapping::{MappingInfo, MappingKind, MAP_GROWSDOWN, MAP_INHERITS, MAP_SHARED};
pub use posix_timer::PosixTimer;
pub use process::{ProcessInfo, SigAction};
pub use shmem::{ShmemKind, ShmemObject, SHMEM_CAP};
pub use thread::ThreadInfo;

const TAG_PROCESS: u16 = 1;
const TAG_THREAD: u16 = 2;
const TAG_MAPPING: u16 = 3;
const TAG_FD: u16 = 4;
const TAG_CHAIN: u16 = 5;
const TAG_POSIX_TIMER: u16 = 6;
const TAG_SHMEM: u16 = 7;
const SECTION_OPTIONAL: u16 = 1;

/// Most POSIX timers of one process stored.
const POSIX_TIMERS_CAP: usize = 1 << 16;
/// Longest path (files, mappings, the executable, the working directory).
const PATH_CAP: usize = 4096;
/// Longest name (checkpoints, memfds).
const NAME_CAP: usize = 255;
/// Size of a `siginfo_t`.
const SIGINFO_LEN: usize = 128;
/// Most pending signals of a thread or of the process.
const SIGINFOS_CAP: usize = 4096;

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
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Enc::default();
        section(&mut out, TAG_PROCESS, |b| self.process.encode(b));
        for t in &self.process.posix_timers {
            section(&mut out, TAG_POSIX_TIMER, |b| t.encode(b));
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
        if let Some(c) = &self.chain {
            section(&mut out, TAG_CHAIN, |b| c.encode(b));
        }
        out.buf
    }

    /// Parses a payload; `base` is its offset in the file (for messages).
    pub fn decode(payload: &[u8], base: u64) -> Result<Self, DecErr> {
        let mut d = Dec::new(payload, base);
        let mut s = Sections::default();
        while !d.done() {
            let at = d.offset();
            let tag = d.u16()?;
            let flags = d.u16()?;
            let len = d.u32()? as usize;
            let body = d.take(len)?;
            let mut b = Dec::new(body, at + 8);
            if !s.add(tag, flags, at, &mut b)? {
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

/// The sections of a payload decoded so far.
#[derive(Default)]
struct Sections {
    process: Option<ProcessInfo>,
    threads: Vec<ThreadInfo>,
    mappings: Vec<MappingInfo>,
    fds: Vec<FdInfo>,
    chain: Option<ChainInfo>,
    posix_timers: Vec<PosixTimer>,
    shmem: Vec<ShmemObject>,
}

impl Sections {
    /// Decodes the body `b` of a section starting at `at`, checking it
    /// against the sections before it. False for an optional section this
    /// reader does not know (skipped).
    fn add(&mut self, tag: u16, flags: u16, at: u64, b: &mut Dec<'_>) -> Result<bool, DecErr> {
        let err = |what: String| DecErr { offset: at, what };
        match tag {
            TAG_PROCESS => {
                if self.process.is_some() {
                    return Err(err("a second PROCESS section".into()));
                }
                self.process = Some(ProcessInfo::decode(b)?);
            }
            TAG_SHMEM => {
                let o = ShmemObject::decode(b)?;
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
            TAG_THREAD => self.threads.push(ThreadInfo::decode(b)?),
            TAG_MAPPING => {
                let m = MappingInfo::decode(b, at)?;
                if self.mappings.last().is_some_and(|p| p.end > m.start) {
                    return Err(err(format!(
                        "mapping at {:#x} overlaps or is out of order",
                        m.start
                    )));
                }
                self.mappings.push(m);
            }
            TAG_FD => {
                let f = FdInfo::decode(b, at)?;
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
            other => {
                return Err(err(format!(
                    "unknown section tag {other} (from a newer cr-ebpf?)"
                )))
            }
        }
        Ok(true)
    }

    /// The manifest, once every section is read (`d` is at the payload's
    /// end): what sections refer to must be in the image.
    fn finish(self, d: &Dec<'_>) -> Result<Manifest, DecErr> {
        let mut process = self.process.ok_or_else(|| d.err("no PROCESS section"))?;
        process.posix_timers = self.posix_timers;
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
        Ok(Manifest {
            process,
            threads: self.threads,
            mappings: self.mappings,
            fds: self.fds,
            chain: self.chain,
            shmem: self.shmem,
        })
    }
}
