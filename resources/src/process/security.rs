//! The audit session of a process (`/proc/PID/sessionid`). Credentials
//! and seccomp are carried thread by thread (see the creds module); the
//! session id is the kernel's to assign: writing a login uid again at
//! restore gives the process a new one. A process whose login uid is
//! cr-ebpf's (nothing is written) but whose session is another is refused
//! at checkpoint time, naming it, while it keeps running.

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{sys::Sys, RestoreError, SaveError};

/// The audit session.
pub struct Security;

/// The refusal for a session `theirs` under login uid `login`, where
/// cr-ebpf has `ours` and `our_login`.
fn session_refusal(theirs: &str, ours: &str, login: &str, our_login: &str) -> Option<String> {
    (theirs.trim() != ours.trim() && login.trim() == our_login.trim()).then(|| {
        format!(
            "audit session other than cr-ebpf's (sessionid {}, cr-ebpf's {}) under the same \
             login uid: it would be restored with cr-ebpf's",
            theirs.trim(),
            ours.trim()
        )
    })
}

impl ProcessKind for Security {
    fn name(&self) -> &'static str {
        "audit session"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, _p: &mut ProcessInfo) -> Result<(), SaveError> {
        if !std::path::Path::new("/proc/self/sessionid").exists() {
            return Ok(());
        }
        let (t, o) = cx.theirs_and_ours("sessionid")?;
        let (tl, ol) = cx.theirs_and_ours("loginuid")?;
        match session_refusal(&t, &o, &tl, &ol) {
            Some(what) => Err(cx.refuse(what)),
            None => Ok(()),
        }
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
    fn a_session_of_another_login_under_the_same_login_uid_is_named() {
        save_with(
            &Security,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert!(session_refusal("3\n", "3\n", "1000", "1000").is_none());
        let why = session_refusal("4", "3", "1000", "1000").unwrap();
        assert!(why.contains("sessionid 4, cr-ebpf's 3"), "{why}");
        // Another login uid is written again, which makes a new session.
        assert!(session_refusal("4", "3", "1000", "4294967295").is_none());
    }
}
