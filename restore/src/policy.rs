//! Who may restore an image: root restores any recorded credentials
//! exactly; another user only images of its own uid. Nobody's process
//! comes back with more than it had.

use cr_ebpf_image::{Manifest, ThreadCreds};

use crate::RestoreError;

/// Who may restore the image, and whether its credentials can be set: root
/// restores any recorded ones exactly; another user only images of its own
/// uid. An image recording only uids and gids (before format 1.9) must have
/// ours.
pub(crate) fn credentials(
    m: &Manifest,
    ours: [u32; 8],
    me: &ThreadCreds,
    can_suspend_seccomp: bool,
) -> Result<(), RestoreError> {
    let Some(first) = m.threads.first().and_then(|t| t.creds.as_ref()) else {
        if m.process.creds != ours {
            return Err(RestoreError::Credentials {
                image: m.process.creds,
                ours,
            });
        }
        return Ok(());
    };
    let recorded: Vec<u32> = first.uids.iter().chain(&first.gids).copied().collect();
    if recorded != m.process.creds || m.threads.iter().any(|t| t.creds.is_none()) {
        return Err(RestoreError::NotSupported(format!(
            "an image whose credentials disagree (process {:?}, main thread {recorded:?}, or \
             a thread without any): it is damaged or was edited",
            m.process.creds
        )));
    }
    if me.seccomp_mode != 0 {
        return Err(RestoreError::NotSupported(
            "cr-ebpf itself runs under seccomp: the restored process would inherit its \
             filters"
                .into(),
        ));
    }
    for t in &m.threads {
        let c = t.creds.as_ref().expect("checked above");
        if me.uids[1] != 0 && c.uids.iter().any(|&u| u != me.uids[0]) {
            return Err(RestoreError::OtherUser {
                tid: t.tid,
                image: c.uids,
                ours: me.uids[0],
            });
        }
        if c.seccomp_mode != 0 && !can_suspend_seccomp {
            return Err(RestoreError::NotSupported(format!(
                "seccomp {} of thread {}: cr-ebpf needs CAP_SYS_ADMIN to set them again \
                 (its own calls in the process must not be filtered meanwhile)",
                if c.seccomp_mode == 1 {
                    "strict mode"
                } else {
                    "filters"
                },
                t.tid
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cr_ebpf_image::ThreadInfo;

    fn image(uids: [u32; 4], mode: u32) -> Manifest {
        let mut m = Manifest::default();
        m.process.creds = [uids[0], uids[1], uids[2], uids[3], 5, 5, 5, 5];
        m.threads = vec![ThreadInfo {
            tid: 9,
            creds: Some(ThreadCreds {
                uids,
                gids: [5; 4],
                seccomp_mode: mode,
                seccomp_filters: if mode == 2 {
                    vec![cr_ebpf_image::SeccompFilter {
                        flags: 0,
                        prog: vec![0; 8],
                    }]
                } else {
                    Vec::new()
                },
                ..ThreadCreds::default()
            }),
            ..ThreadInfo::default()
        }];
        m
    }

    fn user(uid: u32) -> ThreadCreds {
        ThreadCreds {
            uids: [uid; 4],
            gids: [uid; 4],
            ..ThreadCreds::default()
        }
    }

    #[test]
    fn root_restores_anyone_and_a_user_only_itself() {
        let other = image([1000, 1000, 1000, 1000], 0);
        assert!(credentials(&other, [0; 8], &user(0), true).is_ok());
        let err = credentials(&other, [3000; 8], &user(3000), false).unwrap_err();
        assert!(
            matches!(err, RestoreError::OtherUser { tid: 9, .. }),
            "{err}"
        );
        // A user's own image, even with a saved uid of root, is refused:
        // it would come back as root.
        let setuid = image([1000, 1000, 0, 1000], 0);
        assert!(credentials(&setuid, [1000; 8], &user(1000), false).is_err());
        let own = image([1000; 4], 0);
        assert!(credentials(&own, [1000; 8], &user(1000), false).is_ok());
        // Filters need a restorer that can suspend them.
        let filtered = image([1000; 4], 2);
        assert!(credentials(&filtered, [1000; 8], &user(1000), false).is_err());
        assert!(credentials(&filtered, [0; 8], &user(0), true).is_ok());
        // A restorer under seccomp would pass its filters on.
        let confined = ThreadCreds {
            seccomp_mode: 2,
            ..user(0)
        };
        assert!(credentials(&own, [0; 8], &confined, true).is_err());
    }

    #[test]
    fn edited_or_older_credentials_are_refused() {
        let mut edited = image([1000; 4], 0);
        edited.process.creds = [0; 8];
        let err = credentials(&edited, [0; 8], &user(0), true).unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
        let mut older = image([1000; 4], 0);
        older.threads[0].creds = None;
        let err = credentials(&older, [0; 8], &user(0), true).unwrap_err();
        assert!(matches!(err, RestoreError::Credentials { .. }), "{err}");
        older.process.creds = [0; 8];
        assert!(credentials(&older, [0; 8], &user(0), true).is_ok());
    }
}
