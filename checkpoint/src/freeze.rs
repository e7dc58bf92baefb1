//! Stopping a process tree (a single process is a tree of one): every
//! descendant found from `/proc`, each thread stopped with ptrace before
//! anything is read, and resumed together.

use std::time::Instant;

use cr_ebpf_image::tree::{Tree, TreeProcess};
use cr_ebpf_tracee::Frozen;

use crate::{error::proc_err, proc, DumpError};

/// What `/proc/PID/stat` says of process `pid`.
pub(crate) fn stat(pid: i32) -> Result<proc::Stat, DumpError> {
    proc::stat(pid).map_err(proc_err(pid, format!("/proc/{pid}/stat")))
}

/// Refuses, before anything is stopped, a process no checkpoint can be
/// taken of: a zombie, a kernel thread, or pid 1 (its tree is every
/// process of the machine). `dump` and a tracking session ask first; a
/// caller that prepares anything before them (`track`'s images directory)
/// asks before that.
pub fn checkable(pid: i32) -> Result<(), DumpError> {
    let refuse = |what: String| Err(DumpError::NotSupported { pid, what });
    if pid <= 0 {
        return refuse(format!("pid {pid}: not a process id"));
    }
    if pid == 1 {
        return refuse(
            "pid 1 (init): its tree is every process of the machine; checkpoint the \
             service's own process (its main pid) instead"
                .into(),
        );
    }
    // One that does not exist is named by the freeze ("no process with
    // pid N").
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Ok(());
    };
    let st = proc::parse_stat(&text).ok_or_else(|| DumpError::NotSupported {
        pid,
        what: "an unreadable /proc/PID/stat".into(),
    })?;
    if st.state == 'Z' {
        return refuse(
            "a zombie (it has exited and its parent has not reaped it): nothing is left \
             to checkpoint"
                .into(),
        );
    }
    // Field 9, the kernel's task flags: PF_KTHREAD.
    let flags: u64 = text
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6)?.parse().ok())
        .unwrap_or(0);
    if flags & 0x0020_0000 != 0 {
        return refuse("a kernel thread: it has no user space to checkpoint".into());
    }
    Ok(())
}

