//! Section PROCESS (exactly one): the process-wide state.

use super::{decode_siginfos, encode_siginfos, PATH_CAP};
use crate::codec::{Dec, DecErr, Enc};

/// Largest auxiliary vector stored.
const AUXV_CAP: usize = 4096;
/// Most resource limits, and most signal dispositions.
const RLIMITS_CAP: usize = 64;
const SIGACTIONS_CAP: usize = 64;
/// Longest boot id.
const BOOT_ID_CAP: usize = 255;

/// The process-wide part of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Process id at checkpoint time.
    pub pid: i32,
    /// Path of the executable.
    pub exe: String,
    /// `start_code, end_code, start_data, end_data, start_brk, brk,
    /// start_stack, arg_start, arg_end, env_start, env_end`.
    pub mm: [u64; 11],
    /// The auxiliary vector (`/proc/PID/auxv`).
    pub auxv: Vec<u8>,
    /// Wall-clock time of the checkpoint (Unix nanoseconds).
    pub taken_unix_ns: u64,
    /// How long the process was frozen (first thread stopped to last resumed
    /// or killed), in nanoseconds.
    pub freeze_ns: u64,
    /// File mode creation mask.
    pub umask: u32,
    /// Execution domain (`personality(0xffffffff)`).
    pub personality: u32,
    /// Working directory.
    pub cwd: String,
    /// Resource limits, `RLIMIT_*` order: (soft, hard); `u64::MAX` is infinity.
    pub rlimits: Vec<(u64, u64)>,
    /// Signal dispositions that are not the default.
    pub sigactions: Vec<SigAction>,
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`: (interval, remaining)
    /// in microseconds.
    pub itimers: [(u64, u64); 3],
    /// Signals pending for the whole process, as 128-byte `siginfo_t`s.
    pub pending: Vec<Vec<u8>>,
    /// Credentials: real, effective, saved, filesystem uid, then the same gids.
    pub creds: [u32; 8],
    /// POSIX timers (`timer_create`), by id (format 1.2, sections POSIX_TIMER).
    pub posix_timers: Vec<super::PosixTimer>,
    /// The cgroup directories recorded with it (format 1.9, sections
    /// CGROUP_DIR): those of its cgroups below each hierarchy's root, their
    /// parents and everything below them.
    pub cgroup_dirs: Vec<super::CgroupDir>,
    /// Format 1.2: `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` (ns) when the
    /// process was frozen, and the kernel's boot id then: a restore after
    /// a reboot puts the process in a time namespace whose clocks go on
    /// from these instead of going backwards. Zero and empty in older images.
    pub monotonic_ns: u64,
    /// `CLOCK_BOOTTIME` when the process was frozen (format 1.2; see
    /// `monotonic_ns`).
    pub boottime_ns: u64,
    /// The kernel's boot id when the process was frozen (format 1.2).
    pub boot_id: String,
    /// Format 1.5: its session and process group (0: not recorded, older
    /// images). A restore makes the process lead them again when it led
    /// them.
    pub sid: i32,
    /// Its process group (format 1.5; see `sid`).
    pub pgid: i32,
    /// Format 1.7: the process's own `prctl` settings (parent-death
    /// signal, dumpable, THP disabled) and whether it was stopped by job
    /// control. `None` in older images (nothing is set at restore).
    pub prctl: Option<Prctl>,
    /// Format 1.8: its controlling terminal and whether it was checkpointed
    /// as a shell job. `None` in older images (which refused terminals).
    pub terminal: Option<Terminal>,
    /// Format 1.8: its cgroups and UTS namespace (written after the
    /// `prctl` settings, so only with them). Default in older images.
    pub membership: super::Membership,
    /// Format 1.8 (after the membership): a child subreaper
    /// (`PR_SET_CHILD_SUBREAPER`), set again at restore.
    pub child_subreaper: bool,
    /// Format 1.8 (after the subreaper flag): `/proc/PID/oom_score_adj`,
    /// written again at restore.
    pub oom_score_adj: i32,
    /// Format 1.9 (after the OOM score adjustment): the process's root
    /// directory (`chroot`) as cr-ebpf's root sees it; empty: the same as
    /// cr-ebpf's.
    pub root: String,
    /// Format 1.9 (after the root directory): the membarrier commands the
    /// process registered for, as `MEMBARRIER_CMD_GET_REGISTRATIONS` gives
    /// them (a mask of [`MEMBARRIER_REGISTRATIONS`]), registered again.
    pub membarrier: u32,
}

/// First minor whose PROCESS ends with the root directory and the
/// membarrier registrations.
const ROOT_SINCE: u16 = 9;
/// The `MEMBARRIER_CMD_REGISTER_*` commands: global expedited, private
/// expedited, private expedited with core serialization, private expedited
/// for rseq.
pub const MEMBARRIER_REGISTRATIONS: u32 = (1 << 2) | (1 << 4) | (1 << 6) | (1 << 8);

/// A process's controlling terminal (format 1.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ctty {
    /// None.
    #[default]
    None,
    /// The slave of pseudo-terminal pair `N` (`/dev/pts/N`), whose master
    /// is checkpointed with it.
    Pty(u32),
    /// A terminal outside the checkpoint (a shell job's): the restorer's
    /// at restore.
    Outside,
}

/// The terminal side of a process (format 1.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Terminal {
    /// Its controlling terminal.
    pub ctty: Ctty,
    /// Checkpointed with `--shell-job`: a session (and a process group,
    /// unless it led it) led outside the checkpoint are the restorer's
    /// at restore.
    pub shell_job: bool,
    /// The foreground process group of its controlling terminal (`tpgid`
    /// of `/proc/PID/stat`) when that is a pair of the checkpoint; 0
    /// otherwise.
    pub foreground: i32,
}

/// The `prctl` settings of a process and its job-control stop (format 1.7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prctl {
    /// `PR_GET_PDEATHSIG`: the signal it gets when its parent dies (0: none).
    pub pdeath_signal: u32,
    /// `PR_GET_DUMPABLE` (0, 1 or 2).
    pub dumpable: u32,
    /// `PR_GET_THP_DISABLE`: transparent huge pages disabled.
    pub thp_disabled: bool,
    /// The signal that stopped it by job control (`SIGSTOP`, `SIGTSTP`,
    /// `SIGTTIN`, `SIGTTOU`) when it was stopped; 0 when it was running.
    pub job_stop: u32,
}

/// One signal disposition, as the kernel's `struct sigaction` for `rt_sigaction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SigAction {
    /// Signal number.
    pub signo: u32,
    /// Handler address, or 0 `SIG_DFL`, 1 `SIG_IGN`.
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

impl ProcessInfo {
    /// The PROCESS section's body (the POSIX timers are sections of their own).
    pub(super) fn encode(&self, b: &mut Enc) {
        b.i32(self.pid);
        b.str(&self.exe);
        for v in self.mm {
            b.u64(v);
        }
        b.bytes(&self.auxv);
        b.u64(self.taken_unix_ns);
        b.u64(self.freeze_ns);
        b.u32(self.umask);
        b.u32(self.personality);
        b.str(&self.cwd);
        b.u32(self.rlimits.len() as u32);
        for (cur, max) in &self.rlimits {
            b.u64(*cur);
            b.u64(*max);
        }
        b.u32(self.sigactions.len() as u32);
        for a in &self.sigactions {
            b.u32(a.signo);
            b.u32(0);
            b.u64(a.handler);
            b.u64(a.flags);
            b.u64(a.restorer);
            b.u64(a.mask);
        }
        for (interval, value) in self.itimers {
            b.u64(interval);
            b.u64(value);
        }
        encode_siginfos(b, &self.pending);
        for c in self.creds {
            b.u32(c);
        }
        b.u64(self.monotonic_ns);
        b.u64(self.boottime_ns);
        b.str(&self.boot_id);
        b.i32(self.sid);
        b.i32(self.pgid);
        if let Some(c) = self.prctl {
            b.u32(c.pdeath_signal);
            b.u32(c.dumpable);
            b.u32(c.thp_disabled as u32);
            b.u32(c.job_stop);
            // Format 1.8 appends the terminal, then the cgroups and the
            // namespaces (after the 1.7 fields only).
            let t = self.terminal.unwrap_or_default();
            let (kind, index) = match t.ctty {
                Ctty::None => (0u16, 0u32),
                Ctty::Pty(n) => (1, n),
                Ctty::Outside => (2, 0),
            };
            b.u16(kind);
            b.u16(t.shell_job as u16);
            b.u32(index);
            b.i32(t.foreground);
            self.membership.encode(b);
            b.u32(u32::from(self.child_subreaper));
            b.i32(self.oom_score_adj);
            b.str(&self.root);
            b.u32(self.membarrier);
        }
    }

    /// Reads a PROCESS section's body of format 1.`minor`; `posix_timers`
    /// is left empty.
    pub(super) fn decode(b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        let pid = b.i32()?;
        let exe = b.str(PATH_CAP, "exe path")?;
        let mut mm = [0u64; 11];
        for v in &mut mm {
            *v = b.u64()?;
        }
        let auxv = b.bytes(AUXV_CAP, "auxv")?.to_vec();
        let taken_unix_ns = b.u64()?;
        let freeze_ns = b.u64()?;
        let umask = b.u32()?;
        let personality = b.u32()?;
        let cwd = b.str(PATH_CAP, "working directory")?;
        let n = b.u32()? as usize;
        if n > RLIMITS_CAP {
            return Err(b.err(format!("{n} resource limits (at most {RLIMITS_CAP})")));
        }
        let mut rlimits = Vec::with_capacity(n);
        for _ in 0..n {
            rlimits.push((b.u64()?, b.u64()?));
        }
        let sigactions = decode_sigactions(b)?;
        let mut itimers = [(0, 0); 3];
        for t in &mut itimers {
            *t = (b.u64()?, b.u64()?);
        }
        let pending = decode_siginfos(b)?;
        let mut creds = [0u32; 8];
        for c in &mut creds {
            *c = b.u32()?;
        }
        // Format 1.2 appends the clocks; 1.0/1.1 end here.
        let (monotonic_ns, boottime_ns, boot_id) = if b.done() {
            (0, 0, String::new())
        } else {
            (b.u64()?, b.u64()?, b.str(BOOT_ID_CAP, "boot id")?)
        };
        // Format 1.5 appends the session and process group.
        let (sid, pgid) = if b.done() {
            (0, 0)
        } else {
            (b.i32()?, b.i32()?)
        };
        // Format 1.7 appends the prctl settings and the job-control stop.
        let prctl = if b.done() {
            None
        } else {
            let c = Prctl {
                pdeath_signal: b.u32()?,
                dumpable: b.u32()?,
                thp_disabled: b.u32()? != 0,
                job_stop: b.u32()?,
            };
            if c.pdeath_signal > 64 || c.job_stop > 64 || c.dumpable > 2 {
                return Err(b.err(format!(
                    "prctl settings out of range (parent-death signal {}, dumpable {}, \
                     stop signal {})",
                    c.pdeath_signal, c.dumpable, c.job_stop
                )));
            }
            Some(c)
        };
        // Format 1.8 appends the terminal, then the cgroups and namespaces.
        let terminal = if prctl.is_none() || b.done() {
            None
        } else {
            let (kind, shell_job, index) = (b.u16()?, b.u16()?, b.u32()?);
            let ctty = match kind {
                0 => Ctty::None,
                1 => Ctty::Pty(index),
                2 => Ctty::Outside,
                other => return Err(b.err(format!("controlling terminal kind {other}"))),
            };
            if shell_job > 1 {
                return Err(b.err(format!("shell job marker {shell_job}")));
            }
            Some(Terminal {
                ctty,
                shell_job: shell_job == 1,
                foreground: b.i32()?,
            })
        };
        let membership = if terminal.is_none() || b.done() {
            super::Membership::default()
        } else {
            super::Membership::decode(b)?
        };
        let child_subreaper = if terminal.is_none() || b.done() {
            false
        } else {
            match b.u32()? {
                0 => false,
                1 => true,
                other => return Err(b.err(format!("child subreaper flag {other} (0 or 1)"))),
            }
        };
        let oom_score_adj = if terminal.is_none() || b.done() {
            0
        } else {
            let v = b.i32()?;
            if !(-1000..=1000).contains(&v) {
                return Err(b.err(format!("OOM score adjustment {v} (-1000 to 1000)")));
            }
            v
        };
        let (root, membarrier) = if terminal.is_none() || minor < ROOT_SINCE || b.done() {
            (String::new(), 0)
        } else {
            decode_root_and_membarrier(b)?
        };
        Ok(Self {
            pid,
            exe,
            mm,
            auxv,
            taken_unix_ns,
            freeze_ns,
            umask,
            personality,
            cwd,
            rlimits,
            sigactions,
            itimers,
            pending,
            creds,
            posix_timers: Vec::new(),
            cgroup_dirs: Vec::new(),
            monotonic_ns,
            boottime_ns,
            boot_id,
            sid,
            pgid,
            prctl,
            terminal,
            membership,
            child_subreaper,
            oom_score_adj,
            root,
            membarrier,
        })
    }
}

/// Format 1.9's end of PROCESS: the root directory and the membarrier
/// registrations.
fn decode_root_and_membarrier(b: &mut Dec<'_>) -> Result<(String, u32), DecErr> {
    let root = b.str(PATH_CAP, "root directory")?;
    if !root.is_empty() && !root.starts_with('/') {
        return Err(b.err(format!("root directory {root:?} (an absolute path)")));
    }
    let m = b.u32()?;
    if m & !MEMBARRIER_REGISTRATIONS != 0 {
        return Err(b.err(format!("membarrier registrations {m:#x}")));
    }
    Ok((root, m))
}

fn decode_sigactions(b: &mut Dec<'_>) -> Result<Vec<SigAction>, DecErr> {
    let n = b.u32()? as usize;
    if n > SIGACTIONS_CAP {
        return Err(b.err(format!(
            "{n} signal dispositions (at most {SIGACTIONS_CAP})"
        )));
    }
    let mut sigactions = Vec::with_capacity(n);
    for _ in 0..n {
        let signo = b.u32()?;
        let _pad = b.u32()?;
        if !(1..=64).contains(&signo) {
            return Err(b.err(format!("signal number {signo}")));
        }
        sigactions.push(SigAction {
            signo,
            handler: b.u64()?,
            flags: b.u64()?,
            restorer: b.u64()?,
            mask: b.u64()?,
        });
    }
    Ok(sigactions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProcessInfo {
        ProcessInfo {
            pid: 42,
            exe: "/usr/bin/thing".into(),
            mm: core::array::from_fn(|i| i as u64 * 3),
            auxv: vec![7; 64],
            taken_unix_ns: 123,
            freeze_ns: 456,
            umask: 0o022,
            personality: 8,
            cwd: "/srv".into(),
            rlimits: vec![(8 << 20, u64::MAX); 16],
            sigactions: vec![SigAction {
                signo: 10,
                handler: 0x5555_0000_1000,
                flags: 0x0400_0000,
                restorer: 0x7f00_0000_2000,
                mask: 1 << 9,
            }],
            itimers: [(0, 0), (1000, 500), (7, 8)],
            pending: vec![vec![3; 128]],
            creds: [1, 2, 3, 4, 5, 6, 7, 8],
            posix_timers: Vec::new(),
            cgroup_dirs: Vec::new(),
            monotonic_ns: 11,
            boottime_ns: 12,
            boot_id: "boot".into(),
            sid: 42,
            pgid: 40,
            prctl: Some(Prctl {
                pdeath_signal: 10,
                dumpable: 0,
                thp_disabled: true,
                job_stop: 19,
            }),
            terminal: Some(Terminal {
                ctty: Ctty::Pty(3),
                shell_job: false,
                foreground: 44,
            }),
            membership: super::super::Membership {
                cgroups: vec![super::super::Cgroup {
                    controllers: "cpu,cpuacct".into(),
                    path: "/a".into(),
                }],
                ..Default::default()
            },
            child_subreaper: true,
            oom_score_adj: -17,
            root: "/srv/jail".into(),
            membarrier: 0x154,
        }
    }

    #[test]
    fn a_process_round_trips() {
        let p = sample();
        let mut e = Enc::default();
        p.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(ProcessInfo::decode(&mut d, crate::FORMAT_MINOR).unwrap(), p);
        assert!(d.done());
        // Format 1.8 ends before the root directory: a 1.8 reader of these
        // bytes finds them left over; 1.8 bytes read without it.
        let mut d = Dec::new(&e.buf, 0);
        ProcessInfo::decode(&mut d, 8).unwrap();
        assert!(!d.done());
        let old = &e.buf[..e.buf.len() - 4 - p.root.len() - 4];
        let back = ProcessInfo::decode(&mut Dec::new(old, 0), 8).unwrap();
        assert_eq!((back.root.as_str(), back.membarrier), ("", 0));
        let mut bad = e.buf.clone();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&0x200u32.to_le_bytes());
        let err = ProcessInfo::decode(&mut Dec::new(&bad, 0), 9).unwrap_err();
        assert!(
            err.what.contains("membarrier registrations 0x200"),
            "{}",
            err.what
        );
        let mut rel = sample();
        rel.root = "jail".into();
        let mut e = Enc::default();
        rel.encode(&mut e);
        let err = ProcessInfo::decode(&mut Dec::new(&e.buf, 0), 9).unwrap_err();
        assert!(err.what.contains("absolute"), "{}", err.what);
    }

    #[test]
    fn a_process_of_format_1_1_has_no_clocks() {
        let mut p = sample();
        p.membership = Default::default();
        p.child_subreaper = false;
        p.oom_score_adj = 0;
        p.root = String::new();
        p.membarrier = 0;
        let mut e = Enc::default();
        p.encode(&mut e);
        // Format 1.7 ends before the (here empty, 24 bytes) membership and
        // the subreaper flag (4).
        e.buf.truncate(e.buf.len() - 24 - 8 - 8);
        assert_eq!(
            ProcessInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap(),
            p,
            "1.7 reads as 1.8 without cgroups or UTS namespace"
        );
        // 1.1 ends after the credentials: u64, u64, str "boot", i32, i32 cut off.
        let old = &e.buf[..e.buf.len() - (8 + 8 + 4 + 4 + 4 + 4 + 16 + 12)];
        let back = ProcessInfo::decode(&mut Dec::new(old, 0), crate::FORMAT_MINOR).unwrap();
        assert_eq!((back.monotonic_ns, back.boottime_ns), (0, 0));
        assert_eq!(back.boot_id, "");
        assert_eq!(back.creds, p.creds);
    }

    #[test]
    fn a_process_of_format_1_4_has_no_session() {
        let mut p = sample();
        p.membership = Default::default();
        p.child_subreaper = false;
        p.oom_score_adj = 0;
        p.root = String::new();
        p.membarrier = 0;
        let mut e = Enc::default();
        p.encode(&mut e);
        // Format 1.7 ends before the terminal (12 bytes) and the (here
        // empty, 24 bytes) membership.
        e.buf.truncate(e.buf.len() - 12 - 24 - 8 - 8);
        assert_eq!(
            ProcessInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap(),
            ProcessInfo {
                terminal: None,
                ..p.clone()
            },
            "1.7 reads as 1.8 without terminal, cgroups or namespaces"
        );
        let old = &e.buf[..e.buf.len() - 8 - 16];
        let back = ProcessInfo::decode(&mut Dec::new(old, 0), crate::FORMAT_MINOR).unwrap();
        assert_eq!((back.sid, back.pgid), (0, 0));
        assert_eq!(back.boot_id, "boot");
    }

    #[test]
    fn a_process_of_format_1_6_has_no_prctl_settings() {
        let mut p = sample();
        p.membership = Default::default();
        p.child_subreaper = false;
        p.oom_score_adj = 0;
        p.root = String::new();
        p.membarrier = 0;
        let mut e = Enc::default();
        p.encode(&mut e);
        e.buf.truncate(e.buf.len() - 12 - 24 - 8 - 8);
        let old = &e.buf[..e.buf.len() - 16];
        let back = ProcessInfo::decode(&mut Dec::new(old, 0), crate::FORMAT_MINOR).unwrap();
        assert_eq!(back.prctl, None);
        assert_eq!((back.sid, back.pgid), (42, 40));
        // Out of range values are refused.
        let mut bad = e.buf.clone();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&99u32.to_le_bytes());
        let err = ProcessInfo::decode(&mut Dec::new(&bad, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(err.what.contains("stop signal 99"), "{}", err.what);
    }

    #[test]
    fn a_process_of_format_1_7_has_no_terminal() {
        let mut p = sample();
        p.membership = Default::default();
        p.child_subreaper = false;
        p.oom_score_adj = 0;
        p.root = String::new();
        p.membarrier = 0;
        let mut e = Enc::default();
        p.encode(&mut e);
        // The terminal (12 bytes), the empty membership (24 bytes), the
        // subreaper flag (4 bytes).
        let old = &e.buf[..e.buf.len() - 12 - 24 - 8 - 8];
        let back = ProcessInfo::decode(&mut Dec::new(old, 0), crate::FORMAT_MINOR).unwrap();
        assert_eq!(back.terminal, None);
        assert_eq!(back.prctl, p.prctl);
        for (ctty, shell_job) in [(Ctty::None, false), (Ctty::Outside, true)] {
            let q = ProcessInfo {
                terminal: Some(Terminal {
                    ctty,
                    shell_job,
                    foreground: 0,
                }),
                ..sample()
            };
            let mut e = Enc::default();
            q.encode(&mut e);
            assert_eq!(
                ProcessInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap(),
                q
            );
        }
        // Unknown kinds and markers are refused.
        let n = e.buf.len();
        let mut bad = e.buf.clone();
        bad[n - 52..n - 50].copy_from_slice(&3u16.to_le_bytes());
        let err = ProcessInfo::decode(&mut Dec::new(&bad, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(
            err.what.contains("controlling terminal kind 3"),
            "{}",
            err.what
        );
        let mut bad = e.buf.clone();
        bad[n - 50..n - 48].copy_from_slice(&2u16.to_le_bytes());
        assert!(ProcessInfo::decode(&mut Dec::new(&bad, 0), crate::FORMAT_MINOR).is_err());
    }

    #[test]
    fn a_bad_signal_number_and_too_many_limits_are_refused() {
        let mut p = sample();
        p.sigactions[0].signo = 65;
        let mut e = Enc::default();
        p.encode(&mut e);
        let err = ProcessInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(err.what.contains("signal number 65"), "{}", err.what);
        let mut p = sample();
        p.rlimits = vec![(0, 0); 65];
        let mut e = Enc::default();
        p.encode(&mut e);
        let err = ProcessInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(err.what.contains("65 resource limits"), "{}", err.what);
    }
}
