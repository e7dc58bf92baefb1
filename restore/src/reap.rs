//! What a failed tree restore leaves is reaped: a stub other than the
//! root's is a child of its parent's stub, so when a failure kills the
//! stubs, the ones whose parent died first go to the nearest subreaper (or
//! to init), and stay zombies holding their pids where nobody reaps them.
//! While a tree is restored the restorer is a child subreaper, so those
//! come to it, and a failure reaps every stub it made.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Restores in progress in this process, and whether it was a subreaper
/// before the first of them.
static ACTIVE: Mutex<(usize, bool)> = Mutex::new((0, false));

/// This process a child subreaper while it lives (as it was before when
/// the last one ends).
pub(crate) struct Subreaper(());

impl Subreaper {
    pub(crate) fn start() -> Self {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if active.0 == 0 {
            let mut was: libc::c_int = 0;
            // SAFETY: PR_GET_CHILD_SUBREAPER writes one int at the pointer.
            unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut was as *mut libc::c_int) };
            active.1 = was != 0;
            if !active.1 {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
            }
        }
        active.0 += 1;
        Self(())
    }

    /// Reaps the processes `made` (killed already: every stub's guard has
    /// dropped) as they become ours, for at most a few seconds; a pid held
    /// by a process that is neither ours nor dying is left alone.
    pub(crate) fn reap(&self, made: &[i32]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for &pid in made {
            loop {
                // SAFETY: waitpid of one pid without a status pointer.
                let r = unsafe {
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG | libc::__WALL)
                };
                if r == pid {
                    break;
                }
                // Not ours (yet): a zombie whose parent is dying comes to
                // us; anything else is not a stub of this restore.
                let dying =
                    r < 0 && cr_ebpf_resources::proc::stat(pid).is_ok_and(|s| s.state == 'Z');
                if (r < 0 && !dying) || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.0 -= 1;
        if active.0 == 0 && !active.1 {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
        }
    }
}