/// Clock ticks per second (`/proc/PID/stat` times are in these).
pub(crate) fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Time since boot in clock ticks (the unit of `Stat::start_time`, which
/// the kernel counts on `CLOCK_BOOTTIME`).
pub(crate) fn uptime_ticks() -> u64 {
    crate::clock_ns(libc::CLOCK_BOOTTIME) / (1_000_000_000 / clock_ticks())
}

/// `root` and its descendants, parents before children.
pub(crate) fn processes(root: i32) -> Vec<i32> {
    let mut order = vec![root];
    let mut i = 0;
    while i < order.len() {
        for c in proc::children(order[i]) {
            if !order.contains(&c) {
                order.push(c);
            }
        }
        i += 1;
    }
    order
}

/// A process tree with every live process stopped.
pub(crate) struct FrozenTree {
    /// Parent links, groups, sessions, zombies; live processes' images go
    /// to `proc-PID/`.
    pub tree: Tree,
    /// The live processes, in the tree's order. Dropping one resumes it.
    pub frozen: Vec<Frozen>,
    /// Their start times (see `Stat::start_time`).
    pub start_times: Vec<u64>,
}

impl FrozenTree {
    /// When the first process was stopped.
    pub fn since(&self) -> Instant {
        self.frozen
            .first()
            .map(|f| f.since)
            .unwrap_or_else(Instant::now)
    }

    /// Lets every process run again.
    pub fn thaw(self) -> Result<(), DumpError> {
        thaw_all(self.frozen)
    }

    /// Kills every process, children first (a dump that does not leave
    /// them running, once its image is published).
    pub fn kill(self) -> Result<(), DumpError> {
        for f in self.frozen.into_iter().rev() {
            let pid = f.pid();
            f.kill()
                .map_err(|source| DumpError::Trace { pid, source })?;
        }
        Ok(())
    }
}

/// Stops `root` and every descendant (each thread, by ptrace) before
/// anything is read, so that a checkpoint is one instant of the whole tree.
/// A process forked while the tree was being stopped would be missed: then
/// everything is let go and stopping starts again (a few times).
pub(crate) fn freeze_tree(root: i32) -> Result<FrozenTree, DumpError> {
    const TRIES: u32 = 10;
    for i in 0..TRIES {
        match try_freeze(root)? {
            // A tree the restorer cannot rebuild: refused, and (dropped) let go.
            Some(t) => return crate::tree_check::check(&t.tree).map(|()| t),
            // A process came or went meanwhile: everything let go (dropping
            // the frozen ones resumes them), and again a little later (a
            // shell starting a program forks and exits helpers for a while).
            None => std::thread::sleep(std::time::Duration::from_millis((1 << i).min(50))),
        }
    }
    Err(DumpError::NotSupported {
        pid: root,
        what: format!(
            "a process tree that kept changing while it was being stopped ({TRIES} tries; \
             try again)"
        ),
    })
}

/// A process under seccomp is refused before anything is injected into it
/// when cr-ebpf cannot suspend its filters while it holds it
/// (`PTRACE_O_SUSPEND_SECCOMP` needs `CAP_SYS_ADMIN`, and a cr-ebpf not
/// under seccomp itself): strict mode kills a process at its first other
/// syscall, and a filter may kill it or fail the call.
fn seccomp_first(pid: i32) -> Result<(), DumpError> {
    if cr_ebpf_tracee::can_suspend_seccomp() {
        return Ok(());
    }
    let mode = |p: &str| {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
    };
    // Each thread has its own filters: any thread's mode counts.
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| format!("{pid}/task/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_else(|_| vec![pid.to_string()]);
    let theirs = threads.iter().filter_map(|t| mode(t)).find(|m| m != "0");
    if let Some(theirs) = theirs {
        let name = match theirs.as_str() {
            "1" => "strict mode",
            _ => "filters",
        };
        return Err(DumpError::NotSupported {
            pid,
            what: format!(
                "seccomp {name} (Seccomp {theirs}) while cr-ebpf cannot suspend them (it needs \
                 CAP_SYS_ADMIN and not to run under seccomp itself): its own calls in the \
                 process could kill it, and the filters could not be read"
            ),
        });
    }
    Ok(())
}

/// Resumes every process; the first failure is returned after all were tried.
fn thaw_all(all: Vec<Frozen>) -> Result<(), DumpError> {
    let mut first = None;
    for f in all {
        let pid = f.pid();
        if let Err(source) = f.thaw() {
            first.get_or_insert(DumpError::Trace { pid, source });
        }
    }
    first.map_or(Ok(()), Err)
}

/// One attempt of [`freeze_tree`]: `None` when the tree changed while it
/// was being stopped (a process forked, or one of the descendants exited).
fn try_freeze(root: i32) -> Result<Option<FrozenTree>, DumpError> {
    let pids = processes(root);
    let mut tree = Tree::default();
    let mut frozen: Vec<Frozen> = Vec::new();
    let mut start_times = Vec::new();
    for &pid in &pids {
        let st = match proc::stat(pid) {
            Ok(st) => st,
            // The root gone (or never there): say so as the freezer would.
            Err(e) if pid == root && e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DumpError::Trace {
                    pid,
                    source: cr_ebpf_tracee::TraceError::NoSuchProcess { pid },
                })
            }
            // A descendant that exited since the tree was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(proc_err(pid, format!("/proc/{pid}/stat"))(e)),
        };
        let zombie = st.state == 'Z';
        if zombie && pid == root {
            return Err(DumpError::NotSupported {
                pid,
                what: "a zombie (it has exited and its parent has not reaped it): \
                       nothing is left to checkpoint"
                    .into(),
            });
        }
        if !zombie {
            seccomp_first(pid)?;
            match Frozen::freeze(pid) {
                Ok(f) => frozen.push(f),
                // It exited meanwhile.
                Err(_) if pid != root && proc::stat(pid).ok().is_none_or(|s| s.state == 'Z') => {
                    return Ok(None)
                }
                Err(source) => return Err(crate::error::trace_err(pid, source)),
            }
            start_times.push(st.start_time);
        }
        tree.processes.push(TreeProcess {
            pid,
            ppid: if pid == root { 0 } else { st.ppid },
            pgid: st.pgid,
            sid: st.sid,
            zombie: zombie.then_some(st.exit_code),
            dir: if zombie {
                String::new()
            } else {
                format!("proc-{pid}")
            },
            // Made with CLONE_FILES: the parent's image holds the table.
            shares_files: pid != root
                && !zombie
                && cr_ebpf_resources::process::sharing::shared(
                    pid,
                    st.ppid,
                    cr_ebpf_resources::process::sharing::KCMP_FILES,
                ),
        });
    }
    // Nothing can fork any more; a child made meanwhile shows now.
    if processes(root) != pids {
        return Ok(None);
    }
    Ok(Some(FrozenTree {
        tree,
        frozen,
        start_times,
    }))
}

#[cfg(test)]
mod checkable_tests {
    use super::checkable;

    #[test]
    fn what_cannot_be_checkpointed_is_refused_before_anything_is_stopped() {
        let err = |pid| checkable(pid).unwrap_err().to_string();
        assert!(err(1).contains("pid 1 (init)"));
        assert!(err(0).contains("not a process id"));
        checkable(i32::MAX).expect("named by the freeze instead");
        // A kernel thread: kthreadd's children (pid 2 is kthreadd itself).
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            assert!(err(2).contains("kernel thread"));
        }
        // A zombie: a child that exited, not reaped yet.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(err(pid).contains("zombie"));
        child.wait().unwrap();
        checkable(std::process::id() as i32).expect("a live process of ours");
    }
}
