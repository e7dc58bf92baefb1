//! What `/proc` shows of the process itself: working directory, root
//! directory, umask, execution domain, resource limits and credentials.
//! Restored with `chdir`, `umask`, `personality` and `prlimit64`, and
//! `chroot` once its descriptors are open ([`enter_root`]: they are opened
//! by paths of cr-ebpf's root); credentials are checked against the
//! restorer's before anything starts (not set).

use cr_ebpf_image::ProcessInfo;

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, proc, sys::Sys, RestoreError, SaveError};

/// `CAP_SYS_RESOURCE`.
const CAP_SYS_RESOURCE: u32 = 24;

/// The `RLIMIT_*` names, by number.
const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// cwd, umask, personality, rlimits, credentials.
pub struct Settings;

impl ProcessKind for Settings {
    fn name(&self) -> &'static str {
        "working directory, umask, personality, limits"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let status = format!("/proc/{pid}/status");
        p.creds = proc::creds(pid).map_err(proc_err(pid, status.clone()))?;
        p.umask = proc::umask(pid).map_err(proc_err(pid, status))?;
        p.personality =
            proc::personality(pid).map_err(proc_err(pid, format!("/proc/{pid}/personality")))?;
        p.cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map_err(proc_err(pid, format!("/proc/{pid}/cwd")))?
            .display()
            .to_string();
        if p.cwd.ends_with(" (deleted)") {
            // A removed directory is stored as a deleted file and entered
            // again from it (`crate::ghost::enter_cwd`); anything else is
            // refused.
            let why = match std::fs::metadata(format!("/proc/{pid}/cwd")) {
                _ if p.cwd.starts_with("/proc/") => {
                    Some(format!("{} (of a process that is gone)", p.cwd))
                }
                Err(e) => Some(format!("{} ({e})", p.cwd)),
                Ok(meta) if !meta.is_dir() => Some(format!("{} (not a directory)", p.cwd)),
                Ok(meta) => crate::ghost::refusal(&p.cwd, &meta),
            };
            if let Some(why) = why {
                return Err(cx.refuse(format!(
                    "a working directory that was deleted: {why}: it cannot be entered again"
                )));
            }
        }
        p.rlimits = proc::rlimits(pid).map_err(proc_err(pid, "prlimit64".into()))?;
        // A restore sets them from cr-ebpf's own: a hard limit above ours
        // takes CAP_SYS_RESOURCE to raise.
        if !proc::have_cap(CAP_SYS_RESOURCE) {
            let ours = proc::rlimits(std::process::id() as i32)
                .map_err(proc_err(pid, "prlimit64 (cr-ebpf's own)".into()))?;
            if let Some((res, theirs, mine)) = higher_hard_limit(&p.rlimits, &ours) {
                let name = RLIMIT_NAMES.get(res).copied().unwrap_or("?");
                return Err(cx.refuse(format!(
                    "resource limit {res} ({name}) with a hard limit of {} above cr-ebpf's own ({}): \
                     setting it again at restore takes CAP_SYS_RESOURCE, which cr-ebpf lacks",
                    theirs, mine
                )));
            }
        }
        p.root = root(cx)?;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        let mut cwd = p.cwd.clone().into_bytes();
        cwd.push(0);
        // A removed one is entered with the descriptors (`ghost::enter_cwd`).
        let deleted = crate::ghost::deleted_path(&p.cwd).is_some();
        if cwd.len() as u64 <= crate::sys::PAGE && !deleted {
            let at = sys.put(0, &cwd)?;
            sys.call("chdir", libc::SYS_chdir, [at, 0, 0, 0, 0, 0])
                .map_err(|e| RestoreError::File {
                    path: p.cwd.clone(),
                    what: format!("(the working directory) cannot be entered: {e}"),
                })?;
        }
        sys.call("umask", libc::SYS_umask, [p.umask as u64, 0, 0, 0, 0, 0])?;
        sys.call(
            "personality",
            libc::SYS_personality,
            [p.personality as u64, 0, 0, 0, 0, 0],
        )?;
        for (res, &(cur, max)) in p.rlimits.iter().enumerate() {
            let mut lim = cur.to_le_bytes().to_vec();
            lim.extend_from_slice(&max.to_le_bytes());
            let at = sys.put(0, &lim)?;
            sys.call(
                "prlimit64",
                libc::SYS_prlimit64,
                [0, res as u64, at, 0, 0, 0],
            )
            .map_err(|e| {
                RestoreError::NotSupported(format!(
                    "resource limit {res} of the image ({cur}, {max}) cannot be set here \
                     (raising a hard limit needs CAP_SYS_RESOURCE): {e}"
                ))
            })?;
        }
        Ok(())
    }
}

/// The first resource whose hard limit in `theirs` is above `ours`:
/// (resource, theirs, ours).
fn higher_hard_limit(theirs: &[(u64, u64)], ours: &[(u64, u64)]) -> Option<(usize, u64, u64)> {
    theirs
        .iter()
        .zip(ours)
        .enumerate()
        .find(|(_, (t, o))| t.1 > o.1)
        .map(|(res, (t, o))| (res, t.1, o.1))
}

/// `CAP_SYS_CHROOT`.
const CAP_SYS_CHROOT: u32 = 18;

