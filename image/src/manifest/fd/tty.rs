//! The state of a terminal descriptor (kind 13, format 1.8): which end of
//! which pseudo-terminal pair it is, and, on the master, the settings of
//! the pair.

use crate::codec::{Dec, DecErr, Enc};

/// Size of the kernel's `struct termios2` (`TCGETS2`).
pub const TERMIOS_LEN: usize = 44;

/// What a terminal descriptor is. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtyRole {
    /// Not a role; decoding it is an error.
    #[default]
    Invalid = 0,
    /// The master (`/dev/ptmx`) of a pair checkpointed with it: a new pair
    /// is made at restore, and its settings are on this descriptor.
    Master = 1,
    /// The slave (`/dev/pts/N`) of a pair whose master is checkpointed too.
    Slave = 2,
    /// `/dev/tty`: the process's controlling terminal, opened again once
    /// the restored process has it.
    Controlling = 3,
    /// The controlling terminal of a shell job (a terminal outside the
    /// checkpoint): the restorer's own terminal at restore.
    Outside = 4,
    /// Format 1.14: a terminal device outside the checkpoint that is not
    /// its controlling terminal nor a pseudo-terminal (a console, virtual
    /// terminal or serial line): opened again by its path at restore
    /// (`O_NOCTTY`), which must still be that device; `index` is its
    /// device number in the kernel's 32-bit encoding.
    Device = 5,
}

impl TryFrom<u16> for TtyRole {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Master,
            2 => Self::Slave,
            3 => Self::Controlling,
            4 => Self::Outside,
            5 => Self::Device,
            other => return Err(other),
        })
    }
}

/// A terminal descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TtyInfo {
    /// What it is.
    pub role: TtyRole,
    /// Which open file description of the slave (or of the outside
    /// terminal) it is, numbered from 0 per pair: descriptors with the same
    /// number share one at restore.
    pub open: u16,
    /// The pair's index (`N` of `/dev/pts/N`); 0 for the other roles.
    pub index: u32,
    /// Master only: the pair's settings.
    pub pair: Option<PtyPair>,
}

/// The settings of a pseudo-terminal pair, read through its master.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtyPair {
    /// `struct termios2` as `TCGETS2` gives it.
    pub termios: Vec<u8>,
    /// `struct winsize`: rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    /// Packet mode of the master (`TIOCGPKT`).
    pub packet: bool,
    /// Exclusive mode of the slave (`TIOCGEXCL`).
    pub exclusive: bool,
    /// The slave's owner, group and permission bits.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// See `uid`.
    pub mode: u32,
    /// Format 1.9: bytes the slave side wrote that wait to be read on the
    /// master (as the master reads them: after the slave's output
    /// processing).
    pub master_queue: Vec<u8>,
    /// Format 1.9: what waits to be read on the slave side (written on the
    /// master, after the slave's input processing), line by line.
    pub slave_queue: Vec<QueuedInput>,
}

/// First minor whose pair settings end with the queues.
const QUEUES_SINCE: u16 = 9;
/// Most bytes of one queue (the kernel holds a few KiB per direction).
const QUEUE_CAP: usize = 1 << 20;
/// Most pieces of the slave's queue.
const PIECES_CAP: usize = 1 << 16;

/// How a piece of a terminal's input queue ends. On disk as a `u16`.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineEnd {
    /// Not an end; decoding it is an error.
    #[default]
    Invalid = 0,
    /// A line ended by its last byte (newline, `VEOL`, `VEOL2`).
    Delimiter = 1,
    /// A line ended by the end-of-file character, which is not stored in
    /// it (a read returns the line without it; an empty one reads as end
    /// of file).
    EndOfFile = 2,
    /// Bytes with no line end: the incomplete last line of a canonical
    /// terminal, or the whole queue of a non-canonical one (only last).
    Open = 3,
}

/// A piece of a terminal's input queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuedInput {
    /// How it ends.
    pub end: LineEnd,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl TtyInfo {
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u16(self.role as u16);
        b.u16(self.open);
        b.u32(self.index);
        match &self.pair {
            None => b.u16(0),
            Some(p) => {
                b.u16(1);
                b.bytes(&p.termios);
                for v in p.winsize {
                    b.u16(v);
                }
                b.u32(p.packet as u32);
                b.u32(p.exclusive as u32);
                b.u32(p.uid);
                b.u32(p.gid);
                b.u32(p.mode);
                b.bytes(&p.master_queue);
                b.u32(p.slave_queue.len() as u32);
                for q in &p.slave_queue {
                    b.u16(q.end as u16);
                    b.bytes(&q.bytes);
                }
            }
        }
    }

    /// Reads a terminal state of format 1.`minor`.
    pub(super) fn decode(b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        let role = b.u16()?;
        let role = TtyRole::try_from(role).map_err(|r| b.err(format!("terminal role {r}")))?;
        let open = b.u16()?;
        let index = b.u32()?;
        let pair = match b.u16()? {
            0 => None,
            1 => {
                let termios = b.bytes(TERMIOS_LEN, "termios")?.to_vec();
                if termios.len() != TERMIOS_LEN {
                    return Err(b.err(format!("termios of {} bytes", termios.len())));
                }
                let mut winsize = [0u16; 4];
                for v in &mut winsize {
                    *v = b.u16()?;
                }
                Some(PtyPair {
                    termios,
                    winsize,
                    packet: b.u32()? != 0,
                    exclusive: b.u32()? != 0,
                    uid: b.u32()?,
                    gid: b.u32()?,
                    mode: b.u32()?,
                    master_queue: Vec::new(),
                    slave_queue: Vec::new(),
                })
                .map(|mut p| {
                    if minor >= QUEUES_SINCE {
                        p.master_queue = b.bytes(QUEUE_CAP, "master queue")?.to_vec();
                        p.slave_queue = decode_queue(b)?;
                    }
                    Ok::<_, DecErr>(p)
                })
                .transpose()?
            }
            other => return Err(b.err(format!("terminal settings marker {other}"))),
        };
        if pair.is_some() != (role == TtyRole::Master) {
            return Err(b.err(format!("a terminal {role:?} with settings {pair:?}")));
        }
        Ok(Self {
            role,
            open,
            index,
            pair,
        })
    }
}

