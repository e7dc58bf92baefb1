//! Section THREAD (one per thread, main thread first).

use super::{decode_siginfos, encode_siginfos};
use crate::codec::{Dec, DecErr, Enc};

/// Largest register set stored.
const REGS_CAP: usize = 1024;
/// Largest XSAVE area stored.
const XSTATE_CAP: usize = 64 * 1024;
/// Longest thread name (`comm` holds 15 bytes and a NUL).
const COMM_CAP: usize = 16;
/// Most supplementary groups (`NGROUPS_MAX`).
const GROUPS_CAP: usize = 65536;
/// Most seccomp filters of a thread (the kernel allows 32768 instructions
/// along a thread's filters, each costing 4 more).
const FILTERS_CAP: usize = 8192;
/// Longest seccomp filter (`BPF_MAXINSNS` instructions of 8 bytes).
const FILTER_CAP: usize = 4096 * 8;
/// `SECCOMP_FILTER_FLAG_LOG`, the one flag a filter keeps.
pub const SECCOMP_FILTER_LOG: u32 = 2;

/// One thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadInfo {
    /// Thread id at checkpoint time.
    pub tid: i32,
    /// `user_regs_struct` bytes.
    pub regs: Vec<u8>,
    /// XSAVE area bytes.
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Registered rseq area: address (0: none), size, signature.
    pub rseq: (u64, u32, u32),
    /// Robust futex list: head address, length.
    pub robust_list: (u64, u64),
    /// `clear_child_tid` (`set_tid_address`): zeroed and woken at thread exit.
    pub clear_child_tid: u64,
    /// Alternate signal stack: (`ss_sp`, `ss_flags`, `ss_size`).
    pub sigaltstack: (u64, u32, u64),
    /// Signals pending for this thread only, as 128-byte `siginfo_t`s.
    pub pending: Vec<Vec<u8>>,
    /// Thread name (`comm`, at most 15 bytes).
    pub comm: String,
    /// Format 1.9: its credentials and seccomp state, set again last.
    /// `None` in older images (which refused any that differed from the
    /// checkpointer's but the uids and gids).
    pub creds: Option<ThreadCreds>,
    /// Scheduling settings (format 1.9; `None` before: the defaults).
    pub sched: Option<Sched>,
}

/// What a thread runs as and what limits it (format 1.9). The kernel keeps
/// all of it per thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadCreds {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Capability sets: effective, permitted, inheritable, bounding,
    /// ambient (bit N is capability N).
    pub caps: [u64; 5],
    /// `PR_GET_SECUREBITS`.
    pub securebits: u32,
    /// `PR_GET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// The audit login uid (`/proc/PID/loginuid`; `u32::MAX` unset).
    pub loginuid: u32,
    /// Seccomp mode: 0 none, 1 strict, 2 filters.
    pub seccomp_mode: u32,
    /// Its seccomp filters, oldest first (mode 2 only).
    pub seccomp_filters: Vec<SeccompFilter>,
}

/// One seccomp filter of a thread (format 1.9).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Its flags: [`SECCOMP_FILTER_LOG`] or 0.
    pub flags: u32,
    /// Its classic BPF program: `struct sock_filter`s, 8 bytes each.
    pub prog: Vec<u8>,
}

impl ThreadCreds {
    fn encode(&self, b: &mut Enc) {
        for v in self.uids.iter().chain(&self.gids) {
            b.u32(*v);
        }
        b.u32(self.groups.len() as u32);
        for g in &self.groups {
            b.u32(*g);
        }
        for c in self.caps {
            b.u64(c);
        }
        b.u32(self.securebits);
        b.u32(u32::from(self.no_new_privs));
        b.u32(self.loginuid);
        b.u32(self.seccomp_mode);
        b.u32(self.seccomp_filters.len() as u32);
        for f in &self.seccomp_filters {
            b.u32(f.flags);
            b.bytes(&f.prog);
        }
    }

    fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let mut c = Self::default();
        for v in c.uids.iter_mut().chain(&mut c.gids) {
            *v = b.u32()?;
        }
        let n = b.u32()? as usize;
        if n > GROUPS_CAP {
            return Err(b.err(format!("{n} supplementary groups (at most {GROUPS_CAP})")));
        }
        c.groups = (0..n).map(|_| b.u32()).collect::<Result<_, _>>()?;
        for v in &mut c.caps {
            *v = b.u64()?;
        }
        c.securebits = b.u32()?;
        if c.securebits & !0xff != 0 {
            return Err(b.err(format!("securebits {:#x}", c.securebits)));
        }
        c.no_new_privs = match b.u32()? {
            0 => false,
            1 => true,
            other => return Err(b.err(format!("no_new_privs flag {other} (0 or 1)"))),
        };
        c.loginuid = b.u32()?;
        c.seccomp_mode = b.u32()?;
        let n = b.u32()? as usize;
        if n > FILTERS_CAP {
            return Err(b.err(format!("{n} seccomp filters (at most {FILTERS_CAP})")));
        }
        for _ in 0..n {
            let flags = b.u32()?;
            let prog = b.bytes(FILTER_CAP, "seccomp filter")?.to_vec();
            if flags & !SECCOMP_FILTER_LOG != 0 || prog.is_empty() || prog.len() % 8 != 0 {
                return Err(b.err(format!(
                    "seccomp filter of {} bytes with flags {flags:#x}",
                    prog.len()
                )));
            }
            c.seccomp_filters.push(SeccompFilter { flags, prog });
        }
        match (c.seccomp_mode, n) {
            (0 | 1, 0) | (2, 1..) => Ok(c),
            (mode, n) => Err(b.err(format!("seccomp mode {mode} with {n} filters"))),
        }
    }
}

/// First minor whose THREAD section ends with the scheduling settings.
pub const SCHED_SINCE: u16 = 9;
/// `SCHED_FLAG_RESET_ON_FORK`, the only flag of [`Sched::flags`].
pub const SCHED_RESET_ON_FORK: u32 = 1;

/// A thread's scheduling settings, as `sched_getattr` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sched {
    /// `SCHED_OTHER` 0, `SCHED_FIFO` 1, `SCHED_RR` 2, `SCHED_BATCH` 3,
    /// `SCHED_IDLE` 5 (`SCHED_DEADLINE` is refused at checkpoint time).
    pub policy: u32,
    /// [`SCHED_RESET_ON_FORK`] or 0.
    pub flags: u32,
    /// Nice value, -20..=19.
    pub nice: i32,
    /// Real-time priority: 1..=99 for `SCHED_FIFO` and `SCHED_RR`, else 0.
    pub priority: u32,
    /// A time slice of its own (`sched_runtime` of a fair policy), in
    /// nanoseconds; 0: the kernel's default.
    pub slice_ns: u64,
}

impl Sched {
    fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let at = b.offset();
        let s = Self {
            policy: b.u32()?,
            flags: b.u32()?,
            nice: b.i32()?,
            priority: b.u32()?,
            slice_ns: b.u64()?,
        };
        let rt = matches!(s.policy, 1 | 2);
        let bad = if !matches!(s.policy, 0 | 1 | 2 | 3 | 5) {
            Some(format!("unknown scheduling policy {}", s.policy))
        } else if s.flags & !SCHED_RESET_ON_FORK != 0 {
            Some(format!("unknown scheduling flags {:#x}", s.flags))
        } else if !(-20..=19).contains(&s.nice) {
            Some(format!("nice value {}", s.nice))
        } else if rt != (1..=99).contains(&s.priority) {
            Some(format!(
                "real-time priority {} with policy {}",
                s.priority, s.policy
            ))
        } else {
            None
        };
        match bad {
            Some(what) => Err(DecErr { offset: at, what }),
            None => Ok(s),
        }
    }
}

