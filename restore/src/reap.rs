//! What a failed tree restore leaves is reaped: a stub other than the
//! root's is a child of its parent's stub, so when a failure kills the
//! stubs, the ones whose parent died first go to the nearest subreaper (or
//! to init), and stay zombies holding their pids where nobody reaps them.
//! While a tree is restored, the first stub a failure kills (its
//! `KillGuard`) makes the restorer a child subreaper, so those come to it,
//! and the failed restore reaps every stub it made, then stops being one.
//! A restore that succeeds never is one: what the caller's other children
//! leave goes where it always goes.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Tree restores in progress in this process, and, once a failure made
/// this process a subreaper, whether it was one before.
static ACTIVE: Mutex<(usize, Option<bool>)> = Mutex::new((0, None));

/// A tree restore in progress (see the module).
pub(crate) struct TreeRestore(());

impl TreeRestore {
    pub(crate) fn start() -> Self {
        ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
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

impl Drop for TreeRestore {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        active.0 -= 1;
        // The last one: as it was before (taking what a failure set).
        if active.0 == 0 && active.1.take() == Some(false) {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
        }
    }
}

/// A stub is about to be killed: while a tree is restored, this process
/// becomes a child subreaper first (once), so that the stubs this orphans
/// come to it.
pub(crate) fn teardown() {
    let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    if active.0 == 0 || active.1.is_some() {
        return;
    }
    let mut was: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int at the pointer.
    unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut was as *mut libc::c_int) };
    if was == 0 {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    active.1 = Some(was != 0);
}
