//! What limits or marks the process beyond its credentials: seccomp, the
//! no-new-privileges flag, its capability sets, supplementary groups and
//! audit login uid and session. A restored process gets
//! the restorer's, so any that differ from cr-ebpf's are refused at
//! checkpoint time, naming them, while the process keeps running.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, proc::Status, sys::Sys, RestoreError, SaveError};

/// Seccomp, no_new_privs, capabilities.
pub struct Security;

/// Fields of `/proc/PID/status` that must be the restorer's, with what they are.
const SAME: &[(&str, &str)] = &[
    ("Seccomp", "seccomp mode (filters are not carried)"),
    ("NoNewPrivs", "no_new_privs flag"),
    ("CapInh", "inheritable capabilities"),
    ("CapPrm", "permitted capabilities"),
    ("CapEff", "effective capabilities"),
    ("CapBnd", "capability bounding set"),
    ("CapAmb", "ambient capabilities"),
    ("Groups", "supplementary groups"),
];

/// Files of `/proc/PID` that must read as the restorer's, with what they are.
const SAME_FILES: &[(&str, &str)] = &[
    ("loginuid", "login uid (audit)"),
    ("sessionid", "audit session"),
];

/// The first field of [`SAME`] that differs: (field, what, theirs, ours).
fn first_difference(
    theirs: &Status,
    ours: &Status,
) -> Option<(&'static str, &'static str, String, String)> {
    SAME.iter().find_map(|&(key, what)| {
        let (t, o) = (theirs.field(key), ours.field(key));
        (t != o).then(|| {
            (
                key,
                what,
                t.unwrap_or("?").to_string(),
                o.unwrap_or("?").to_string(),
            )
        })
    })
}

impl ProcessKind for Security {
    fn name(&self) -> &'static str {
        "seccomp, no_new_privs and capabilities"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let theirs = Status::of(pid).map_err(proc_err(pid, format!("/proc/{pid}/status")))?;
        let ours = Status::of(std::process::id() as i32)
            .map_err(proc_err(pid, "/proc/self/status".into()))?;
        if let Some((key, what, t, o)) = first_difference(&theirs, &ours) {
            return Err(cx.refuse(format!(
                "{what} other than cr-ebpf's ({key} {t}, cr-ebpf's {o}): it would be \
                 restored with cr-ebpf's"
            )));
        }
        for (file, what) in SAME_FILES {
            let (t, o) = cx.theirs_and_ours(file)?;
            if t != o {
                return Err(cx.refuse(format!(
                    "{what} other than cr-ebpf's ({file} {}, cr-ebpf's {}): it would be \
                     restored with cr-ebpf's",
                    t.trim(),
                    o.trim()
                )));
            }
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
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn a_process_limited_otherwise_than_cr_ebpf_is_named() {
        save_with(
            &Security,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        let me = Status::of(std::process::id() as i32).unwrap();
        assert!(first_difference(&me, &me).is_none());
        let text = std::fs::read_to_string("/proc/self/status").unwrap();
        let strict = text
            .lines()
            .map(|l| {
                if l.starts_with("Seccomp:") {
                    "Seccomp:\t2"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = std::env::temp_dir().join(format!("cr-ebpf-status-{}", std::process::id()));
        std::fs::write(&path, strict).unwrap();
        let theirs = Status::from_text(std::fs::read_to_string(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let (key, _, t, _) = first_difference(&theirs, &me).expect("seccomp differs");
        assert_eq!((key, t.as_str()), ("Seccomp", "2"));
    }
}