impl ThreadInfo {
    /// The THREAD section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.i32(self.tid);
        b.bytes(&self.regs);
        b.bytes(&self.xstate);
        b.u64(self.sigmask);
        b.u64(self.rseq.0);
        b.u32(self.rseq.1);
        b.u32(self.rseq.2);
        b.u64(self.robust_list.0);
        b.u64(self.robust_list.1);
        b.u64(self.clear_child_tid);
        b.u64(self.sigaltstack.0);
        b.u32(self.sigaltstack.1);
        b.u64(self.sigaltstack.2);
        encode_siginfos(b, &self.pending);
        b.str(&self.comm);
        // Format 1.9 appends the credentials, then the scheduling
        // settings (only after credentials: a 1.9 writer has both).
        if let Some(c) = &self.creds {
            c.encode(b);
            if let Some(s) = &self.sched {
                b.u32(s.policy);
                b.u32(s.flags);
                b.i32(s.nice);
                b.u32(s.priority);
                b.u64(s.slice_ns);
            }
        }
    }

    /// Reads a THREAD section's body, of format 1.`minor`.
    pub(super) fn decode(b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        let mut t = Self {
            tid: b.i32()?,
            regs: b.bytes(REGS_CAP, "registers")?.to_vec(),
            xstate: b.bytes(XSTATE_CAP, "xstate")?.to_vec(),
            sigmask: b.u64()?,
            rseq: (b.u64()?, b.u32()?, b.u32()?),
            robust_list: (b.u64()?, b.u64()?),
            clear_child_tid: b.u64()?,
            sigaltstack: (b.u64()?, b.u32()?, b.u64()?),
            pending: decode_siginfos(b)?,
            comm: b.str(COMM_CAP, "thread name")?,
            creds: None,
            sched: None,
        };
        if !b.done() {
            t.creds = Some(ThreadCreds::decode(b)?);
        }
        if minor >= SCHED_SINCE && !b.done() {
            t.sched = Some(Sched::decode(b)?);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_round_trips_and_a_short_siginfo_is_refused() {
        let t = ThreadInfo {
            tid: 7,
            regs: vec![1; 216],
            xstate: vec![2; 1088],
            sigmask: 0x4000,
            rseq: (0x7000_1000, 32, 0x5305_3053),
            robust_list: (0x7000_2000, 24),
            clear_child_tid: 0x7000_3000,
            sigaltstack: (0x7000_4000, 2, 8192),
            pending: vec![vec![9; 128], vec![10; 128]],
            comm: "worker".into(),
            creds: Some(ThreadCreds {
                uids: [1, 2, 3, 4],
                gids: [5, 6, 7, 8],
                groups: vec![10, 20],
                caps: [1, 3, 7, 0xff, 1],
                securebits: 0x15,
                no_new_privs: true,
                loginuid: 1000,
                seccomp_mode: 2,
                seccomp_filters: vec![SeccompFilter {
                    flags: SECCOMP_FILTER_LOG,
                    prog: vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f],
                }],
            }),
            sched: Some(Sched {
                policy: 2,
                flags: SCHED_RESET_ON_FORK,
                nice: -5,
                priority: 3,
                slice_ns: 0,
            }),
        };
        let mut e = Enc::default();
        t.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(ThreadInfo::decode(&mut d, crate::FORMAT_MINOR).unwrap(), t);
        assert!(d.done());

        // Format 1.8 ends before the credentials and scheduling settings.
        let old = ThreadInfo {
            creds: None,
            sched: None,
            ..t.clone()
        };
        let mut e8 = Enc::default();
        old.encode(&mut e8);
        let mut d = Dec::new(&e8.buf, 0);
        assert_eq!(ThreadInfo::decode(&mut d, 8).unwrap(), old);
        assert!(d.done());
        // Out-of-range settings and credentials are errors.
        for bad in [
            Sched {
                policy: 6,
                ..Sched::default()
            },
            Sched {
                flags: 2,
                ..Sched::default()
            },
            Sched {
                nice: -21,
                ..Sched::default()
            },
            Sched {
                policy: 1,
                priority: 0,
                ..Sched::default()
            },
            Sched {
                policy: 0,
                priority: 5,
                ..Sched::default()
            },
        ] {
            let mut e = Enc::default();
            ThreadInfo {
                sched: Some(bad),
                ..t.clone()
            }
            .encode(&mut e);
            assert!(
                ThreadInfo::decode(&mut Dec::new(&e.buf, 0), 9).is_err(),
                "{bad:?}"
            );
        }
        for bad in [
            ThreadCreds {
                seccomp_mode: 2,
                ..Default::default()
            },
            ThreadCreds {
                seccomp_mode: 2,
                seccomp_filters: vec![SeccompFilter {
                    flags: 0,
                    prog: vec![0; 7],
                }],
                ..Default::default()
            },
        ] {
            let mut e = Enc::default();
            ThreadInfo {
                creds: Some(bad),
                sched: None,
                ..old.clone()
            }
            .encode(&mut e);
            assert!(ThreadInfo::decode(&mut Dec::new(&e.buf, 0), 9).is_err());
        }

        let short = ThreadInfo {
            pending: vec![vec![0; 100]],
            ..t
        };
        let mut e = Enc::default();
        short.encode(&mut e);
        let err = ThreadInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(err.what.contains("siginfo of 100 bytes"), "{}", err.what);
    }

    #[test]
    fn a_long_register_set_is_refused_before_it_is_read() {
        let mut e = Enc::default();
        e.i32(1);
        e.u32(u32::MAX);
        let err = ThreadInfo::decode(&mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR).unwrap_err();
        assert!(err.what.contains("exceeds the cap"), "{}", err.what);
    }
}
