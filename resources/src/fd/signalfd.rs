//! signalfd descriptors: the signal mask from fdinfo; rebuilt in the
//! restorer and handed over.

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{owned, unreadable, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// A signalfd.
pub struct SignalFd;

impl Descriptor for SignalFd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::SignalFd]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[signalfd]") {
            return None;
        }
        Some(
            match seen
                .field("sigmask:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
            {
                Some(mask) => {
                    let mut info = seen.info(FdKind::SignalFd);
                    info.state = FdState::SignalFd { mask };
                    Ok(info)
                }
                None => Err(unreadable(cx, seen, "signalfd mask")),
            },
        )
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::SignalFd { mask } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "signalfd {} without its state",
                f.fd
            )));
        };
        // SAFETY: an empty set filled bit by bit.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::sigemptyset(&mut set) };
        for sig in 1..=64 {
            if mask & (1u64 << (sig - 1)) != 0 {
                // SAFETY: adding a signal number to our set.
                unsafe { libc::sigaddset(&mut set, sig) };
            }
        }
        // SAFETY: plain syscall with our set.
        let fd = owned(
            unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) },
            "signalfd",
        )?;
        cx.adopt(&fd).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_mask_round_trips() {
        let info = FdInfo {
            fd: 5,
            kind: FdKind::SignalFd,
            state: FdState::SignalFd {
                mask: 1 << (libc::SIGUSR1 - 1) | 1 << (libc::SIGRTMIN() + 3 - 1),
            },
            ..FdInfo::default()
        };
        assert_eq!(testing::rebuilt_state(&SignalFd, &info), info.state);
        let rec = testing::restore(&testing::manifest(vec![info]));
        assert_eq!(rec.calls("dup3")[0][1], 5);
        // Saved from a live one of ours too.
        let (r, _w) = testing::pipe();
        let seen = Seen {
            link: "anon_inode:[signalfd]".into(),
            fdinfo: "pos:\t0\nflags:\t02\nsigmask:\t0000000200004200\n".into(),
            ..testing::seen(r.as_raw_fd())
        };
        let mut owner = testing::SaveOwner::new();
        let saved = SignalFd.save(&mut owner.cx(), &seen).unwrap().unwrap();
        assert_eq!(
            saved.state,
            FdState::SignalFd {
                mask: 0x2_0000_4200
            }
        );
    }
}
