//! Per-process flags only the process itself can be asked for: whether it
//! is a child subreaper (`PR_SET_CHILD_SUBREAPER`) and which membarrier
//! commands it registered for (`MEMBARRIER_CMD_GET_REGISTRATIONS`), both
//! recorded and set again in the rebuilt address space (registrations
//! belong to it). One injected syscall each, asked again only when the log
//! shows a `prctl` or `membarrier` call since the checkpoint before (or
//! knows nothing): neither changes any other way.

use cr_ebpf_common::syscalls as nr;
use cr_ebpf_image::{ProcessInfo, MEMBARRIER_REGISTRATIONS};

use super::{Changes, Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// `PR_SET_CHILD_SUBREAPER`, `PR_GET_CHILD_SUBREAPER`.
const PR_SET_CHILD_SUBREAPER: u64 = 36;
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

    fn invalidated_by(&self) -> &'static [u32] {
        &[nr::PRCTL, nr::MEMBARRIER]
    }

    fn invalidate(&self, changes: &mut Changes) {
        changes.prctl = true;
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        if let Some(k) = cx.known.filter(|_| !cx.changes.prctl) {
            cx.queries.reused += 2;
            p.child_subreaper = k.process.child_subreaper;
            p.membarrier = k.process.membarrier;
            return Ok(());
        }
        cx.queries.injected += 2;
        let (ret, out) = cx.ask.call_out(libc::SYS_prctl, 8, &|at| {
            [PR_GET_CHILD_SUBREAPER, at, 0, 0, 0, 0]
        })?;
        p.child_subreaper = ret == 0 && out.iter().any(|&b| b != 0);
        let (ret, _) = cx.ask.call_out(libc::SYS_membarrier, 0, &|_| {
            [MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0, 0, 0, 0]
        })?;
        // A kernel without the query answers an error: nothing registered
        // that could be asked about.
        let mask = u32::try_from(ret.max(0)).unwrap_or(u32::MAX);
        if mask & !MEMBARRIER_REGISTRATIONS != 0 {
            return Err(cx.refuse(format!(
                "membarrier registrations ({mask:#x}) of kinds cr-ebpf does not know"
            )));
        }
        p.membarrier = mask;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        if p.child_subreaper {
            sys.call(
                "prctl(PR_SET_CHILD_SUBREAPER)",
                libc::SYS_prctl,
                [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0],
            )?;
        }
        for bit in (0..32).map(|b| 1u32 << b) {
            if p.membarrier & bit != 0 {
                sys.call(
                    "membarrier(REGISTER)",
                    libc::SYS_membarrier,
                    [bit as u64, 0, 0, 0, 0, 0],
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        process::testing::{save_with, try_save_with},
        sys::ask::Scripted,
    };

    #[test]
    fn a_subreaper_and_membarrier_registrations_are_recorded_and_set_again() {
        let me = [std::process::id() as i32];
        let quiet = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
            .answer(libc::SYS_membarrier, |_| (0, Vec::new()));
        try_save_with(&Flags, &quiet, &me).expect("neither set");
        assert_eq!(quiet.asked()[0].1[0], PR_GET_CHILD_SUBREAPER);
        let reaper = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![1, 0, 0, 0]))
            .answer(libc::SYS_membarrier, |_| (0, Vec::new()));
        let p = try_save_with(&Flags, &reaper, &me).expect("a subreaper is recorded");
        assert!(p.child_subreaper);
        let rec = crate::sys::fake::Recording::new();
        Flags.restore(&rec, &p).unwrap();
        assert_eq!(
            rec.calls("prctl(PR_SET_CHILD_SUBREAPER)")[0][..2],
            [PR_SET_CHILD_SUBREAPER, 1]
        );
        let barrier = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
            .answer(libc::SYS_membarrier, |_| (0x154, Vec::new()));
        let p = try_save_with(&Flags, &barrier, &me).unwrap();
        assert_eq!(p.membarrier, 0x154);
        let rec = crate::sys::fake::Recording::new();
        Flags.restore(&rec, &p).unwrap();
        let cmds: Vec<u64> = rec
            .calls("membarrier(REGISTER)")
            .iter()
            .map(|c| c[0])
            .collect();
        assert_eq!(cmds, [1 << 2, 1 << 4, 1 << 6, 1 << 8]);
        // A registration this version does not know is refused.
        let unknown = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
            .answer(libc::SYS_membarrier, |_| (1 << 12, Vec::new()));
        let err = try_save_with(&Flags, &unknown, &me).unwrap_err();
        assert!(
            err.to_string()
                .contains("membarrier registrations (0x1000)"),
            "{err}"
        );
        // A kernel without the query answers an error: nothing to refuse.
        let old = Scripted::default().answer(libc::SYS_prctl, |_| (0, vec![0; 8]));
        try_save_with(&Flags, &old, &me).expect("ENOSYS is not a registration");
    }

    #[test]
    fn the_flags_are_reused_until_a_prctl_or_a_membarrier_call() {
        let asked = Scripted::default()
            .answer(libc::SYS_prctl, |_| (0, vec![1, 0, 0, 0]))
            .answer(libc::SYS_membarrier, |_| (0x10, Vec::new()));
        let (p, q) = save_with(&Flags, &asked, None, &Changes::all());
        assert_eq!(
            (p.child_subreaper, p.membarrier, q.injected),
            (true, 0x10, 2)
        );
        let prev = cr_ebpf_image::Manifest {
            process: p,
            ..Default::default()
        };
        // Nothing asked: a question would find no answer.
        let (again, q) = save_with(&Flags, &Scripted::default(), Some(&prev), &Changes::none());
        assert_eq!((again.child_subreaper, again.membarrier), (true, 0x10));
        assert_eq!((q.injected, q.reused), (0, 2));
        for call in [nr::PRCTL, nr::MEMBARRIER] {
            let mut after = Changes::none();
            crate::process::invalidate(call, &mut after);
            let quiet = Scripted::default()
                .answer(libc::SYS_prctl, |_| (0, vec![0; 8]))
                .answer(libc::SYS_membarrier, |_| (0, Vec::new()));
            let (p, q) = save_with(&Flags, &quiet, Some(&prev), &after);
            assert_eq!((p.child_subreaper, p.membarrier, q.injected), (false, 0, 2));
        }
    }
}
