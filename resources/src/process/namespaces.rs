//! Namespaces. A process is restored into the restorer's namespaces,
//! except for those this file carries (UTS, IPC, time): one that lives in
//! other namespaces of its own (network, pid, mount, user, cgroup) is
//! refused at checkpoint time, naming the kind, while it keeps running.
//!
//! A UTS namespace of its own (not cr-ebpf's, compared by inode) is
//! recorded with its hostname and domain name, read from inside it (a
//! thread of ours joins it with `setns`). At restore ([`enter_uts`]) the
//! first stub of each recorded namespace makes a new one
//! (`unshare(CLONE_NEWUTS)`) and sets the names; every other stub of a
//! tree inherits its parent's or joins the one it belongs to with `setns`
//! through `/proc/PID/ns/uts` of a stub already in it (a process of
//! cr-ebpf's namespace below one in its own joins the restorer's): the
//! processes that shared a namespace share one again.
//!
//! An IPC namespace of its own likewise, with everything it holds
//! (`crate::ipc`: sysctls, System V objects; POSIX message queues are
//! refused): a new one is made by the first stub in it ([`enter_all`]
//! says so) and the engine fills it (`ipc::populate`) before any process
//! attaches its segments.
//!
//! The time namespace: its clocks are what
//! the image records ([`ProcessInfo::monotonic_ns`], `boottime_ns`, read
//! through the process's own offsets), and a restore whose clocks are
//! behind them gives the process a time namespace that goes on from them.

use std::{collections::HashMap, os::fd::AsRawFd as _};

use cr_ebpf_image::{ProcessInfo, Uts};

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// The namespaces a process must share with the restorer, as named in
/// `/proc/PID/ns` (`*_for_children`: what its next children would get).
const SHARED: &[(&str, &str)] = &[
    ("net", "network namespace"),
    ("pid", "pid namespace"),
    ("pid_for_children", "pid namespace for its children"),
    ("mnt", "mount namespace"),
    ("user", "user namespace"),
    ("cgroup", "cgroup namespace"),
];

/// The namespace kinds.
pub struct Namespaces;

