//! Per-process flags only the process itself can be asked for: whether it
//! is a child subreaper (`PR_SET_CHILD_SUBREAPER`), and which membarrier
//! commands it registered for. Neither is restored yet, so either set is
//! refused at checkpoint time, naming it, while the process keeps running
//! (one injected syscall each, every checkpoint: no log shows them).

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// `PR_GET_CHILD_SUBREAPER`.
const PR_GET_CHILD_SUBREAPER: u64 = 37;
/// `MEMBARRIER_CMD_GET_REGISTRATIONS` (Linux 6.3+).
const MEMBARRIER_CMD_GET_REGISTRATIONS: u64 = 1 << 9;

/// Child subreaper and membarrier registrations.
pub struct Flags;

impl ProcessKind for Flags {
    fn name(&self) -> &'static str {
        "child subreaper and membarrier registrations"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        cx.queries.injected += 2;
        let (ret, out) = cx.ask.call_out(libc::SYS_prctl, 8, &|at| {
            [PR_GET_CHILD_SUBREAPER, at, 0, 0, 0, 0]
        })?;
        if ret == 0 && out.iter().any(|&b| b != 0) {
            return Err(cx.refuse(
                "a child subreaper (PR_SET_CHILD_SUBREAPER): orphans would no longer come \
                 to it after a restore",
            ));
        }
        let (ret, _) = cx.ask.call_out(libc::SYS_membarrier, 0, &|_| {
            [MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, 0, 0, 0]
        })?;
        if ret > 0 {
            return Err(cx.refuse(format!(
                "membarrier registrations ({ret:#x}): they would be gone after a restore"
            )));
        }
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::try_save_with, sys::ask::Scripted};

    #[test]
    fn a_subreaper_or_registered_membarrier_is_refused() {
        let me = [std::process::id() as i32];
        let quiet = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
            .answer(libc::SYS_membarrier, |_| (0, Vec::new()));
        try_save_with(&Flags, &quiet, &me).expect("neither set");
        assert_eq!(quiet.asked()[0].1[0], PR_GET_CHILD_SUBREAPER);
        let reaper = Scripted::default().answer(libc::SYS_prctl, |_| (0, vec![1, 0, 0, 0]));
        let err = try_save_with(&Flags, &reaper, &me).unwrap_err();
        assert!(err.to_string().contains("child subreaper"), "{err}");
        let barrier = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
            .answer(libc::SYS_membarrier, |_| (8, Vec::new()));
        let err = try_save_with(&Flags, &barrier, &me).unwrap_err();
        assert!(
            err.to_string().contains("membarrier registrations (0x8)"),
            "{err}"
        );
        // A kernel without the query answers an error: nothing to refuse.
        let old = Scripted::default().answer(libc::SYS_prctl, |_| (0, vec![0; 8]));
        try_save_with(&Flags, &old, &me).expect("ENOSYS is not a registration");
    }
}
