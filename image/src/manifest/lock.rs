//! Section LOCK (format 1.6; one per file lock the process holds): which
//! descriptor holds it, its kind (`flock`, POSIX record lock, OFD lock),
//! read or write, and its range. Taken again through that descriptor at
//! restore, before the process runs.

use crate::codec::{Dec, DecErr, Enc};

/// The first format with LOCK sections.
pub(super) const SINCE: u16 = 6;
/// The first format with leases.
const LEASE_SINCE: u16 = 8;
/// The first format with leases being broken.
const BREAKING_SINCE: u16 = 9;

/// What kind of lock. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LockKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// `flock`: held by the open file description.
    Flock = 1,
    /// A POSIX record lock (`fcntl(F_SETLK)`): held by the process.
    Posix = 2,
    /// An open-file-description lock (`fcntl(F_OFD_SETLK)`).
    Ofd = 3,
    /// A lease (`fcntl(F_SETLEASE)`, format 1.8): held by the open file
    /// description; read or write, no range.
    Lease = 4,
    /// A write lease being broken down to a read lease (format 1.9: a
    /// process opened the file for reading). Taken again as a write lease,
    /// then broken again the same way.
    LeaseBreakingToRead = 5,
    /// A lease being broken altogether (format 1.9: a process opened the
    /// file for writing). Taken again (read or write), then broken again
    /// the same way.
    LeaseBreakingToNone = 6,
}

impl LockKind {
    /// Whether it is a lease, active or being broken.
    pub fn is_lease(self) -> bool {
        matches!(
            self,
            Self::Lease | Self::LeaseBreakingToRead | Self::LeaseBreakingToNone
        )
    }
}

impl TryFrom<u16> for LockKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Flock,
            2 => Self::Posix,
            3 => Self::Ofd,
            4 => Self::Lease,
            5 => Self::LeaseBreakingToRead,
            6 => Self::LeaseBreakingToNone,
            other => return Err(other),
        })
    }
}

/// One lock held by the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLock {
    /// A descriptor of the process on the locked file (through which it is
    /// taken again).
    pub fd: i32,
    /// Its kind.
    pub kind: LockKind,
    /// A write (exclusive) lock; else a read (shared) one.
    pub write: bool,
    /// First byte locked (record and OFD locks; 0 for `flock`).
    pub start: u64,
    /// Bytes locked; 0: to the end of the file, however it grows.
    pub len: u64,
}

impl FileLock {
    /// The LOCK section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.i32(self.fd);
        b.u16(self.kind as u16);
        b.u16(u16::from(self.write));
        b.u64(self.start);
        b.u64(self.len);
    }

    /// Reads a LOCK section's body.
    pub(super) fn decode(b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        let fd = b.i32()?;
        let at = b.offset();
        let kind = LockKind::try_from(b.u16()?)
            .and_then(|k| {
                let since = match k {
                    LockKind::Lease => LEASE_SINCE,
                    LockKind::LeaseBreakingToRead | LockKind::LeaseBreakingToNone => BREAKING_SINCE,
                    _ => 0,
                };
                if minor < since {
                    Err(k as u16)
                } else {
                    Ok(k)
                }
            })
            .map_err(|k| DecErr {
                offset: at,
                what: super::unknown("lock kind", k, minor),
            })?;
        let at = b.offset();
        let write = match b.u16()? {
            0 => false,
            1 => true,
            other => {
                return Err(DecErr {
                    offset: at,
                    what: format!("lock type {other} (0 read, 1 write)"),
                })
            }
        };
        let l = Self {
            fd,
            kind,
            write,
            start: b.u64()?,
            len: b.u64()?,
        };
        if l.kind == LockKind::LeaseBreakingToRead && !l.write {
            return Err(b.err("a read lease being broken down to a read lease"));
        }
        if l.start.checked_add(l.len).is_none() || l.start > i64::MAX as u64 {
            return Err(b.err(format!("lock range {}+{} out of bounds", l.start, l.len)));
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_round_trips_and_bad_ones_are_refused() {
        let l = FileLock {
            fd: 7,
            kind: LockKind::Ofd,
            write: true,
            start: 100,
            len: 50,
        };
        let mut e = Enc::default();
        l.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(FileLock::decode(&mut d, SINCE).unwrap(), l);
        assert!(d.done());
        let mut bad = e.buf.clone();
        bad[4] = 9;
        let err = FileLock::decode(&mut Dec::new(&bad, 0), SINCE).unwrap_err();
        assert!(err.what.contains("unknown lock kind 9"), "{}", err.what);
        let mut bad = e.buf.clone();
        bad[6] = 2;
        assert!(FileLock::decode(&mut Dec::new(&bad, 0), SINCE).is_err());
        let huge = FileLock {
            start: u64::MAX,
            ..l
        };
        let mut e = Enc::default();
        huge.encode(&mut e);
        assert!(FileLock::decode(&mut Dec::new(&e.buf, 0), SINCE).is_err());
    }

    #[test]
    fn leases_being_broken_are_format_1_9() {
        for (kind, write, ok) in [
            (LockKind::LeaseBreakingToRead, true, true),
            (LockKind::LeaseBreakingToRead, false, false),
            (LockKind::LeaseBreakingToNone, false, true),
        ] {
            let l = FileLock {
                fd: 3,
                kind,
                write,
                start: 0,
                len: 0,
            };
            let mut e = Enc::default();
            l.encode(&mut e);
            let got = FileLock::decode(&mut Dec::new(&e.buf, 0), BREAKING_SINCE);
            assert_eq!(got.is_ok(), ok, "{got:?}");
            if ok {
                assert_eq!(got.unwrap(), l);
                let old = FileLock::decode(&mut Dec::new(&e.buf, 0), BREAKING_SINCE - 1);
                assert!(old.unwrap_err().what.contains("unknown lock kind"));
            }
        }
    }
}
