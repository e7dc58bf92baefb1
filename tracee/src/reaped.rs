//! How processes ended whose exit a tracer's `waitpid` consumed.
//!
//! A tracer that is also the parent of a traced process (`cr-ebpf run`
//! tracks the service it started) reaps that process when it waits for its
//! next ptrace stop and gets its exit instead. The status is kept here so
//! that the parent's own wait can still learn how its child ended.

use std::{collections::VecDeque, sync::Mutex};

/// How many endings are kept (the oldest go first): a tracked tree whose
/// threads come and go must not grow this without bound.
const KEPT: usize = 64;

/// How a reaped thread or process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `exit` with this status.
    Exited(i32),
    /// Killed by this signal.
    Killed(i32),
}

static REAPED: Mutex<VecDeque<(i32, Ending)>> = Mutex::new(VecDeque::new());

/// Records that `pid` was reaped with `ending`.
pub(crate) fn record(pid: i32, ending: Ending) {
    let mut r = REAPED.lock().unwrap_or_else(|e| e.into_inner());
    if r.len() == KEPT {
        r.pop_front();
    }
    r.push_back((pid, ending));
}

/// How `pid` ended, if a tracer's wait reaped it (taken: asked once).
pub fn take_reaped(pid: i32) -> Option<Ending> {
    let mut r = REAPED.lock().unwrap_or_else(|e| e.into_inner());
    let i = r.iter().rposition(|(p, _)| *p == pid)?;
    r.remove(i).map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ending_is_found_once_and_the_oldest_are_dropped() {
        record(-7, Ending::Killed(9));
        assert_eq!(take_reaped(-7), Some(Ending::Killed(9)));
        assert_eq!(take_reaped(-7), None);
        for i in 0..(KEPT as i32 + 1) {
            record(-1000 - i, Ending::Exited(i));
        }
        assert_eq!(take_reaped(-1000), None, "the oldest went");
        assert_eq!(take_reaped(-1001), Some(Ending::Exited(1)));
    }

    /// The case this is for: our own child, traced, ends while we wait for
    /// its next stop; our wait reaps it, and its status is still known.
    #[test]
    fn a_traced_child_reaped_by_the_tracer_leaves_its_status() {
        use std::{io::Write, process::Stdio};
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x; exit 7"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = crate::Tracee::seize(pid).unwrap();
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let gone = loop {
            match t.wait() {
                Ok(_) => nix::sys::ptrace::cont(nix::unistd::Pid::from_raw(t.tid()), None).unwrap(),
                Err(e) => break e,
            }
        };
        assert!(matches!(gone, crate::TraceError::Gone { .. }), "{gone}");
        assert!(child.try_wait().is_err(), "reaped by the tracer's wait");
        assert_eq!(take_reaped(pid), Some(Ending::Exited(7)));
    }
}
