//! What a restore of a tree can rebuild, checked while the tree is still
//! stopped: a tree it could not rebuild exactly is refused before anything
//! is read, and the processes run on.
//!
//! The restorer makes each process's stub from its parent's, parents
//! first (`restore/src/tree.rs`): a process starts in its parent's session
//! and process group, and can then lead a session of its own (`setsid`),
//! lead a group of its own, or join a group of its session that an earlier
//! process of the tree made. A zombie ends as it did: with its exit code,
//! or killed by its signal (without dumping core again).

use std::collections::HashSet;

use cr_ebpf_image::tree::Tree;

use crate::DumpError;

/// Refuses a tree the restorer would not rebuild with the same sessions,
/// process groups and zombie statuses.
pub(crate) fn check(tree: &Tree) -> Result<(), DumpError> {
    let refuse = |pid: i32, what: String| Err(DumpError::NotSupported { pid, what });
    let Some(root) = tree.processes.first() else {
        return Ok(());
    };
    // Groups that exist, with their session, as the stubs are made.
    let mut groups: HashSet<(i32, i32)> = HashSet::from([(root.pgid, root.sid)]);
    for p in &tree.processes {
        if let Some(status) = p.zombie {
            if status & 0x80 != 0 {
                return refuse(
                    p.pid,
                    format!(
                        "a zombie child that dumped core when signal {} killed it: its wait \
                         status cannot be made again without dumping core",
                        status & 0x7f
                    ),
                );
            }
        }
        if p.ppid == 0 {
            continue; // the root: see the session kind of the resources
        }
        let Some(parent) = tree.processes.iter().find(|q| q.pid == p.ppid) else {
            continue; // a broken tree is refused when it is read
        };
        let what = if p.zombie.is_some() {
            "a zombie"
        } else {
            "a process"
        };
        if p.sid != p.pid && p.sid != parent.sid {
            return refuse(
                p.pid,
                format!(
                    "{what} in session {} while its parent {} is in session {}: it would \
                     come back in its parent's",
                    p.sid, parent.pid, parent.sid
                ),
            );
        }
        let orphan = p.pgid != p.pid && p.pgid != parent.pgid && !groups.contains(&(p.pgid, p.sid));
        // A group whose leader is gone is led at restore by a stand-in
        // with the leader's pid, in the parent's session, which makes the
        // process and exits: not when the leader is a later process of
        // the tree, or the group is of another session.
        let standin = p.sid == parent.sid && !tree.processes.iter().any(|q| q.pid == p.pgid);
        if orphan && !standin {
            return refuse(
                p.pid,
                format!(
                    "{what} in process group {}, which a process checkpointed after it \
                     leads, or which is of another session: the group cannot be made \
                     again",
                    p.pgid
                ),
            );
        }
        groups.insert((p.pgid, p.sid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cr_ebpf_image::tree::TreeProcess;

    use super::*;

    fn p(pid: i32, ppid: i32, pgid: i32, sid: i32, zombie: Option<i32>) -> TreeProcess {
        TreeProcess {
            pid,
            ppid,
            pgid,
            sid,
            zombie,
            dir: String::new(),
            shares_files: false,
        }
    }

    fn refused(processes: Vec<TreeProcess>) -> Option<String> {
        check(&Tree { processes }).err().map(|e| e.to_string())
    }

    #[test]
    fn trees_the_restorer_rebuilds_pass() {
        assert_eq!(
            refused(vec![
                p(10, 0, 10, 10, None),
                // Its own group; then one joining it from below.
                p(11, 10, 11, 10, None),
                p(12, 11, 11, 10, None),
                // A sibling joining a group an earlier process made.
                p(13, 10, 11, 10, Some(0)),
                // Its own session.
                p(14, 10, 14, 14, Some(libc::SIGSEGV)),
                p(15, 14, 14, 14, Some(3 << 8)),
            ]),
            None
        );
    }

    #[test]
    fn a_group_whose_leader_exited_is_made_again_unless_its_leader_comes_later() {
        // ZDTM zombie01: the leader 11 exited after making 12 its sibling;
        // a stand-in leads the group at restore.
        assert_eq!(
            refused(vec![p(10, 0, 10, 10, None), p(12, 10, 11, 10, Some(0))]),
            None
        );
        // The leader is a process checkpointed after it: refused.
        let err = refused(vec![
            p(10, 0, 10, 10, None),
            p(12, 10, 13, 10, None),
            p(13, 10, 13, 10, None),
        ])
        .unwrap();
        assert!(err.contains("process group 13"), "{err}");
        assert!(err.contains("in process 12"), "{err}");
    }

    #[test]
    fn a_session_not_the_parents_is_refused() {
        let err = refused(vec![p(10, 0, 10, 10, None), p(11, 10, 5, 5, None)]).unwrap();
        assert!(err.contains("session 5"), "{err}");
    }

    #[test]
    fn a_zombie_that_dumped_core_is_refused() {
        let status = libc::SIGSEGV | 0x80;
        let err = refused(vec![
            p(10, 0, 10, 10, None),
            p(11, 10, 10, 10, Some(status)),
        ])
        .unwrap();
        assert!(err.contains("dumped core"), "{err}");
    }
}
