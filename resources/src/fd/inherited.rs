//! Standard input, output and error connected to the outside (a pipe or
//! FIFO whose other end is not checkpointed): not saved; the restored
//! process gets the restorer's own descriptors 0, 1 and 2. Those of 0, 1
//! and 2 the process did not have at all are closed ([`close_unheld`]).

use cr_ebpf_image::{FdInfo, FdKind, Manifest};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{sys::Sys, RestoreError, SaveError};

/// Closes those of the stub's 0, 1 and 2 (the restorer's) that process `m`
/// did not have, so that it gets exactly its own descriptors. A number
/// already free is fine (`close_range` ignores it).
pub fn close_unheld(sys: &dyn Sys, m: &Manifest) -> Result<(), RestoreError> {
    for n in 0..=2u64 {
        if !m.fds.iter().any(|f| f.fd as u64 == n) {
            sys.call("close_range", libc::SYS_close_range, [n, n, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}

/// Stdio inherited from whoever restores the process.
pub struct Inherited;

impl Descriptor for Inherited {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Inherited]
    }

    fn save(&self, _cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        (seen.file_type() == libc::S_IFIFO && seen.fd <= 2)
            .then(|| Ok(seen.info(FdKind::Inherited)))
    }

    fn open(&self, _cx: &RestoreCx<'_>, _f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        // The stub already has the restorer's 0, 1 and 2.
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn stdio_to_the_outside_is_left_to_the_restorer() {
        let (r, _w) = testing::pipe();
        let seen = testing::seen(r.as_raw_fd());
        let stdio = Seen { fd: 0, ..seen };
        let mut owner = testing::SaveOwner::new();
        let info = Inherited
            .save(&mut owner.cx(), &stdio)
            .expect("claimed")
            .unwrap();
        assert_eq!((info.fd, info.kind), (0, FdKind::Inherited));
        let rec = testing::restore(&testing::manifest(vec![info.clone()]));
        assert!(rec.events().is_empty(), "nothing is done in the process");
        // 0 is the restorer's, kept; 1 and 2 the process did not have.
        let rec = crate::sys::fake::Recording::new();
        close_unheld(&rec, &testing::manifest(vec![info])).unwrap();
        let closed: Vec<u64> = rec.calls("close_range").iter().map(|c| c[0]).collect();
        assert_eq!(closed, [1, 2]);
    }

    #[test]
    fn stdio_the_process_did_not_have_is_closed() {
        let rec = crate::sys::fake::Recording::new();
        let m = testing::manifest(Vec::new());
        close_unheld(&rec, &m).unwrap();
        let closed: Vec<[u64; 2]> = rec
            .calls("close_range")
            .iter()
            .map(|c| [c[0], c[1]])
            .collect();
        assert_eq!(closed, [[0, 0], [1, 1], [2, 2]]);
        // All three held: nothing closed.
        let held = (0..3)
            .map(|fd| FdInfo {
                fd,
                kind: FdKind::Inherited,
                ..FdInfo::default()
            })
            .collect();
        let rec = crate::sys::fake::Recording::new();
        close_unheld(&rec, &testing::manifest(held)).unwrap();
        assert!(rec.events().is_empty());
    }
}
