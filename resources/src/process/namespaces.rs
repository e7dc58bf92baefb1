//! Namespaces. A process is restored into the restorer's namespaces, so
//! one that lives in namespaces of its own (UTS, IPC, network, pid, mount,
//! user, cgroup) is refused at checkpoint time, naming the kind, while it
//! keeps running. The time namespace is the exception: its clocks are what
//! the image records ([`ProcessInfo::monotonic_ns`], `boottime_ns`, read
//! through the process's own offsets), and a restore whose clocks are
//! behind them gives the process a time namespace that goes on from them.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// The namespaces a process must share with the restorer, as named in
/// `/proc/PID/ns` (`*_for_children`: what its next children would get).
const SHARED: &[(&str, &str)] = &[
    ("uts", "UTS (hostname) namespace"),
    ("ipc", "IPC namespace"),
    ("net", "network namespace"),
    ("pid", "pid namespace"),
    ("pid_for_children", "pid namespace for its children"),
    ("mnt", "mount namespace"),
    ("user", "user namespace"),
    ("cgroup", "cgroup namespace"),
];

/// The namespace kinds.
pub struct Namespaces;

/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` offsets (ns) from the text of
/// `/proc/PID/timens_offsets`.
fn parse_offsets(text: &str) -> Option<(i64, i64)> {
    let (mut mono, mut boot) = (0, 0);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (name, s, ns) = (f.next()?, f.next()?, f.next()?);
        let v = s.parse::<i64>().ok()? * 1_000_000_000 + ns.parse::<i64>().ok()?;
        match name {
            "monotonic" | "1" => mono = v,
            "boottime" | "7" => boot = v,
            _ => {}
        }
    }
    Some((mono, boot))
}

impl ProcessKind for Namespaces {
    fn name(&self) -> &'static str {
        "namespaces"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        for (ns, what) in SHARED {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                .map_err(proc_err(pid, format!("/proc/{pid}/ns/{ns}")))?;
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .map_err(proc_err(pid, format!("/proc/self/ns/{ns}")))?;
            if theirs != ours {
                return Err(cx.refuse(format!(
                    "a {what} of its own ({}; cr-ebpf runs in {}): it would be restored in \
                     cr-ebpf's",
                    theirs.display(),
                    ours.display()
                )));
            }
        }
        // Its clocks as it sees them: the host's plus its time namespace's
        // offsets (zero outside one).
        let path = format!("/proc/{pid}/timens_offsets");
        let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path.clone()))?;
        let (mono, boot) = parse_offsets(&text)
            .ok_or_else(|| cx.refuse(format!("an unreadable {path}: {text:?}")))?;
        p.monotonic_ns = p.monotonic_ns.saturating_add_signed(mono);
        p.boottime_ns = p.boottime_ns.saturating_add_signed(boot);
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // The restorer's namespaces; the time namespace is made before the
        // stub (see `TimeNamespace`).
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn our_own_namespaces_pass_and_offsets_move_the_clocks() {
        let (p, q) = save_with(
            &Namespaces,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert_eq!(q.injected, 0);
        // The test runs in cr-ebpf's namespaces, with no time offsets.
        assert_eq!((p.monotonic_ns, p.boottime_ns), (0, 0));
        assert_eq!(
            parse_offsets("monotonic      3600        0\nboottime   -10   500000000\n"),
            Some((3_600_000_000_000, -9_500_000_000))
        );
        assert_eq!(parse_offsets("1 0 0\n7 2 0\n"), Some((0, 2_000_000_000)));
        assert!(parse_offsets("monotonic x 0\n").is_none());
    }
}
