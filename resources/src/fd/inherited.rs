//! Standard input, output and error connected to the outside (a pipe or
//! FIFO whose other end is not checkpointed): not saved; the restored
//! process gets the restorer's own descriptors 0, 1 and 2, or the one the
//! restorer names for that pipe ([`hand_over`], `restore --inherit-fd`).
//! Those of 0, 1 and 2 the process did not have at all are closed
//! ([`close_unheld`]).

use std::os::fd::{BorrowedFd, RawFd};

use cr_ebpf_image::{FdInfo, FdKind, FdState, Manifest};

use super::{shared::Shared, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{sys::Sys, RestoreError, SaveError};

/// Keeps a copy of each descriptor of `inherit` (the restorer's, by the
/// name of the outside object it stands for: `pipe:[INODE]` for a
/// standard stream connected outside, `socket:[INODE]` for a unix
/// connection to a socket outside) for the descriptors of `fds` that held
/// that object. A name no descriptor holds is refused (a typo would
/// otherwise go unnoticed).
pub fn hand_over(
    fds: &[&FdInfo],
    inherit: &[(String, RawFd)],
    shared: &mut Shared,
) -> Result<(), RestoreError> {
    for (name, raw) in inherit {
        let holder = fds.iter().find(|f| match &f.state {
            FdState::Socket(s) => format!("socket:[{}]", s.inode) == *name,
            _ => f.kind == FdKind::Inherited && f.path == *name,
        });
        let Some(f) = holder else {
            return Err(RestoreError::NotSupported(format!(
                "--inherit-fd names {name}, which no descriptor of the image holds \
                 (`cr-ebpf inspect` lists them)"
            )));
        };
        // SAFETY: the caller's descriptor, open for the call.
        let fd = unsafe { BorrowedFd::borrow_raw(*raw) }
            .try_clone_to_owned()
            .map_err(|err| RestoreError::Syscall {
                call: format!("duplicating descriptor {raw} of --inherit-fd {raw}:{name}"),
                err,
            })?;
        let (kind, id) = match &f.state {
            FdState::Socket(s) => (FdKind::Socket, s.inode),
            _ => (FdKind::Inherited, f.inode),
        };
        shared.insert(kind, id, 0, fd);
    }
    Ok(())
}

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

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        if cx.shared.has(FdKind::Inherited, f.inode, 0) {
            let ours = cx.shared.get(FdKind::Inherited, f.inode, 0, f.fd)?;
            return cx.adopt(ours).map(Some);
        }
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
    fn the_restorer_hands_over_the_object_it_names() {
        let (r, _w) = testing::pipe();
        let stdout = FdInfo {
            fd: 1,
            kind: FdKind::Inherited,
            path: "pipe:[4242]".into(),
            inode: 4242,
            ..FdInfo::default()
        };
        let mut shared = Shared::default();
        let given = [("pipe:[4242]".to_string(), r.as_raw_fd())];
        hand_over(&[&stdout], &given, &mut shared).unwrap();
        assert!(shared.has(FdKind::Inherited, 4242, 0));
        // Given to the process instead of the restorer's own 1.
        let rec = crate::sys::fake::Recording::new();
        let shmem = std::collections::HashMap::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        assert!(Inherited.open(&cx, &stdout).unwrap().is_some());
        // A name no descriptor holds is refused, naming it.
        let wrong = [("pipe:[1]".to_string(), r.as_raw_fd())];
        let err = hand_over(&[&stdout], &wrong, &mut Shared::default()).unwrap_err();
        assert!(err.to_string().contains("pipe:[1]"), "{err}");
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
