//! Signal-driven I/O (`O_ASYNC` with `F_SETOWN`/`F_SETSIG`): the owner and
//! signal of a descriptor are not restored yet, so a descriptor with
//! `O_ASYNC` is refused at checkpoint time, naming it, while the process
//! keeps running.

use super::{SaveCx, Seen};
use crate::SaveError;

/// Refuses `seen` when it has `O_ASYNC`.
pub fn refuse(cx: &SaveCx<'_>, seen: &Seen) -> Result<(), SaveError> {
    if seen.flags as i32 & libc::O_ASYNC != 0 {
        return Err(cx.refuse(
            seen.fd,
            format!(
                "signal-driven I/O on {} (O_ASYNC: its owner and signal are not restored yet)",
                seen.link
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn o_async_is_refused() {
        let (r, _w) = testing::pipe();
        let mut owner = testing::SaveOwner::new();
        refuse(&owner.cx(), &testing::seen(r.as_raw_fd())).expect("no O_ASYNC");
        // No owner set: the flag alone, no signal is ever sent.
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_ASYNC) };
        let err = refuse(&owner.cx(), &testing::seen(r.as_raw_fd())).unwrap_err();
        assert!(err.to_string().contains("O_ASYNC"), "{err}");
    }
}
