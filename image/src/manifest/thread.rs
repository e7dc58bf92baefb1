//! Section THREAD (one per thread, main thread first).

use super::{decode_siginfos, encode_siginfos};
use crate::codec::{Dec, DecErr, Enc};

/// Largest register set stored.
const REGS_CAP: usize = 1024;
/// Largest XSAVE area stored.
const XSTATE_CAP: usize = 64 * 1024;
/// Longest thread name (`comm` holds 15 bytes and a NUL).
const COMM_CAP: usize = 16;

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
    /// Scheduling settings (format 1.9; `None` before: the defaults).
    pub sched: Option<Sched>,
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
        if let Some(s) = &self.sched {
            b.u32(s.policy);
            b.u32(s.flags);
            b.i32(s.nice);
            b.u32(s.priority);
            b.u64(s.slice_ns);
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
            sched: None,
        };
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

        // Format 1.8 has no scheduling settings: the same bytes without them.
        let old = ThreadInfo {
            sched: None,
            ..t.clone()
        };
        let mut e8 = Enc::default();
        old.encode(&mut e8);
        assert_eq!(e8.buf.len(), e.buf.len() - 24);
        let mut d = Dec::new(&e8.buf, 0);
        assert_eq!(ThreadInfo::decode(&mut d, 8).unwrap(), old);
        assert!(d.done());
        // A 1.8 reader leaves them unread (an error at the section's end).
        let mut d = Dec::new(&e.buf, 0);
        ThreadInfo::decode(&mut d, 8).unwrap();
        assert!(!d.done());
        // Out-of-range settings are errors.
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
