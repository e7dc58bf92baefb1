//! Section FD (one per open descriptor, by increasing number).
//!
//! Format 1.4: `i32` number, `u16` kind, the fields every kind has, then
//! the state of the kind (nothing for kinds 1 to 4), read according to the
//! kind: a section cannot hold the state of another kind. Formats 1.0 to
//! 1.3 are read by [`legacy`]. Format 1.8 ends the section with a `u64`:
//! the open file description it shares with other descriptors (0: none).

mod fanotify;
mod legacy;
mod socket;
mod state;
mod tty;

pub use fanotify::{Fanotify, FanotifyMark, MarkOn};
pub use socket::{
    SockOpt, SocketFile, SocketInfo, TcpRepair, FILTER_CAP, IN_FLIGHT_CAP, SOCKET_QUEUE_CAP,
    TCP_HALF_CLOSED,
};
pub use state::{EpollItem, FdKind, FdState, InotifyWatch};
pub use tty::{LineEnd, PtyPair, QueuedInput, TtyInfo, TtyRole, TERMIOS_LEN};

use super::{unknown, PATH_CAP};
use crate::codec::{Dec, DecErr, Enc};

/// The first format whose FD sections end with the kind's state body (no
/// state tag).
const STATE_BY_KIND: u16 = 4;

/// The first format whose FD sections end with the shared description.
const SHARED_DESCRIPTION: u16 = 8;

/// Largest pipe contents stored.
const PIPE_DATA_CAP: usize = 16 << 20;

/// The first format whose FD sections end with the owner of signal-driven
/// I/O ([`FileOwner`]).
const OWNER_SINCE: u16 = 8;

/// Who gets the signals of signal-driven I/O (`O_ASYNC`) on a descriptor's
/// open file (`F_GETOWN_EX`, `F_GETSIG`; format 1.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOwner {
    /// `F_OWNER_TID` 0, `F_OWNER_PID` 1, `F_OWNER_PGRP` 2 (meaningless when
    /// `pid` is 0).
    pub kind: u32,
    /// The thread, process or process group; 0: none.
    pub pid: i32,
    /// The signal sent instead of `SIGIO` (`F_SETSIG`; 0: `SIGIO`).
    pub signal: u32,
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
    /// What the kinds added in format 1.2 hold: the state of `kind`
    /// ([`FdState::None`] for kinds 1 to 4). A state of another kind is a
    /// programming error; see [`Manifest::encode`](super::Manifest::encode).
    pub state: FdState,
    /// The open file description this descriptor shares with other
    /// descriptors of the process or of its tree (`dup`, inherited across
    /// `fork`), by an id the same for all of them; 0 when it is its own
    /// (format 1.8; regular files).
    pub desc: u64,
    /// The owner of signal-driven I/O on its open file (format 1.8; none
    /// before).
    pub owner: FileOwner,
}

impl FdInfo {
    /// The FD section's body. A state that is not its kind's is a bug of
    /// the caller: debug builds panic; otherwise the kind is written as 0,
    /// which every reader refuses, so the image is never misread.
    pub(super) fn encode(&self, b: &mut Enc) {
        debug_assert!(
            self.state.fits(self.kind),
            "descriptor {} of kind {:?} with the state {:?}",
            self.fd,
            self.kind,
            self.state
        );
        b.i32(self.fd);
        b.u16(self.written_kind() as u16);
        b.u16(self.cloexec as u16);
        b.u32(self.flags);
        b.u64(self.pos);
        b.str(&self.path);
        b.u64(self.inode);
        b.u64(self.dev);
        b.u64(self.size);
        b.u64(self.mtime_ns);
        b.u32(self.pipe_size);
        b.bytes(&self.data);
        self.state.encode_body(b);
        b.u64(self.desc);
        b.u32(self.owner.kind);
        b.i32(self.owner.pid);
        b.u32(self.owner.signal);
    }

    /// The kind as written: [`FdKind::Invalid`] when the state is another
    /// kind's.
    fn written_kind(&self) -> FdKind {
        if self.state.fits(self.kind) {
            self.kind
        } else {
            FdKind::Invalid
        }
    }

