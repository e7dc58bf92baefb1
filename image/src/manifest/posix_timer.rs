//! Section POSIX_TIMER (format 1.2; one per `timer_create` timer, ids unique).

use crate::codec::{Dec, DecErr, Enc};

/// One POSIX timer (`timer_create`), as `/proc/PID/timers` and an injected
/// `timer_gettime` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PosixTimer {
    /// The timer id the process uses.
    pub id: i32,
    /// Its clock.
    pub clockid: i32,
    /// `sigev_notify`: `SIGEV_SIGNAL` 0, `SIGEV_NONE` 1, `SIGEV_THREAD_ID` 4.
    pub notify: i32,
    /// The signal it sends.
    pub signo: i32,
    /// `sigev_value`, delivered with the signal.
    pub value: u64,
    /// For `SIGEV_THREAD_ID`: the thread the signal goes to.
    pub tid: i32,
    /// Remaining time until it fires (0: disarmed), ns.
    pub remaining_ns: u64,
    /// Its interval, ns (0: fires once).
    pub interval_ns: u64,
}

impl PosixTimer {
    /// The POSIX_TIMER section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.i32(self.id);
        b.i32(self.clockid);
        b.i32(self.notify);
        b.i32(self.signo);
        b.u64(self.value);
        b.i32(self.tid);
        b.u32(0);
        b.u64(self.remaining_ns);
        b.u64(self.interval_ns);
    }

    /// Reads a POSIX_TIMER section's body.
    pub(super) fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        Ok(Self {
            id: b.i32()?,
            clockid: b.i32()?,
            notify: b.i32()?,
            signo: b.i32()?,
            value: b.u64()?,
            tid: b.i32()?,
            remaining_ns: {
                b.u32()?;
                b.u64()?
            },
            interval_ns: b.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_round_trips() {
        let t = PosixTimer {
            id: 2,
            clockid: 7,
            notify: 4,
            signo: 12,
            value: 0xabc,
            tid: 4243,
            remaining_ns: 39_000_000_000,
            interval_ns: 3_000_000_000,
        };
        let mut e = Enc::default();
        t.encode(&mut e);
        assert_eq!(e.buf.len(), 48);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(PosixTimer::decode(&mut d).unwrap(), t);
        assert!(d.done());
        assert!(PosixTimer::decode(&mut Dec::new(&e.buf[..47], 0)).is_err());
    }
}