/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` offsets (ns) from the text of
/// `/proc/PID/timens_offsets`.
fn parse_offsets(text: &str) -> Option<(i64, i64)> {
    let (mut mono, mut boot) = (0, 0);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (name, s, ns) = (f.next()?, f.next()?, f.next()?);
        let v = s.parse::<i64>().ok()? * 1_000_000_000 + ns.parse::<i64>().ok()?;
        match name {
            "monotonic" | "1" => mono = v,
            "boottime" | "7" => boot = v,
            _ => {}
        }
    }
    Some((mono, boot))
}

impl ProcessKind for Namespaces {
    fn name(&self) -> &'static str {
        "namespaces"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        p.membership.uts = uts_of(pid).map_err(|e| cx.refuse(e))?;
        let theirs = ns_inode(&pid.to_string(), "ipc").map_err(proc_err(pid, "ns/ipc".into()))?;
        let ours = ns_inode("self", "ipc").map_err(proc_err(pid, "/proc/self/ns/ipc".into()))?;
        p.membership.ipc = if theirs == ours {
            None
        } else {
            Some(
                crate::ipc::dump(pid, theirs)
                    .map_err(|e| cx.refuse(format!("in its IPC namespace: {e}")))?,
            )
        };
        for (ns, what) in SHARED {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                .map_err(proc_err(pid, format!("/proc/{pid}/ns/{ns}")))?;
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .map_err(proc_err(pid, format!("/proc/self/ns/{ns}")))?;
            if theirs != ours {
                return Err(cx.refuse(format!(
                    "a {what} of its own ({}; cr-ebpf runs in {}): it would be restored in \
                     cr-ebpf's",
                    theirs.display(),
                    ours.display()
                )));
            }
        }
        // Its clocks as it sees them: the host's plus its time namespace's
        // offsets (zero outside one).
        let path = format!("/proc/{pid}/timens_offsets");
        let text = std::fs::read_to_string(&path).map_err(proc_err(pid, path.clone()))?;
        let (mono, boot) = parse_offsets(&text)
            .ok_or_else(|| cx.refuse(format!("an unreadable {path}: {text:?}")))?;
        p.monotonic_ns = p.monotonic_ns.saturating_add_signed(mono);
        p.boottime_ns = p.boottime_ns.saturating_add_signed(boot);
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // The restorer's namespaces; the time namespace is made before the
        // stub (see `TimeNamespace`).
        Ok(())
    }
}

/// Inode of namespace `ns` of process `pid` (`self` for ours).
fn ns_inode(pid: &str, ns: &str) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/{ns}")).map(|m| m.ino())
}

/// The UTS namespace of process `pid` with its names, when it is not ours.
fn uts_of(pid: i32) -> Result<Option<Uts>, String> {
    let theirs =
        ns_inode(&pid.to_string(), "uts").map_err(|e| format!("/proc/{pid}/ns/uts: {e}"))?;
    let ours = ns_inode("self", "uts").map_err(|e| format!("/proc/self/ns/uts: {e}"))?;
    if theirs == ours {
        return Ok(None);
    }
    let f = std::fs::File::open(format!("/proc/{pid}/ns/uts"))
        .map_err(|e| format!("/proc/{pid}/ns/uts: {e}"))?;
    // A thread of ours joins it for a moment (a UTS namespace is per
    // thread) and reads the names.
    let names = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on our descriptor, in this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWUTS) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: zeroed utsname is valid; uname fills it.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::uname(&mut u) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let text = |f: &[libc::c_char]| {
                let b: Vec<u8> = f
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect();
                String::from_utf8_lossy(&b).into_owned()
            };
            Ok((text(&u.nodename), text(&u.domainname)))
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the reading thread panicked")))
    })
    .map_err(|e| format!("reading the hostname of its UTS namespace: {e}"))?;
    Ok(Some(Uts {
        ns: theirs,
        hostname: names.0,
        domainname: names.1,
    }))
}

/// The namespaces of one process at restore: a recorded namespace's
/// inode, `None` for the restorer's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NsIds {
    pub uts: Option<u64>,
    pub ipc: Option<u64>,
}

impl NsIds {
    /// The namespaces recorded for `p`.
    pub fn of(p: &ProcessInfo) -> Self {
        Self {
            uts: p.membership.uts.as_ref().map(|u| u.ns),
            ipc: p.membership.ipc.as_ref().map(|n| n.ns),
        }
    }
}

/// Moves the stub of process `pid` (through `sys`) into the namespace
/// `want` of kind `flag` (`name` in `/proc/PID/ns`) when it is not the
/// one it inherited: joins the restorer's (`None`) or one made already
/// (in `made`), or makes a new one. Returns whether it made one.
fn enter(
    sys: &dyn Sys,
    pid: i32,
    (flag, name): (i32, &str),
    want: Option<u64>,
    inherited: Option<u64>,
    made: &mut HashMap<u64, i32>,
) -> Result<bool, RestoreError> {
    if want == inherited {
        return Ok(false);
    }
    let join = match want {
        None => Some(std::process::id() as i32),
        Some(ns) => made.get(&ns).copied(),
    };
    let upper = name.to_uppercase();
    if let Some(other) = join {
        let fd = sys.openat(
            &format!("/proc/{other}/ns/{name}"),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )?;
        sys.call(
            &format!("setns(CLONE_NEW{upper})"),
            libc::SYS_setns,
            [fd as u64, flag as u64, 0, 0, 0, 0],
        )?;
        sys.close(fd)?;
        return Ok(false);
    }
    sys.call(
        &format!("unshare(CLONE_NEW{upper})"),
        libc::SYS_unshare,
        [flag as u64, 0, 0, 0, 0, 0],
    )?;
    made.insert(want.expect("a namespace to make"), pid);
    Ok(true)
}

/// Gives the stub of process `p` (through `sys`) its UTS and IPC
/// namespaces, where they are not the ones it inherited (`inherited`):
/// a UTS namespace made gets its names. `made` maps each namespace made
/// so far to a process in it. Returns whether an IPC namespace was made:
/// the caller fills it (`ipc::populate`) before the process uses it.
pub fn enter_all(
    sys: &dyn Sys,
    p: &ProcessInfo,
    inherited: NsIds,
    made: &mut HashMap<u64, i32>,
) -> Result<bool, RestoreError> {
    let want = NsIds::of(p);
    let uts = (libc::CLONE_NEWUTS, "uts");
    if enter(sys, p.pid, uts, want.uts, inherited.uts, made)? {
        let u = p.membership.uts.as_ref().expect("a namespace made");
        for (i, (name, nr, text)) in [
            ("sethostname", libc::SYS_sethostname, &u.hostname),
            ("setdomainname", libc::SYS_setdomainname, &u.domainname),
        ]
        .into_iter()
        .enumerate()
        {
            let at = sys.put(i as u64 * 128, text.as_bytes())?;
            sys.call(name, nr, [at, text.len() as u64, 0, 0, 0, 0])?;
        }
    }
    let ipc = (libc::CLONE_NEWIPC, "ipc");
    enter(sys, p.pid, ipc, want.ipc, inherited.ipc, made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn our_own_namespaces_pass_and_offsets_move_the_clocks() {
        let (p, q) = save_with(
            &Namespaces,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        assert_eq!(q.injected, 0);
        // The test runs in cr-ebpf's namespaces, with no time offsets.
        assert_eq!((p.monotonic_ns, p.boottime_ns), (0, 0));
        assert_eq!(
            parse_offsets("monotonic      3600        0\nboottime   -10   500000000\n"),
            Some((3_600_000_000_000, -9_500_000_000))
        );
        assert_eq!(parse_offsets("1 0 0\n7 2 0\n"), Some((0, 2_000_000_000)));
        assert!(parse_offsets("monotonic x 0\n").is_none());
        assert_eq!(uts_of(std::process::id() as i32), Ok(None));
    }

    #[test]
    fn namespaces_are_made_once_then_joined_and_left() {
        use crate::sys::fake::{Recording, SCRATCH};
        let mut box_a = ProcessInfo {
            pid: 100,
            ..Default::default()
        };
        box_a.membership.uts = Some(Uts {
            ns: 7,
            hostname: "box-a".into(),
            domainname: "dom".into(),
        });
        box_a.membership.ipc = Some(cr_ebpf_image::IpcNs {
            ns: 9,
            ..Default::default()
        });
        let in_a = NsIds::of(&box_a);
        let mut made = HashMap::new();
        // The root process in namespaces 7 and 9: made, named.
        let f = Recording::new();
        assert!(enter_all(&f, &box_a, NsIds::default(), &mut made).unwrap());
        assert_eq!(
            f.names(),
            [
                "unshare(CLONE_NEWUTS)",
                "sethostname",
                "setdomainname",
                "unshare(CLONE_NEWIPC)"
            ]
        );
        assert_eq!(f.calls("sethostname")[0], [SCRATCH, 5, 0, 0, 0, 0]);
        assert_eq!(f.memory("sethostname", 0, SCRATCH, 5), b"box-a");
        assert_eq!(f.memory("setdomainname", 0, SCRATCH + 128, 3), b"dom");
        assert_eq!((made[&7], made[&9]), (100, 100));
        // Its child in the same namespaces inherits them: nothing to do.
        let f = Recording::new();
        let child = ProcessInfo {
            pid: 101,
            ..box_a.clone()
        };
        assert!(!enter_all(&f, &child, in_a, &mut made).unwrap());
        assert!(f.names().is_empty());
        // A child back in cr-ebpf's namespaces joins the restorer's.
        let f = Recording::new();
        let host = ProcessInfo {
            pid: 102,
            ..Default::default()
        };
        assert!(!enter_all(&f, &host, in_a, &mut made).unwrap());
        assert_eq!(
            f.names(),
            [
                "openat",
                "setns(CLONE_NEWUTS)",
                "close",
                "openat",
                "setns(CLONE_NEWIPC)",
                "close"
            ]
        );
        let uts = format!("/proc/{}/ns/uts", std::process::id());
        assert_eq!(f.memory("openat", 0, SCRATCH, uts.len()), uts.as_bytes());
        // Its child in namespaces 7 and 9 joins those made for process 100.
        let f = Recording::new();
        let back = ProcessInfo {
            pid: 103,
            ..box_a.clone()
        };
        assert!(!enter_all(&f, &back, NsIds::default(), &mut made).unwrap());
        assert_eq!(
            f.calls("setns(CLONE_NEWIPC)")[0][1],
            libc::CLONE_NEWIPC as u64
        );
        assert_eq!(
            f.memory("setns(CLONE_NEWIPC)", 0, SCRATCH, 16),
            b"/proc/100/ns/ipc"
        );
        // A failure is an error.
        let f = Recording::new();
        f.fail("unshare(CLONE_NEWUTS)", libc::EPERM);
        let mut other = box_a.clone();
        other.membership.uts.as_mut().unwrap().ns = 8;
        assert!(enter_all(&f, &other, NsIds::default(), &mut made).is_err());
    }
}
