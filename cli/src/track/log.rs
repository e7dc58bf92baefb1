//! The resource log of the tracked tree, folded per process between
//! checkpoints: what changed (for the reuse of injected answers), new
//! mappings (registered early), forks and execs (trackers), descriptors
//! closed (held connections let go).

use std::collections::HashMap;

use cr_ebpf_checkpoint::{Changes, TreeChanges};
use cr_ebpf_common::syscalls as nr;
use cr_ebpf_loader::Event;
use cr_ebpf_resources::advice;

/// What the resource log saw of one process since the previous checkpoint.
#[derive(Default)]
pub(super) struct ProcLog {
    pub(super) changes: Option<Changes>,
    pub(super) new_mappings: Vec<(u64, u64)>,
    /// The process called `execve`: its memory is new.
    pub(super) exec: bool,
    /// Descriptor ranges the process closed or replaced since last looked at.
    pub(super) closed: Vec<(i32, i32)>,
}

/// What the resource log saw of the tree since the previous checkpoint.
#[derive(Default)]
pub(super) struct Log {
    pub(super) procs: HashMap<u32, ProcLog>,
    pub(super) faults: u64,
    /// Processes forked since last looked at.
    pub(super) children: Vec<u32>,
    /// The root exited.
    pub(super) exited: bool,
    /// When the processes were stopped by our recent checkpoints: their
    /// syscalls then are the ones we injected, not their own.
    pub(super) ours: Vec<(u64, u64)>,
    /// When one process was stopped for a question of the warm-up (see
    /// `Session::warm_up`): (pid, from, to).
    pub(super) ours_of: Vec<(u32, u64, u64)>,
}

impl Log {
    pub(super) fn fold(&mut self, root: u32, e: &Event) {
        match e {
            Event::Syscall(s)
                if !self
                    .ours
                    .iter()
                    .any(|&(a, b)| (a..=b).contains(&s.origin.ts_ns))
                    && !self.ours_of.last().is_some_and(|&(_, _, end)| {
                        // All in the past: most events come after the last.
                        s.origin.ts_ns <= end
                            && self.ours_of.iter().any(|&(p, a, b)| {
                                p == s.origin.tgid && (a..=b).contains(&s.origin.ts_ns)
                            })
                    }) =>
            {
                let ok = s.ret.is_some_and(|r| r >= 0);
                let p = self.procs.entry(s.origin.tgid).or_default();
                let changes = p.changes.get_or_insert_with(Changes::none);
                match s.nr {
                    nr::MMAP if ok => {
                        let a = s.ret.unwrap_or(0) as u64;
                        changes.layout.push((a, a + s.args[1]));
                        // Private and readable: what checkpoints copy pages of.
                        let private = s.args[3] & libc::MAP_SHARED as u64 == 0;
                        let readable = s.args[2] & libc::PROT_READ as u64 != 0;
                        if private && readable {
                            p.new_mappings.push((a, a + s.args[1]));
                        }
                        // Made locked or droppable: a setting of its own.
                        let droppable = s.args[3] & 0x0f == advice::MMAP_DROPPABLE as u64;
                        if droppable || s.args[3] & libc::MAP_LOCKED as u64 != 0 {
                            changes.advice.push((a, a + s.args[1]));
                        }
                    }
                    // A mapping's own settings (see resources' advice).
                    nr::MADVISE | nr::MLOCK | nr::MUNLOCK | nr::MLOCK2 | nr::MSEAL => changes
                        .advice
                        .push((s.args[0], s.args[0].saturating_add(s.args[1]))),
                    nr::MLOCKALL | nr::MUNLOCKALL => changes.advice_unknown = true,
                    // Descriptors closed or replaced: held connections on
                    // them are let go.
                    nr::CLOSE if ok => p.closed.push((s.args[0] as i32, s.args[0] as i32)),
                    nr::CLOSE_RANGE if ok => p.closed.push((
                        s.args[0].min(i32::MAX as u64) as i32,
                        s.args[1].min(i32::MAX as u64) as i32,
                    )),
                    nr::DUP2 | nr::DUP3 if ok => {
                        p.closed.push((s.args[1] as i32, s.args[1] as i32))
                    }
                    nr::MUNMAP => changes.layout.push((s.args[0], s.args[0] + s.args[1])),
                    nr::MREMAP => {
                        changes.layout.push((s.args[0], s.args[0] + s.args[1]));
                        if ok {
                            let a = s.ret.unwrap_or(0) as u64;
                            changes.layout.push((a, a + s.args[2]));
                            // Moved or grown with its settings.
                            changes.advice.push((a, a + s.args[2]));
                        }
                    }
                    // What a process-wide kind's saved answers depend on:
                    // each kind names its syscalls.
                    other => cr_ebpf_resources::process::invalidate(other, changes),
                }
            }
            Event::Fault(_) => self.faults += 1,
            Event::Fork(f) if !f.thread => self.children.push(f.child_tgid),
            Event::Exit(x) if x.group_dead == Some(true) => {
                if x.origin.tgid == root {
                    self.exited = true;
                }
                self.procs.remove(&x.origin.tgid);
            }
            // A new program: signal handlers reset, timers, mappings and
            // settings all new. Nothing asked before it holds.
            Event::Exec(x) => {
                let p = self.procs.entry(x.origin.tgid).or_default();
                p.exec = true;
                p.changes = Some(Changes::all());
            }
            _ => {}
        }
    }

