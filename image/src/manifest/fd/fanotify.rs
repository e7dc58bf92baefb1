//! The state of a fanotify group (FD kind 16, format 1.9): its flags and
//! its marks on files and on mounts.

use crate::codec::{Dec, DecErr, Enc};

/// Most marks of one group.
const MARKS_CAP: usize = 1 << 16;
/// Longest marked path.
const PATH_CAP: usize = 4096;

/// What a fanotify mark is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MarkOn {
    /// A file or directory (its inode).
    #[default]
    Inode,
    /// A mount (`FAN_MARK_MOUNT`).
    Mount,
}

/// One mark of a fanotify group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FanotifyMark {
    /// What it is on.
    pub on: MarkOn,
    /// The marked file, or the mount point of the marked mount.
    pub path: String,
    /// The marked file's inode (0 for a mount; checked at restore).
    pub ino: u64,
    /// Its device (0 for a mount).
    pub dev: u64,
    /// `FAN_MARK_*` flags of the mark (`FAN_MARK_IGNORED_SURV_MODIFY`, ...).
    pub flags: u32,
    /// Events marked.
    pub mask: u32,
    /// Events ignored.
    pub ignored: u32,
}

/// A fanotify group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fanotify {
    /// `fanotify_init` flags (class, queue and mark limits, reporting).
    pub flags: u32,
    /// `fanotify_init` event flags (how event descriptors are opened).
    pub event_flags: u32,
    /// Its marks.
    pub marks: Vec<FanotifyMark>,
}

impl Fanotify {
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u32(self.flags);
        b.u32(self.event_flags);
        b.u32(self.marks.len() as u32);
        for m in &self.marks {
            b.u16(match m.on {
                MarkOn::Inode => 1,
                MarkOn::Mount => 2,
            });
            b.str(&m.path);
            b.u64(m.ino);
            b.u64(m.dev);
            b.u32(m.flags);
            b.u32(m.mask);
            b.u32(m.ignored);
        }
    }

    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let flags = b.u32()?;
        let event_flags = b.u32()?;
        let n = b.u32()? as usize;
        if n > MARKS_CAP {
            return Err(b.err(format!("{n} fanotify marks (at most {MARKS_CAP})")));
        }
        let mut marks = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let at = b.offset();
            let on = match b.u16()? {
                1 => MarkOn::Inode,
                2 => MarkOn::Mount,
                other => {
                    return Err(DecErr {
                        offset: at,
                        what: format!("fanotify mark on {other} (1 inode, 2 mount)"),
                    })
                }
            };
            let path = b.str(PATH_CAP, "fanotify marked path")?;
            if !path.starts_with('/') {
                return Err(b.err(format!("fanotify marked path {path:?} is not absolute")));
            }
            marks.push(FanotifyMark {
                on,
                path,
                ino: b.u64()?,
                dev: b.u64()?,
                flags: b.u32()?,
                mask: b.u32()?,
                ignored: b.u32()?,
            });
        }
        Ok(Self {
            flags,
            event_flags,
            marks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_round_trips_and_a_bad_mark_is_refused() {
        let g = Fanotify {
            flags: 0x10,
            event_flags: 0o100000,
            marks: vec![
                FanotifyMark {
                    on: MarkOn::Inode,
                    path: "/tmp/f".into(),
                    ino: 7,
                    dev: 0x801,
                    flags: 0,
                    mask: 0x3b,
                    ignored: 0,
                },
                FanotifyMark {
                    on: MarkOn::Mount,
                    path: "/tmp".into(),
                    flags: 0x20,
                    mask: 0x4000_0038,
                    ignored: 3,
                    ..FanotifyMark::default()
                },
            ],
        };
        let mut e = Enc::default();
        g.encode(&mut e);
        assert_eq!(Fanotify::decode(&mut Dec::new(&e.buf, 0)).unwrap(), g);
        let mut bad = e.buf.clone();
        bad[12] = 9;
        let err = Fanotify::decode(&mut Dec::new(&bad, 0)).unwrap_err();
        assert!(err.what.contains("fanotify mark on 9"), "{err:?}");
    }
}