/// The root directory of the process, as cr-ebpf's root sees it; empty when
/// it is cr-ebpf's.
fn root(cx: &SaveCx<'_>) -> Result<String, SaveError> {
    let pid = cx.pid;
    let link = format!("/proc/{pid}/root");
    let theirs = std::fs::read_link(&link).map_err(proc_err(pid, link.clone()))?;
    let ours = std::fs::read_link("/proc/self/root").map_err(proc_err(pid, link.clone()))?;
    if theirs == ours {
        return Ok(String::new());
    }
    let text = theirs.display().to_string();
    let same_dir = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt as _;
        a.dev() == b.dev() && a.ino() == b.ino()
    };
    // The path must lead to that very directory (not removed, not outside
    // cr-ebpf's root, where a path cannot name it).
    let reachable = match (std::fs::metadata(&link), std::fs::metadata(&theirs)) {
        (Ok(a), Ok(b)) => same_dir(&a, &b),
        _ => false,
    };
    if !text.starts_with('/') || text.ends_with(" (deleted)") || !reachable {
        return Err(cx.refuse(format!(
            "a root directory that cr-ebpf cannot name by a path ({text}): it could not be \
             entered again"
        )));
    }
    if !proc::have_cap(CAP_SYS_CHROOT) {
        return Err(cx.refuse(format!(
            "a root directory other than cr-ebpf's ({text}): entering it again needs \
             CAP_SYS_CHROOT, which cr-ebpf lacks"
        )));
    }
    Ok(text)
}

/// Enters the process's own root directory (`chroot`), last of what is
/// opened by path: its descriptors and mappings are made by paths of
/// cr-ebpf's root. Its working directory stays where it is, as `chroot`
/// leaves it.
pub fn enter_root(sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
    if p.root.is_empty() {
        return Ok(());
    }
    let mut path = p.root.clone().into_bytes();
    path.push(0);
    let at = sys.put(0, &path)?;
    sys.call("chroot", libc::SYS_chroot, [at, 0, 0, 0, 0, 0])
        .map_err(|e| RestoreError::File {
            path: p.root.clone(),
            what: format!("(the root directory) cannot be entered: {e}"),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::Recording;

    #[test]
    fn directory_mask_domain_and_limits_are_set_in_order() {
        let p = ProcessInfo {
            cwd: "/var/lib/x".into(),
            umask: 0o027,
            personality: 0x0040_0000,
            rlimits: vec![(1, 2), (u64::MAX, u64::MAX)],
            ..ProcessInfo::default()
        };
        let rec = Recording::new();
        Settings.restore(&rec, &p).unwrap();
        assert_eq!(
            rec.names(),
            ["chdir", "umask", "personality", "prlimit64", "prlimit64"]
        );
        assert_eq!(
            rec.memory("chdir", 0, rec.calls("chdir")[0][0], 11),
            b"/var/lib/x\0"
        );
        assert_eq!(rec.calls("umask")[0][0], 0o027);
        let lim = rec.calls("prlimit64")[1];
        assert_eq!(lim[1], 1);
        assert_eq!(rec.memory("prlimit64", 1, lim[2], 16), [0xff; 16]);
        // A limit this machine refuses is named.
        let rec = Recording::new();
        rec.fail("prlimit64", libc::EPERM);
        let err = Settings.restore(&rec, &p).unwrap_err();
        assert!(err.to_string().contains("resource limit 0"), "{err}");
    }

    #[test]
    fn a_hard_limit_above_ours_is_found() {
        let ours = [(10, 20), (5, u64::MAX), (1, 1)];
        assert_eq!(higher_hard_limit(&[(10, 20), (9, 9), (1, 1)], &ours), None);
        assert_eq!(
            higher_hard_limit(&[(10, 20), (9, 9), (1, 2)], &ours),
            Some((2, 2, 1))
        );
        assert_eq!(
            higher_hard_limit(&[(1, u64::MAX), (9, 9), (1, 2)], &ours),
            Some((0, u64::MAX, 20))
        );
    }

    #[test]
    fn what_proc_shows_of_the_process_is_saved() {
        use crate::{process::testing::save_with, sys::ask::Scripted};
        let (p, q) = save_with(
            &Settings,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert_eq!(q.injected, 0, "nothing is injected for these");
        assert_eq!(
            p.cwd,
            std::env::current_dir().unwrap().display().to_string()
        );
        assert_eq!(p.rlimits.len(), crate::proc::RLIMITS as usize);
        assert!(p.umask <= 0o777);
        assert_eq!(p.root, "", "our own root is not recorded");
    }

    #[test]
    fn a_root_directory_of_its_own_is_entered_last() {
        let rec = Recording::new();
        enter_root(&rec, &ProcessInfo::default()).unwrap();
        assert!(rec.names().is_empty(), "cr-ebpf's root: nothing to do");
        let p = ProcessInfo {
            root: "/srv/jail".into(),
            ..ProcessInfo::default()
        };
        enter_root(&rec, &p).unwrap();
        assert_eq!(rec.names(), ["chroot"]);
        assert_eq!(
            rec.memory("chroot", 0, rec.calls("chroot")[0][0], 10),
            b"/srv/jail\0"
        );
        let rec = Recording::new();
        rec.fail("chroot", libc::ENOENT);
        let err = enter_root(&rec, &p).unwrap_err();
        assert!(err.to_string().contains("/srv/jail"), "{err}");
    }
}