    /// Reads an FD section's body, which starts at `at`, of an image of
    /// format 1.`minor`.
    pub(super) fn decode(b: &mut Dec<'_>, at: u64, minor: u16) -> Result<Self, DecErr> {
        let fd = b.i32()?;
        let kind_at = b.offset();
        let raw = b.u16()?;
        let kind = FdKind::try_from(raw)
            .ok()
            .filter(|k| k.since() <= minor)
            .ok_or_else(|| DecErr {
                offset: kind_at,
                what: unknown("descriptor kind", raw, minor),
            })?;
        let cloexec = b.u16()? != 0;
        let mut f = Self {
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
            state: FdState::None,
            desc: 0,
            owner: FileOwner::default(),
        };
        if minor >= STATE_BY_KIND {
            f.state = FdState::decode_body(kind, b, minor)?;
            if minor >= SHARED_DESCRIPTION {
                f.desc = b.u64()?;
            }
            if minor >= OWNER_SINCE {
                let at = b.offset();
                f.owner = FileOwner {
                    kind: b.u32()?,
                    pid: b.i32()?,
                    signal: b.u32()?,
                };
                if f.owner.kind > 2 || f.owner.signal > 64 || f.owner.pid < 0 {
                    return Err(DecErr {
                        offset: at,
                        what: format!(
                            "signal-driven I/O owner {:?} (kind 0 to 2, signal at most 64)",
                            f.owner
                        ),
                    });
                }
            }
            return Ok(f);
        }
        f.state = legacy::decode(b, minor)?;
        if !f.state.fits(kind) {
            return Err(DecErr {
                offset: at,
                what: format!(
                    "descriptor {} of kind {:?} with the state of another kind",
                    f.fd, f.kind
                ),
            });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FORMAT_MINOR;

    fn common(fd: i32, state: FdState) -> FdInfo {
        FdInfo {
            fd,
            kind: state.kind().unwrap_or(FdKind::Pipe),
            flags: 0o2,
            cloexec: true,
            pos: 12,
            path: "anon_inode:[x]".into(),
            inode: 123,
            dev: 14,
            size: 5,
            mtime_ns: 6,
            pipe_size: 65536,
            data: b"unread".to_vec(),
            state,
            desc: 0,
            owner: FileOwner {
                kind: 1,
                pid: 4321,
                signal: 10,
            },
        }
    }

    fn encoded(f: &FdInfo) -> Vec<u8> {
        let mut e = Enc::default();
        f.encode(&mut e);
        e.buf
    }

    fn decoded(buf: &[u8], minor: u16) -> Result<FdInfo, DecErr> {
        let mut d = Dec::new(buf, 8);
        let f = FdInfo::decode(&mut d, 0, minor)?;
        if !d.done() {
            return Err(d.err("left over"));
        }
        Ok(f)
    }

    #[test]
    fn every_kind_round_trips_with_its_state_after_the_common_fields() {
        let bare = encoded(&common(3, FdState::None)).len();
        for s in state::tests::every_state_now() {
            let f = common(3, s);
            let buf = encoded(&f);
            assert_eq!(decoded(&buf, FORMAT_MINOR).unwrap(), f);
            // No tag, no length: the body alone follows the common fields,
            // then the shared description.
            let mut body = Enc::default();
            f.state.encode_body(&mut body);
            assert_eq!(buf.len(), bare + body.buf.len());
            assert_eq!(buf[bare - 20..buf.len() - 20], body.buf[..]);
        }
        for kind in [FdKind::File, FdKind::CharDevice, FdKind::Inherited] {
            let f = FdInfo {
                kind,
                ..common(0, FdState::None)
            };
            assert_eq!(decoded(&encoded(&f), FORMAT_MINOR).unwrap(), f);
        }
    }

    #[test]
    fn the_shared_description_is_read_from_1_8_on() {
        let f = FdInfo {
            kind: FdKind::File,
            desc: 0x1234_0000_0005,
            ..common(5, FdState::None)
        };
        let buf = encoded(&f);
        assert_eq!(decoded(&buf, 8).unwrap(), f);
        // 1.7 has no such field (nor the owner after it): 20 bytes too many.
        assert!(decoded(&buf, 7).is_err());
        let old = &buf[..buf.len() - 20];
        assert_eq!(
            decoded(old, 7).unwrap(),
            FdInfo {
                desc: 0,
                owner: FileOwner::default(),
                ..f.clone()
            }
        );
    }

    #[test]
    fn a_kind_reads_its_own_state_only() {
        // A pidfd's body after the kind of a file: 4 bytes too many.
        let mut buf = encoded(&common(3, FdState::Pidfd { pid: 9 }));
        buf[4..6].copy_from_slice(&(FdKind::File as u16).to_le_bytes());
        assert!(decoded(&buf, FORMAT_MINOR).is_err());
        // An eventfd without its body.
        let mut buf = encoded(&common(3, FdState::None));
        buf[4..6].copy_from_slice(&(FdKind::EventFd as u16).to_le_bytes());
        assert!(decoded(&buf, FORMAT_MINOR).is_err());
        // An unknown kind, naming the image's version.
        buf[4..6].copy_from_slice(&17u16.to_le_bytes());
        let e = decoded(&buf, FORMAT_MINOR).unwrap_err();
        assert!(e.what.contains("unknown descriptor kind 17"), "{}", e.what);
        assert!(e.what.contains(&format!("1.{FORMAT_MINOR}")), "{}", e.what);
        assert_eq!(e.offset, 8 + 4);
    }

    #[test]
    fn a_terminal_is_not_a_kind_of_format_1_7() {
        let t = common(3, FdState::Tty(tty::tests::master()));
        let buf = encoded(&t);
        assert_eq!(decoded(&buf, FORMAT_MINOR).unwrap(), t);
        let e = decoded(&buf, 8 - 1).unwrap_err();
        assert!(e.what.contains("unknown descriptor kind 13"), "{}", e.what);
        assert!(e.what.contains("1.7"), "{}", e.what);
    }

    /// The section body as format 1.2/1.3 wrote it (no shared description, no owner).
    fn legacy_encoded(f: &FdInfo) -> Vec<u8> {
        let mut buf = encoded(&FdInfo {
            state: FdState::None,
            kind: FdKind::File,
            ..f.clone()
        });
        buf.truncate(buf.len() - 20); // no shared description or owner before 1.8
        buf[4..6].copy_from_slice(&(f.kind as u16).to_le_bytes());
        let mut e = Enc::default();
        legacy::encode(&f.state, &mut e);
        buf.extend_from_slice(&e.buf);
        buf
    }

    #[test]
    fn sections_of_formats_1_0_to_1_3_still_read() {
        for s in state::tests::every_state()
            .into_iter()
            .filter(|s| s.kind().is_none_or(|k| k.since() < 8))
        {
            let f = FdInfo {
                owner: FileOwner::default(),
                ..common(5, s)
            };
            let buf = legacy_encoded(&f);
            for minor in [2, 3] {
                assert_eq!(decoded(&buf, minor).unwrap(), f);
            }
            // 1.4 reads the same bytes by the kind: the tag is not a body.
            if f.state != FdState::None {
                assert_ne!(decoded(&buf, FORMAT_MINOR).ok(), Some(f.clone()));
            }
        }
        let pipe = FdInfo {
            owner: FileOwner::default(),
            ..common(3, FdState::None)
        };
        for minor in 0..=3 {
            assert_eq!(decoded(&legacy_encoded(&pipe), minor).unwrap(), pipe);
        }
    }

    #[test]
    fn kinds_and_owners_of_1_8_are_unknown_before() {
        let f = common(4, FdState::Deleted { id: 9 });
        let buf = encoded(&f);
        assert_eq!(decoded(&buf, 8).unwrap(), f);
        let e = decoded(&buf, 7).unwrap_err();
        assert!(e.what.contains("unknown descriptor kind 14"), "{}", e.what);
        // A 1.7 section ends with the state: no shared description, no owner.
        let plain = common(4, FdState::Pidfd { pid: 3 });
        let mut old = encoded(&plain);
        old.truncate(old.len() - 20);
        let back = decoded(&old, 7).unwrap();
        assert_eq!(back.owner, FileOwner::default());
        assert!(decoded(&old, 8).is_err(), "1.8 needs the owner");
        // Owner out of range.
        let bad = FdInfo {
            owner: FileOwner {
                kind: 3,
                pid: 1,
                signal: 0,
            },
            ..plain
        };
        let e = decoded(&encoded(&bad), 8).unwrap_err();
        assert!(e.what.contains("owner"), "{}", e.what);
    }

    #[test]
    fn a_state_of_another_kind_in_an_old_section_is_refused() {
        let mut buf = legacy_encoded(&common(5, FdState::SignalFd { mask: 1 }));
        buf[4..6].copy_from_slice(&(FdKind::TimerFd as u16).to_le_bytes());
        let e = decoded(&buf, 3).unwrap_err();
        assert!(
            e.what
                .contains("descriptor 5 of kind TimerFd with the state of another kind"),
            "{}",
            e.what
        );
        assert_eq!(e.offset, 0);
        // A kind with state but none stored.
        let mut buf = legacy_encoded(&common(5, FdState::None));
        buf[4..6].copy_from_slice(&(FdKind::Socket as u16).to_le_bytes());
        assert!(decoded(&buf, 2).is_err());
        // A file with a state.
        let mut buf = legacy_encoded(&common(5, FdState::Memfd { id: 3 }));
        buf[4..6].copy_from_slice(&(FdKind::File as u16).to_le_bytes());
        assert!(decoded(&buf, 3).unwrap_err().what.contains("another kind"));
    }

    #[test]
    fn a_state_of_another_kind_is_written_as_kind_0() {
        let f = FdInfo {
            kind: FdKind::Inherited,
            ..common(2, FdState::Pidfd { pid: 1 })
        };
        assert_eq!(f.written_kind(), FdKind::Invalid);
        assert_eq!(
            common(2, FdState::Pidfd { pid: 1 }).written_kind(),
            FdKind::Pidfd
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "with the state")]
    fn encoding_a_state_of_another_kind_panics_in_debug_builds() {
        encoded(&FdInfo {
            kind: FdKind::Socket,
            ..common(2, FdState::None)
        });
    }
}