    /// The changes of every process in `pids`, taken; `lost` ones (the ring
    /// buffer dropped their records) are unknown.
    pub(super) fn take_changes(
        &mut self,
        pids: &[i32],
        lost: &[i32],
        undecodable: bool,
    ) -> TreeChanges {
        let mut t = TreeChanges::same(Changes::all());
        for &pid in pids {
            let c = self
                .procs
                .get_mut(&(pid as u32))
                .and_then(|p| p.changes.take())
                .unwrap_or_else(Changes::none);
            let c = if undecodable || lost.contains(&pid) {
                Changes::all()
            } else {
                c
            };
            t.by_pid.insert(pid, c);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use cr_ebpf_loader::event::{CapturedString, Exec, Exit, Fork, Origin, Syscall};

    use super::*;

    fn at(tgid: u32, ts_ns: u64) -> Origin {
        Origin {
            tgid,
            tid: tgid,
            ts_ns,
        }
    }

    fn call(tgid: u32, ts_ns: u64, nr: u32, args: [u64; 6], ret: i64) -> Event {
        Event::Syscall(Syscall {
            origin: at(tgid, ts_ns),
            nr,
            name: None,
            args,
            ret: Some(ret),
            enter_ns: ts_ns,
            path: None,
        })
    }

    #[test]
    fn the_log_is_folded_per_process_of_the_tree() {
        let mut log = Log::default();
        let prot_rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let private = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        // The root installs a handler; its child maps memory and closes fd 7.
        log.fold(10, &call(10, 100, nr::RT_SIGACTION, [10, 1, 0, 8, 0, 0], 0));
        log.fold(
            10,
            &call(
                11,
                110,
                nr::MMAP,
                [0, 8192, prot_rw, private, 0, 0],
                0x7000_0000,
            ),
        );
        log.fold(10, &call(11, 120, nr::CLOSE, [7, 0, 0, 0, 0, 0], 0));
        // It advises part of it; the root locks all its memory.
        log.fold(
            10,
            &call(11, 130, nr::MADVISE, [0x7000_1000, 4096, 10, 0, 0, 0], 0),
        );
        log.fold(10, &call(10, 140, nr::MLOCKALL, [3, 0, 0, 0, 0, 0], 0));
        // Our own injected queries, inside a window we had the tree stopped.
        log.ours.push((200, 300));
        log.fold(10, &call(12, 250, nr::SETITIMER, [0; 6], 0));
        log.fold(
            10,
            &Event::Fork(Fork {
                origin: at(11, 400),
                child_tid: 13,
                child_tgid: 13,
                clone_flags: None,
                thread: false,
            }),
        );
        assert_eq!(log.children, [13]);
        assert_eq!(log.procs[&11].new_mappings, [(0x7000_0000, 0x7000_2000)]);
        assert_eq!(log.procs[&11].closed, [(7, 7)]);

        let t = log.take_changes(&[10, 11, 12], &[], false);
        assert!(t.of(10).sigactions && !t.of(10).unknown);
        assert!(!t.of(11).sigactions);
        assert_eq!(t.of(11).advice, [(0x7000_1000, 0x7000_2000)]);
        assert!(t.of(10).advice_unknown && !t.of(11).advice_unknown);
        assert!(t.of(11).layout_touched(0x7000_1000, 0x7000_1001));
        assert_eq!(
            t.of(12),
            &Changes::none(),
            "injected calls are not the process's"
        );
        assert!(
            t.of(99).unknown,
            "a process the log did not follow: unknown"
        );
        // Taken: the next checkpoint starts from nothing.
        assert_eq!(log.take_changes(&[10], &[], false).of(10), &Changes::none());
        // Lost records make that process's answers unknown.
        assert!(log.take_changes(&[10, 11], &[11], false).of(11).unknown);

        // A child's exit is not the root's.
        let exit = |tgid| {
            Event::Exit(Exit {
                origin: at(tgid, 500),
                group_dead: Some(true),
            })
        };
        log.fold(10, &exit(11));
        assert!(!log.exited && !log.procs.contains_key(&11));
        log.fold(10, &exit(10));
        assert!(log.exited);
    }

    #[test]
    fn an_exec_makes_everything_of_the_process_asked_again() {
        let mut log = Log::default();
        // Nothing but a close before: a checkpoint would reuse its answers.
        log.fold(10, &call(10, 100, nr::CLOSE, [7, 0, 0, 0, 0, 0], 0));
        log.fold(
            10,
            &Event::Exec(Exec {
                origin: at(10, 200),
                old_tid: 10,
                filename: CapturedString {
                    text: "/bin/sleep".into(),
                    truncated: false,
                    unreadable: false,
                },
            }),
        );
        let t = log.take_changes(&[10, 11], &[], false);
        // Its signal handlers were reset by the exec: the old ones must not
        // be carried into the checkpoint.
        assert_eq!(t.by_pid[&10], Changes::all());
        assert_eq!(t.by_pid[&11], Changes::none());
        assert!(log.procs[&10].exec);
    }
}
