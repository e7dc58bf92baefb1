//! Signal-driven I/O (`O_ASYNC` with `F_SETOWN_EX`/`F_SETSIG`): the owner
//! of a descriptor's open file and the signal it gets are read from a
//! duplicate of the descriptor and set again by the restored process
//! itself, once every descriptor has its number (so the owner is recorded
//! with the process's credentials, as before). The owner must be restored
//! with the process: a process or a process group of the checkpoint, or
//! the main thread of one (other threads are made after the descriptors);
//! any other owner is refused.
//!
//! Only descriptors with `O_ASYNC` are asked (a duplicate each).

use std::os::fd::AsRawFd as _;

use cr_ebpf_image::{FdInfo, FileOwner};

use super::{SaveCx, Seen};
use crate::{sys::Sys, RestoreError, SaveError};

/// `F_OWNER_TID`.
const OWNER_TID: u32 = 0;
/// `F_OWNER_PID`.
#[cfg(test)]
const OWNER_PID: u32 = 1;
/// `fcntl` commands the libc crate lacks (`<linux/fcntl.h>` values).
const F_SETSIG: i32 = 10;
pub(super) const F_GETSIG: i32 = 11;
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;

/// `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: i32,
    pid: i32,
}

/// Records the owner and signal of `seen` in `info` when it has `O_ASYNC`.
pub fn save(cx: &SaveCx<'_>, seen: &Seen, info: &mut FdInfo) -> Result<(), SaveError> {
    if seen.flags as i32 & libc::O_ASYNC == 0 {
        return Ok(());
    }
    let dup = cx.dup(seen.fd)?;
    let mut own = OwnerEx { kind: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX fills the struct; F_GETSIG takes no argument.
    let (r, sig) = unsafe {
        (
            libc::fcntl(dup.as_raw_fd(), F_GETOWN_EX, &mut own as *mut OwnerEx),
            libc::fcntl(dup.as_raw_fd(), F_GETSIG),
        )
    };
    if r < 0 || sig < 0 {
        return Err(cx.refuse(
            seen.fd,
            format!(
                "signal-driven I/O on {} whose owner cannot be read ({})",
                seen.link,
                std::io::Error::last_os_error()
            ),
        ));
    }
    let owner = FileOwner {
        kind: own.kind as u32,
        pid: own.pid,
        signal: sig as u32,
    };
    let inside = |p: i32| p == cx.pid || cx.scope.pids.contains(&p);
    if owner.pid != 0 && !inside(owner.pid) {
        let what = match owner.kind {
            OWNER_TID => "thread",
            2 => "process group",
            _ => "process",
        };
        let why = if owner.kind == OWNER_TID {
            "only a process's main thread exists when descriptors are restored"
        } else {
            "it is not checkpointed with it"
        };
        return Err(cx.refuse(
            seen.fd,
            format!(
                "signal-driven I/O on {} (O_ASYNC) owned by {what} {}: {why}",
                seen.link, owner.pid
            ),
        ));
    }
    info.owner = owner;
    Ok(())
}

/// Sets the owner and signal of the process's descriptor `fd` as `f` has
/// them (nothing when it has none).
pub fn restore(sys: &dyn Sys, f: &FdInfo) -> Result<(), RestoreError> {
    let o = f.owner;
    if o.pid != 0 {
        let mut raw = Vec::with_capacity(8);
        raw.extend_from_slice(&(o.kind as i32).to_le_bytes());
        raw.extend_from_slice(&o.pid.to_le_bytes());
        let at = sys.put(0, &raw)?;
        sys.call(
            "fcntl(F_SETOWN_EX)",
            libc::SYS_fcntl,
            [f.fd as u64, F_SETOWN_EX as u64, at, 0, 0, 0],
        )?;
    }
    if o.signal != 0 {
        sys.call(
            "fcntl(F_SETSIG)",
            libc::SYS_fcntl,
            [f.fd as u64, F_SETSIG as u64, o.signal as u64, 0, 0, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn the_owner_and_signal_round_trip_and_an_outside_owner_is_refused() {
        let (r, _w) = testing::pipe();
        let me = std::process::id() as i32;
        let plain = testing::save_own(r.as_raw_fd());
        assert_eq!(plain.owner, FileOwner::default(), "no O_ASYNC: not asked");
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_ASYNC);
            libc::fcntl(r.as_raw_fd(), libc::F_SETOWN, me);
            libc::fcntl(r.as_raw_fd(), F_SETSIG, libc::SIGUSR2);
        }
        let mut owner = testing::SaveOwner::new();
        let mut info = plain.clone();
        save(&owner.cx(), &testing::seen(r.as_raw_fd()), &mut info).unwrap();
        assert_eq!(
            info.owner,
            FileOwner {
                kind: OWNER_PID,
                pid: me,
                signal: libc::SIGUSR2 as u32,
            }
        );
        let rec = crate::sys::fake::Recording::new();
        restore(&rec, &info).unwrap();
        assert_eq!(rec.names(), ["fcntl(F_SETOWN_EX)", "fcntl(F_SETSIG)"]);
        let own = rec.calls("fcntl(F_SETOWN_EX)")[0];
        assert_eq!(own[0] as i32, info.fd);
        assert_eq!(
            rec.memory("fcntl(F_SETOWN_EX)", 0, own[2], 8),
            [&1i32.to_le_bytes()[..], &me.to_le_bytes()[..]].concat()
        );
        assert_eq!(rec.calls("fcntl(F_SETSIG)")[0][2] as i32, libc::SIGUSR2);

        // Owned by our parent, which is not checkpointed with us.
        let parent = std::os::unix::process::parent_id() as i32;
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETOWN, parent) };
        let err = save(&owner.cx(), &testing::seen(r.as_raw_fd()), &mut info);
        // No signal for the parent (the test runner) when the pipe closes.
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            libc::fcntl(r.as_raw_fd(), libc::F_SETOWN, 0);
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, 0);
        }
        let err = err.unwrap_err();
        assert!(
            err.to_string().contains("not checkpointed with it"),
            "{err}"
        );
    }
}
