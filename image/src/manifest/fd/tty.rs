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
}

impl TryFrom<u16> for TtyRole {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::Master,
            2 => Self::Slave,
            3 => Self::Controlling,
            4 => Self::Outside,
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
            }
        }
    }

    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
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
                })
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
            }),
        }
    }

    fn round(t: &TtyInfo) -> Result<TtyInfo, DecErr> {
        let mut e = Enc::default();
        t.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        let back = TtyInfo::decode(&mut d)?;
        assert!(d.done());
        Ok(back)
    }

    #[test]
    fn every_role_round_trips_and_only_a_master_has_settings() {
        let m = master();
        assert_eq!(round(&m).unwrap(), m);
        for role in [TtyRole::Slave, TtyRole::Controlling, TtyRole::Outside] {
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
}
