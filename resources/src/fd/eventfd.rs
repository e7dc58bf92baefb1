//! eventfd counters: the counter and semaphore mode from fdinfo; rebuilt in
//! the restorer with the same count and handed over.

use std::os::fd::AsRawFd as _;

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{owned, unreadable, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// An eventfd.
pub struct EventFd;

impl Descriptor for EventFd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::EventFd]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[eventfd]") {
            return None;
        }
        let count = seen
            .field("eventfd-count:")
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        let semaphore = seen.field("eventfd-semaphore:").is_some_and(|v| v == "1");
        Some(match count {
            Some(count) => {
                let mut info = seen.info(FdKind::EventFd);
                info.state = FdState::EventFd { count, semaphore };
                Ok(info)
            }
            None => Err(unreadable(cx, seen, "eventfd count")),
        })
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::EventFd { count, semaphore } = f.state else {
            return Err(RestoreError::NotSupported(format!(
                "eventfd {} without its state",
                f.fd
            )));
        };
        let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
        // eventfd's initial value is 32 bits: the rest is written.
        // SAFETY: plain syscall.
        let fd = owned(unsafe { libc::eventfd(0, flags) }, "eventfd")?;
        if count > 0 {
            // SAFETY: writing 8 bytes of ours.
            let n = unsafe { libc::write(fd.as_raw_fd(), (&count as *const u64).cast(), 8) };
            if n != 8 {
                return Err(RestoreError::Syscall {
                    call: format!("write({count}) to a restored eventfd"),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        cx.adopt(&fd).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_counter_round_trips() {
        let count: u64 = 0x1_0000_0005; // more than the 32 bits eventfd() takes
                                        // SAFETY: plain syscall.
        let fd = owned(
            unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_SEMAPHORE) },
            "eventfd",
        )
        .unwrap();
        // SAFETY: writing 8 bytes of ours.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&count as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        let info = testing::save_own(fd.as_raw_fd());
        let want = FdState::EventFd {
            count,
            semaphore: true,
        };
        assert_eq!(info.state, want);
        let rec = testing::restore(&testing::manifest(vec![info.clone()]));
        assert_eq!(rec.names()[0], "adopt");
        assert_eq!(rec.calls("dup3")[0][1] as i32, info.fd);
        // Made again from the image: the same state.
        let again = testing::rebuilt_state(&EventFd, &info);
        assert_eq!(again, want);
    }
}
