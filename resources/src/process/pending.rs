//! Signals pending for the whole process: read with `PTRACE_PEEKSIGINFO`
//! (not consumed), queued again with `rt_sigqueueinfo` once every thread
//! exists (every signal is blocked until each thread gets its own mask).

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// Process-wide pending signals with their siginfo.
pub struct Pending;

impl ProcessKind for Pending {
    fn name(&self) -> &'static str {
        "pending signals"
    }

    fn phase(&self) -> Phase {
        Phase::Signals
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        p.pending = cx.ask.pending_signals()?;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        for siginfo in &p.pending {
            let signo = i32::from_le_bytes(siginfo[0..4].try_into().expect("4 bytes"));
            let at = sys.put(0, siginfo)?;
            sys.call(
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                [p.pid as u64, signo as u64, at, 0, 0, 0],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn each_signal_is_queued_again_with_its_siginfo() {
        let mut info = vec![0u8; 128];
        info[0..4].copy_from_slice(&12i32.to_le_bytes());
        info[24..32].copy_from_slice(&42u64.to_le_bytes());
        let p = ProcessInfo {
            pid: 4242,
            pending: vec![info.clone()],
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        Pending.restore(&rec, &p).unwrap();
        let c = rec.calls("rt_sigqueueinfo")[0];
        assert_eq!((c[0], c[1]), (4242, 12));
        assert_eq!(rec.memory("rt_sigqueueinfo", 0, c[2], 128), info);
    }

    #[test]
    fn pending_signals_are_read_as_they_are() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        let mut ask = Scripted::default();
        ask.pending = vec![vec![7; 128]];
        let (p, _) = save_with(&Pending, &ask, None, &super::super::Changes::all());
        assert_eq!(p.pending, [vec![7; 128]]);
    }
}
