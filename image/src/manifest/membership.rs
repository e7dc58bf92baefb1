//! Format 1.8: what the PROCESS section appends after the `prctl`
//! settings: the process's cgroups (and those of threads in other ones)
//! and its UTS and IPC namespaces.

use crate::codec::{Dec, DecErr, Enc};

use super::PATH_CAP;

/// Most cgroup hierarchies recorded for a process.
const CGROUPS_CAP: usize = 64;
/// Most per-thread cgroup entries.
const THREAD_CGROUPS_CAP: usize = 1 << 16;
/// Longest hostname or domain name (`__NEW_UTS_LEN`).
pub const UTS_NAME_CAP: usize = 64;
/// Longest controllers field of a `/proc/PID/cgroup` line.
const CONTROLLERS_CAP: usize = 1024;

/// The process's place in one cgroup hierarchy, as `/proc/PID/cgroup`
/// shows it (format 1.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cgroup {
    /// The hierarchy's controllers, comma-separated as the kernel lists
    /// them (`cpu,cpuacct`, `name=systemd`); empty for the v2 hierarchy.
    pub controllers: String,
    /// The cgroup's path in that hierarchy (absolute, from its root).
    pub path: String,
}

/// The UTS namespace of a process that has one of its own (format 1.8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uts {
    /// The namespace's inode at the checkpoint: processes with the same
    /// one share a namespace again after a restore.
    pub ns: u64,
    /// `hostname`.
    pub hostname: String,
    /// `domainname` (NIS).
    pub domainname: String,
}

/// The 1.8 tail of the PROCESS section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Its cgroup in every hierarchy (empty: not recorded, older images;
    /// the process then stays in the restorer's).
    pub cgroups: Vec<Cgroup>,
    /// Threads in cgroups other than the process's: (tid, cgroup), one
    /// entry per differing hierarchy.
    pub thread_cgroups: Vec<(i32, Cgroup)>,
    /// Its UTS namespace, when it is not cr-ebpf's.
    pub uts: Option<Uts>,
    /// Its IPC namespace with what it holds, when it is not cr-ebpf's.
    pub ipc: Option<super::IpcNs>,
}

fn encode_cgroup(b: &mut Enc, c: &Cgroup) {
    b.str(&c.controllers);
    b.str(&c.path);
}

fn decode_cgroup(b: &mut Dec<'_>) -> Result<Cgroup, DecErr> {
    let controllers = b.str(CONTROLLERS_CAP, "cgroup controllers")?;
    let path = b.str(PATH_CAP, "cgroup path")?;
    if !path.starts_with('/') {
        return Err(b.err(format!("cgroup path {path:?} is not absolute")));
    }
    Ok(Cgroup { controllers, path })
}

impl Membership {
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u32(self.cgroups.len() as u32);
        for c in &self.cgroups {
            encode_cgroup(b, c);
        }
        b.u32(self.thread_cgroups.len() as u32);
        for (tid, c) in &self.thread_cgroups {
            b.i32(*tid);
            encode_cgroup(b, c);
        }
        match &self.uts {
            None => b.u64(0),
            Some(u) => {
                b.u64(u.ns);
                b.str(&u.hostname);
                b.str(&u.domainname);
            }
        }
        match &self.ipc {
            None => b.u64(0),
            Some(n) => n.encode(b),
        }
    }

    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let n = b.u32()? as usize;
        if n > CGROUPS_CAP {
            return Err(b.err(format!("{n} cgroups (at most {CGROUPS_CAP})")));
        }
        let cgroups = (0..n).map(|_| decode_cgroup(b)).collect::<Result<_, _>>()?;
        let n = b.u32()? as usize;
        if n > THREAD_CGROUPS_CAP {
            return Err(b.err(format!("{n} thread cgroups (at most {THREAD_CGROUPS_CAP})")));
        }
        let thread_cgroups = (0..n)
            .map(|_| Ok((b.i32()?, decode_cgroup(b)?)))
            .collect::<Result<_, DecErr>>()?;
        let ns = b.u64()?;
        let uts = if ns == 0 {
            None
        } else {
            Some(Uts {
                ns,
                hostname: b.str(UTS_NAME_CAP, "hostname")?,
                domainname: b.str(UTS_NAME_CAP, "domain name")?,
            })
        };
        let ns = b.u64()?;
        let ipc = if ns == 0 {
            None
        } else {
            Some(super::IpcNs::decode(b, ns)?)
        };
        Ok(Self {
            cgroups,
            thread_cgroups,
            uts,
            ipc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Membership {
        Membership {
            cgroups: vec![
                Cgroup {
                    controllers: "name=zdtmtst".into(),
                    path: "/sub".into(),
                },
                Cgroup {
                    controllers: String::new(),
                    path: "/".into(),
                },
            ],
            thread_cgroups: vec![(
                7,
                Cgroup {
                    controllers: "name=zdtmtst".into(),
                    path: "/sub/t".into(),
                },
            )],
            uts: Some(Uts {
                ns: 4026531838,
                hostname: "box".into(),
                domainname: "(none)".into(),
            }),
            ipc: Some(super::super::IpcNs {
                ns: 9,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn membership_round_trips_and_bad_values_are_refused() {
        let m = sample();
        let mut e = Enc::default();
        m.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(Membership::decode(&mut d).unwrap(), m);
        assert!(d.done());
        // Without a UTS namespace it ends with a zero.
        let mut none = sample();
        none.uts = None;
        none.ipc = None;
        let mut e = Enc::default();
        none.encode(&mut e);
        assert_eq!(Membership::decode(&mut Dec::new(&e.buf, 0)).unwrap(), none);
        // A relative path and a hostname too long are refused.
        let mut bad = sample();
        bad.cgroups[0].path = "sub".into();
        let mut e = Enc::default();
        bad.encode(&mut e);
        let err = Membership::decode(&mut Dec::new(&e.buf, 0)).unwrap_err();
        assert!(err.what.contains("not absolute"), "{}", err.what);
        let mut bad = sample();
        bad.uts.as_mut().unwrap().hostname = "x".repeat(65);
        let mut e = Enc::default();
        bad.encode(&mut e);
        assert!(Membership::decode(&mut Dec::new(&e.buf, 0)).is_err());
    }
}
