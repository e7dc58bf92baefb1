//! Every thread of a process, stopped.

use std::time::Instant;

use crate::{TraceError, Tracee};

/// A frozen process. Dropping it resumes every thread.
pub struct Frozen {
    pid: i32,
    threads: Vec<Tracee>,
    /// When the first thread was stopped.
    pub since: Instant,
}

fn list_threads(pid: i32) -> Result<Vec<i32>, TraceError> {
    let path = format!("/proc/{pid}/task");
    let dir = std::fs::read_dir(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TraceError::NoSuchProcess { pid }
        } else {
            TraceError::Proc { path, source }
        }
    })?;
    let mut tids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// `TracerPid` of thread `tid` of `pid`.
fn tracer_of(pid: i32, tid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
}

impl Frozen {
    /// Seizes and stops every thread of `pid`, repeating until no new thread
    /// appears (a thread may be created while we seize the others).
    pub fn freeze(pid: i32) -> Result<Self, TraceError> {
        let since = Instant::now();
        let mut threads: Vec<Tracee> = Vec::new();
        loop {
            let mut new = 0;
            for tid in list_threads(pid)? {
                if threads.iter().any(|t| t.tid() == tid) {
                    continue;
                }
                let t = match Tracee::seize(tid) {
                    Ok(t) => t,
                    // It exited between listing and seizing.
                    Err(TraceError::Ptrace {
                        source: nix::Error::ESRCH,
                        ..
                    }) => continue,
                    Err(TraceError::Ptrace {
                        source: nix::Error::EPERM,
                        ..
                    }) if tracer_of(pid, tid).is_some_and(|t| t != 0) => {
                        let tracer = tracer_of(pid, tid).unwrap_or(0);
                        return Err(TraceError::Traced { tid, tracer });
                    }
                    Err(e) => return Err(e),
                };
                match t.interrupt() {
                    Ok(()) => {}
                    Err(TraceError::Gone { .. }) => continue,
                    Err(e) => return Err(e),
                }
                // Before anything is injected (see abort_rseq).
                t.abort_rseq()?;
                threads.push(t);
                new += 1;
            }
            if new == 0 {
                break;
            }
        }
        if threads.is_empty() {
            return Err(TraceError::Gone { pid });
        }
        threads.sort_by_key(|t| (t.tid() != pid, t.tid()));
        Ok(Self {
            pid,
            threads,
            since,
        })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The stopped threads, the main thread first.
    pub fn threads(&self) -> &[Tracee] {
        &self.threads
    }

    /// Resumes every thread.
    pub fn thaw(self) -> Result<(), TraceError> {
        let mut first_err = None;
        for t in self.threads {
            if let Err(e) = t.detach() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process (after a successful dump without `--leave-running`).
    pub fn kill(self) -> Result<(), TraceError> {
        let pid = self.pid;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|source| TraceError::Ptrace {
            request: "kill(SIGKILL)",
            tid: pid,
            source,
        })?;
        // As the tracer we see each thread die: return only once they have.
        // Other threads first: the leader's exit is reported only after them.
        let mut threads = self.threads;
        threads.reverse();
        for t in threads {
            loop {
                match nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(t.tid()),
                    Some(nix::sys::wait::WaitPidFlag::__WALL),
                ) {
                    Ok(nix::sys::wait::WaitStatus::Exited(..))
                    | Ok(nix::sys::wait::WaitStatus::Signaled(..))
                    | Err(_) => break,
                    // A stop reported before the kill landed: let it go on dying.
                    Ok(_) => {
                        let _ = nix::sys::ptrace::cont(nix::unistd::Pid::from_raw(t.tid()), None);
                    }
                }
            }
            t.forget();
        }
        Ok(())
    }
}
