//! Control group membership. A restored process lands in the restorer's
//! cgroups, so one that lives in others is refused at checkpoint time,
//! naming them, while it keeps running.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// Cgroup membership (v1 hierarchies and v2).
pub struct Cgroups;

/// The lines of `theirs` (a `/proc/PID/cgroup` text) that `ours` lacks.
fn differing<'a>(theirs: &'a str, ours: &str) -> Vec<&'a str> {
    theirs
        .lines()
        .filter(|l| !ours.lines().any(|o| o == *l))
        .collect()
}

impl ProcessKind for Cgroups {
    fn name(&self) -> &'static str {
        "cgroups"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        let (theirs, ours) = cx.theirs_and_ours("cgroup")?;
        let other = differing(&theirs, &ours);
        if !other.is_empty() {
            return Err(cx.refuse(format!(
                "a cgroup other than cr-ebpf's ({}): it would be restored in cr-ebpf's; \
                 run cr-ebpf in the same cgroup",
                other.join(", ")
            )));
        }
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // The stub is the restorer's child: it is in the restorer's cgroups.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn only_the_cgroups_we_are_in_pass() {
        // The test process is in cr-ebpf's cgroups.
        save_with(
            &Cgroups,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        let ours = "4:memory:/a\n0::/\n";
        assert!(differing("0::/\n4:memory:/a\n", ours).is_empty());
        assert_eq!(differing("4:memory:/b\n0::/\n", ours), ["4:memory:/b"]);
        assert_eq!(
            differing("0::/system.slice/x.service\n", "0::/\n"),
            ["0::/system.slice/x.service"]
        );
    }
}
