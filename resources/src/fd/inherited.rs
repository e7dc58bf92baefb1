//! Standard input, output and error connected to the outside (a pipe or
//! FIFO whose other end is not checkpointed): not saved; the restored
//! process gets the restorer's own descriptors 0, 1 and 2.

use cr_ebpf_image::{FdInfo, FdKind};

use super::{Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

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
        let rec = testing::restore(&testing::manifest(vec![info]));
        assert!(rec.events().is_empty(), "nothing is done in the process");
    }
}
