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
    }

    /// Reads a THREAD section's body.
    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        Ok(Self {
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
        })
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
        };
        let mut e = Enc::default();
        t.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(ThreadInfo::decode(&mut d).unwrap(), t);
        assert!(d.done());

        let short = ThreadInfo {
            pending: vec![vec![0; 100]],
            ..t
        };
        let mut e = Enc::default();
        short.encode(&mut e);
        let err = ThreadInfo::decode(&mut Dec::new(&e.buf, 0)).unwrap_err();
        assert!(err.what.contains("siginfo of 100 bytes"), "{}", err.what);
    }

    #[test]
    fn a_long_register_set_is_refused_before_it_is_read() {
        let mut e = Enc::default();
        e.i32(1);
        e.u32(u32::MAX);
        let err = ThreadInfo::decode(&mut Dec::new(&e.buf, 0)).unwrap_err();
        assert!(err.what.contains("exceeds the cap"), "{}", err.what);
    }
}