/// The pieces of a slave's input queue: only the last may be open, and
/// together they hold at most [`QUEUE_CAP`] bytes.
fn decode_queue(b: &mut Dec<'_>) -> Result<Vec<QueuedInput>, DecErr> {
    let n = b.u32()? as usize;
    if n > PIECES_CAP {
        return Err(b.err(format!(
            "{n} pieces of a terminal queue (at most {PIECES_CAP})"
        )));
    }
    let mut out: Vec<QueuedInput> = Vec::new();
    let mut total = 0;
    for _ in 0..n {
        let raw = b.u16()?;
        let end = match raw {
            1 => LineEnd::Delimiter,
            2 => LineEnd::EndOfFile,
            3 => LineEnd::Open,
            other => return Err(b.err(format!("terminal line end {other}"))),
        };
        if out.last().is_some_and(|q| q.end == LineEnd::Open) {
            return Err(b.err("a terminal queue with a piece after its open end"));
        }
        let bytes = b.bytes(QUEUE_CAP, "terminal queue")?.to_vec();
        total += bytes.len();
        if total > QUEUE_CAP || (end == LineEnd::Delimiter && bytes.is_empty()) {
            return Err(b.err(format!("a terminal queue piece of {} bytes", bytes.len())));
        }
        out.push(QueuedInput { end, bytes });
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn master() -> TtyInfo {
        TtyInfo {
            role: TtyRole::Master,
            open: 0,
            index: 7,
            pair: Some(PtyPair {
                termios: (0..TERMIOS_LEN as u8).collect(),
                winsize: [24, 80, 0, 0],
                packet: true,
                exclusive: false,
                uid: 1000,
                gid: 5,
                mode: 0o620,
                master_queue: b"hello\r\n".to_vec(),
                slave_queue: vec![
                    QueuedInput {
                        end: LineEnd::Delimiter,
                        bytes: b"hello\n".to_vec(),
                    },
                    QueuedInput {
                        end: LineEnd::EndOfFile,
                        bytes: Vec::new(),
                    },
                    QueuedInput {
                        end: LineEnd::Open,
                        bytes: b"par".to_vec(),
                    },
                ],
            }),
        }
    }

    fn round(t: &TtyInfo) -> Result<TtyInfo, DecErr> {
        let mut e = Enc::default();
        t.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        let back = TtyInfo::decode(&mut d, crate::FORMAT_MINOR)?;
        assert!(d.done());
        Ok(back)
    }

    #[test]
    fn every_role_round_trips_and_only_a_master_has_settings() {
        let m = master();
        assert_eq!(round(&m).unwrap(), m);
        for role in [
            TtyRole::Slave,
            TtyRole::Controlling,
            TtyRole::Outside,
            TtyRole::Device,
        ] {
            let t = TtyInfo {
                role,
                open: 2,
                index: 3,
                pair: None,
            };
            assert_eq!(round(&t).unwrap(), t);
            assert!(round(&TtyInfo {
                pair: m.pair.clone(),
                ..t
            })
            .is_err());
        }
        assert!(round(&TtyInfo {
            pair: None,
            ..master()
        })
        .is_err());
        assert!(round(&TtyInfo::default()).is_err(), "role 0");
        let mut short = master();
        short.pair.as_mut().unwrap().termios.pop();
        assert!(round(&short).is_err());
    }

    #[test]
    fn queues_are_read_from_format_1_9_and_damaged_ones_refused() {
        // Format 1.8: the settings without queues.
        let mut old = master();
        let p = old.pair.as_mut().unwrap();
        p.master_queue.clear();
        p.slave_queue.clear();
        let mut e = Enc::default();
        old.encode(&mut e);
        let cut = e.buf.len() - 8; // the two empty queues
        let mut d = Dec::new(&e.buf[..cut], 0);
        assert_eq!(TtyInfo::decode(&mut d, 8).unwrap(), old);
        assert!(d.done());
        let bad = |f: &dyn Fn(&mut PtyPair)| {
            let mut t = master();
            f(t.pair.as_mut().unwrap());
            round(&t).unwrap_err().what
        };
        let e = bad(&|p| p.slave_queue[0].end = LineEnd::Invalid);
        assert!(e.contains("line end 0"), "{e}");
        let e = bad(&|p| p.slave_queue.swap(1, 2));
        assert!(e.contains("after its open end"), "{e}");
        let e = bad(&|p| p.slave_queue[0].bytes.clear());
        assert!(e.contains("piece of 0 bytes"), "{e}");
    }
}
