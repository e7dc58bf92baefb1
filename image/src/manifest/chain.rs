//! Section CHAIN (format 1.1; at most one): where a checkpoint sits in a
//! chain of incremental checkpoints.

use super::NAME_CAP;
use crate::codec::{Dec, DecErr, Enc};

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

impl ChainInfo {
    /// The CHAIN section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.str(&self.id);
        b.str(&self.parent);
        b.u64(self.seq);
        b.str(&self.method);
    }

    /// Reads a CHAIN section's body, which starts at `at`: names must be
    /// plain (a checkpoint never names a directory elsewhere).
    pub(super) fn decode(b: &mut Dec<'_>, at: u64) -> Result<Self, DecErr> {
        let c = Self {
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
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(c: &ChainInfo) -> Result<ChainInfo, DecErr> {
        let mut e = Enc::default();
        c.encode(&mut e);
        let mut d = Dec::new(&e.buf, 8);
        let back = ChainInfo::decode(&mut d, 0)?;
        assert!(d.done());
        Ok(back)
    }

    #[test]
    fn a_chain_round_trips_and_names_must_be_plain() {
        let c = ChainInfo {
            id: "ckpt-000002".into(),
            parent: "ckpt-000001".into(),
            seq: 2,
            method: "uffd-wp".into(),
        };
        assert_eq!(round_trip(&c).unwrap(), c);
        let full = ChainInfo {
            parent: String::new(),
            ..c.clone()
        };
        assert_eq!(round_trip(&full).unwrap(), full);
        for bad in ["..", ".", "a/b"] {
            let e = round_trip(&ChainInfo {
                parent: bad.into(),
                ..c.clone()
            })
            .unwrap_err();
            assert!(e.what.contains("not a plain name"), "{}", e.what);
        }
        let e = round_trip(&ChainInfo {
            id: String::new(),
            ..c
        })
        .unwrap_err();
        assert!(e.what.contains("empty checkpoint name"), "{}", e.what);
    }
}
