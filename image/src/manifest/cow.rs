//! Section COW (format 1.8; one per run of pages, by increasing address):
//! pages of a process that were, at checkpoint time, the very pages of its
//! parent process at the same addresses (copy-on-write sharing since a
//! `fork`). They are not in the process's page store: a restore builds the
//! parent's memory first and makes the child from it, so they are shared
//! again.

use crate::codec::{Dec, DecErr, Enc};

/// The first format with COW sections.
pub(super) const SINCE: u16 = 8;

/// A run of pages shared with the parent process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CowRun {
    /// Address of its first page.
    pub start: u64,
    /// Pages in it (at least one).
    pub pages: u64,
}

impl CowRun {
    /// The COW section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u64(self.start);
        b.u64(self.pages);
    }

    /// Decodes a body; `before` is the run before it.
    pub(super) fn decode(b: &mut Dec<'_>, before: Option<&CowRun>) -> Result<Self, DecErr> {
        let r = Self {
            start: b.u64()?,
            pages: b.u64()?,
        };
        let end = r
            .pages
            .checked_mul(4096)
            .and_then(|n| r.start.checked_add(n));
        if !r.start.is_multiple_of(4096) || r.pages == 0 || end.is_none() {
            return Err(b.err(format!(
                "shared page run at {:#x} of {} pages is not whole pages in the address space",
                r.start, r.pages
            )));
        }
        if before.is_some_and(|p| p.start + p.pages * 4096 > r.start) {
            return Err(b.err(format!(
                "shared page run at {:#x} overlaps or is out of order",
                r.start
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_and_bad_ones_are_refused() {
        let r = CowRun {
            start: 0x7f00_0000_0000,
            pages: 3,
        };
        let mut e = Enc::default();
        r.encode(&mut e);
        assert_eq!(CowRun::decode(&mut Dec::new(&e.buf, 0), None).unwrap(), r);
        // Overlapping the run before it.
        let before = CowRun {
            start: 0x7f00_0000_0000 - 4096,
            pages: 2,
        };
        assert!(CowRun::decode(&mut Dec::new(&e.buf, 0), Some(&before)).is_err());
        for (start, pages) in [(0x1001, 1), (0x1000, 0), (!4095, 2)] {
            let mut e = Enc::default();
            CowRun { start, pages }.encode(&mut e);
            assert!(CowRun::decode(&mut Dec::new(&e.buf, 0), None).is_err());
        }
    }
}
