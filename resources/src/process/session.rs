//! Session and process group. A process that leads its session (or its
//! process group) leads it again after a restore: the stub calls `setsid`
//! (or `setpgid`). One whose session or group is led by a process outside
//! what is checkpointed together would come back in the restorer's, so it
//! is refused at checkpoint time, naming the leader, while it keeps running
//! (start it with `setsid`, or checkpoint its leader's tree). Within a tree
//! the stubs join their sessions and groups as they are made
//! (`restore/src/tree.rs`); this kind then finds them in place.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, proc, sys::Sys, RestoreError, SaveError};

/// Session and process group.
pub struct Session;

impl ProcessKind for Session {
    fn name(&self) -> &'static str {
        "session and process group"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let st = proc::stat(pid).map_err(proc_err(pid, format!("/proc/{pid}/stat")))?;
        for (id, what) in [(st.sid, "session"), (st.pgid, "process group")] {
            if id != pid && !cx.together.contains(&id) && !cx.shell_job {
                return Err(cx.refuse(format!(
                    "a {what} led by process {id}, which is not checkpointed with it: it \
                     would be restored in cr-ebpf's {what}; start it with setsid, \
                     checkpoint its leader's tree, or take it as a shell job (`dump \
                     --shell-job`)"
                )));
            }
        }
        p.sid = st.sid;
        p.pgid = st.pgid;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        if p.sid == 0 {
            return Ok(()); // not recorded (an image older than format 1.5)
        }
        let sid = sys.call("getsid", libc::SYS_getsid, [0; 6])?;
        if p.sid == p.pid && sid != p.pid as i64 {
            sys.call("setsid", libc::SYS_setsid, [0; 6])?;
        }
        let pgid = sys.call("getpgid", libc::SYS_getpgid, [0; 6])?;
        // A shell job's group led outside becomes the restorer's.
        let shell_job = p.terminal.is_some_and(|t| t.shell_job);
        if pgid != p.pgid as i64 && !(shell_job && p.pgid != p.pid) {
            let target = if p.pgid == p.pid { 0 } else { p.pgid as u64 };
            sys.call("setpgid", libc::SYS_setpgid, [0, target, 0, 0, 0, 0])
                .map_err(|e| {
                    RestoreError::NotSupported(format!(
                        "process {} joining its process group {}: {e}",
                        p.pid, p.pgid
                    ))
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn a_leader_leads_again_and_one_in_place_is_left_alone() {
        let leader = ProcessInfo {
            pid: 300,
            sid: 300,
            pgid: 300,
            ..ProcessInfo::default()
        };
        // The stub starts in the restorer's session and group.
        let rec = Recording::new();
        rec.returns("getsid", 7);
        rec.returns("getpgid", 7);
        Session.restore(&rec, &leader).unwrap();
        assert_eq!(rec.names(), ["getsid", "setsid", "getpgid", "setpgid"]);
        assert_eq!(rec.calls("setpgid")[0][1], 0);
        // Already in place (a tree's stub): nothing changes.
        let rec = Recording::new();
        rec.returns("getsid", 300);
        rec.returns("getpgid", 300);
        Session.restore(&rec, &leader).unwrap();
        assert_eq!(rec.names(), ["getsid", "getpgid"]);
        // Not recorded: nothing asked.
        let rec = Recording::new();
        Session.restore(&rec, &ProcessInfo::default()).unwrap();
        assert!(rec.names().is_empty());
    }

    #[test]
    fn a_session_led_from_outside_is_refused() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        // The test runs in the harness's session, led by another process.
        let me = std::process::id() as i32;
        let st = proc::stat(me).unwrap();
        if st.sid == me {
            return; // run as a session leader: nothing to refuse
        }
        let err = crate::process::testing::try_save_with(&Session, &Scripted::default(), &[me])
            .unwrap_err();
        assert!(err.to_string().contains("led by process"), "{err}");
        // Checkpointed together with its leaders: recorded.
        let (p, _) = save_with(
            &Session,
            &Scripted::default(),
            None,
            &crate::process::Changes::all(),
        );
        assert_eq!((p.sid, p.pgid), (st.sid, st.pgid));
    }
}
