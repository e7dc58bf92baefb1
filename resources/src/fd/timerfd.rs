//! timerfd timers: clock, remaining time, interval and expirations not read
//! yet, from fdinfo; rebuilt in the restorer (the remaining time counts from
//! the restore) and handed over.

use std::os::fd::AsRawFd as _;

use cr_ebpf_image::{FdInfo, FdKind, FdState};

use super::{owned, unreadable, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// `TFD_IOC_SET_TICKS`: expirations not read yet.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// A timerfd.
pub struct TimerFd;

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// The state in a timerfd's fdinfo text.
fn parse(seen: &Seen) -> Option<FdState> {
    let pair = |k: &str| -> Option<u64> {
        // it_value: (8, 999837282)
        let v = seen.field(k)?.trim_start_matches('(').trim_end_matches(')');
        let (s, ns) = v.split_once(',')?;
        Some(s.trim().parse::<u64>().ok()? * 1_000_000_000 + ns.trim().parse::<u64>().ok()?)
    };
    let flags = seen
        .field("settime flags:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())?;
    Some(FdState::TimerFd {
        clockid: seen.field("clockid:")?.parse().ok()?,
        abstime: flags & 1 != 0,
        value_ns: pair("it_value:")?,
        interval_ns: pair("it_interval:")?,
        ticks: seen.field("ticks:")?.parse().ok()?,
    })
}

impl Descriptor for TimerFd {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::TimerFd]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[timerfd]") {
            return None;
        }
        Some(match parse(seen) {
            Some(state) => {
                let mut info = seen.info(FdKind::TimerFd);
                info.state = state;
                Ok(info)
            }
            None => Err(unreadable(cx, seen, "timerfd state")),
        })
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let FdState::TimerFd {
            clockid,
            abstime: _,
            value_ns,
            interval_ns,
            ticks,
        } = f.state
        else {
            return Err(RestoreError::NotSupported(format!(
                "timerfd {} without its state",
                f.fd
            )));
        };
        // SAFETY: plain syscall.
        let fd = owned(
            unsafe { libc::timerfd_create(clockid, libc::TFD_CLOEXEC) },
            "timerfd_create",
        )?;
        // The remaining time counts from now (an absolute timer keeps its
        // distance to expiry); an expired periodic timer waiting to be read
        // fires again one interval from now.
        let value = if value_ns == 0 { interval_ns } else { value_ns };
        if value > 0 {
            let spec = libc::itimerspec {
                it_interval: timespec(interval_ns),
                it_value: timespec(value),
            };
            // SAFETY: our itimerspec.
            let r =
                unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
            if r != 0 {
                return Err(RestoreError::Syscall {
                    call: "timerfd_settime".into(),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        if ticks > 0 {
            // SAFETY: the ioctl reads one u64 of ours.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } != 0 {
                return Err(RestoreError::Syscall {
                    call: "ioctl(TFD_IOC_SET_TICKS)".into(),
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        cx.adopt(&fd).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_periodic_timer_round_trips() {
        // SAFETY: plain syscall.
        let fd = owned(
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) },
            "timerfd_create",
        )
        .unwrap();
        let spec = libc::itimerspec {
            it_interval: timespec(2_500_000_000),
            it_value: timespec(3_600_000_000_000),
        };
        // SAFETY: our itimerspec.
        let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        assert_eq!(r, 0);
        let info = testing::save_own(fd.as_raw_fd());
        let FdState::TimerFd {
            clockid,
            value_ns,
            interval_ns,
            ticks,
            ..
        } = info.state
        else {
            panic!("{:?}", info.state)
        };
        assert_eq!((clockid, interval_ns, ticks), (1, 2_500_000_000, 0));
        assert!(value_ns > 3_500_000_000_000 && value_ns <= 3_600_000_000_000);
        let FdState::TimerFd {
            value_ns: again,
            interval_ns: interval_again,
            ..
        } = testing::rebuilt_state(&TimerFd, &info)
        else {
            panic!("not a timerfd")
        };
        assert_eq!(interval_again, interval_ns);
        assert!(again <= value_ns && value_ns - again < 60_000_000_000);
    }

    #[test]
    fn an_unreadable_state_is_refused() {
        let (r, _w) = testing::pipe();
        let seen = Seen {
            link: "anon_inode:[timerfd]".into(),
            fdinfo: "pos:\t0\nclockid: 1\n".into(),
            ..testing::seen(r.as_raw_fd())
        };
        let mut owner = testing::SaveOwner::new();
        let err = TimerFd.save(&mut owner.cx(), &seen).unwrap().unwrap_err();
        assert!(err.to_string().contains("timerfd state"), "{err}");
    }
}
