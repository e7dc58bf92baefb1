//! What a process can share with another beyond memory mappings: its
//! descriptor table (`CLONE_FILES`), its filesystem information
//! (`CLONE_FS`: cwd, umask, root) and its signal handlers
//! (`CLONE_SIGHAND`), and its whole address space (`CLONE_VM` without
//! `CLONE_THREAD`, a `vfork` child). A restore rebuilds each process with
//! its own, so sharing any of them with another process is refused at
//! checkpoint time, naming the other process, while both keep running —
//! except a descriptor table shared down a line of parents and children
//! (each made with `CLONE_FILES` by one that shares it): the tree records
//! it, and the restore makes each such child with `CLONE_FILES` from its
//! parent, whose image holds the descriptors.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// `kcmp` types: the resource each compares.
const KCMP_VM: i32 = 1;
/// `kcmp` type: the descriptor table.
pub const KCMP_FILES: i32 = 2;
const KCMP_FS: i32 = 3;
const KCMP_SIGHAND: i32 = 4;

/// Resources shared between processes.
pub struct Sharing;

/// Whether processes `a` and `b` share the resource `kind` (a `KCMP_*`).
pub fn shared(a: i32, b: i32, kind: i32) -> bool {
    // SAFETY: kcmp with integer arguments only.
    unsafe { libc::syscall(libc::SYS_kcmp, a, b, kind, 0, 0) == 0 }
}

impl ProcessKind for Sharing {
    fn name(&self) -> &'static str {
        "resources shared with other processes"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        for &other in cx.together.iter().filter(|&&o| o != cx.pid) {
            let line = table_top(cx.pid, cx.together) == table_top(other, cx.together);
            for (kind, what) in [
                (KCMP_FILES, "descriptor table (CLONE_FILES)"),
                (KCMP_FS, "cwd, root and umask (CLONE_FS)"),
                (KCMP_SIGHAND, "signal handlers (CLONE_SIGHAND)"),
                (KCMP_VM, "address space (CLONE_VM, a vfork child)"),
            ] {
                if shared(cx.pid, other, kind) && !(kind == KCMP_FILES && line) {
                    return Err(cx.refuse(format!(
                        "a {what} shared with process {other}: each would be restored \
                         with its own"
                    )));
                }
            }
        }
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        Ok(())
    }
}

/// The parent of `pid` (0 when unknown).
fn parent_of(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The first process up the line of parents of `pid` (among `together`)
/// that does not share its descriptor table with its parent.
fn table_top(pid: i32, together: &[i32]) -> i32 {
    let mut p = pid;
    for _ in 0..together.len() {
        let up = parent_of(p);
        if up <= 0 || !together.contains(&up) || !shared(p, up, KCMP_FILES) {
            break;
        }
        p = up;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_shares_everything_with_itself_and_nothing_with_its_parent() {
        let me = std::process::id() as i32;
        let parent = std::os::unix::process::parent_id() as i32;
        for kind in [KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND] {
            assert!(shared(me, me, kind));
            assert!(!shared(me, parent, kind));
        }
    }
}
