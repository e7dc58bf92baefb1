//! What `/proc` shows of a process: `stat`, `status`, `maps` and the
//! clocks, each parsed in one place.

pub mod guards;
pub mod maps;

use std::io;

/// Whether cr-ebpf holds capability `bit` (of `CapEff`).
pub fn have_cap(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

pub use maps::{dumpable_runs, mark_tmpfs, parse_maps, MapEntry};

/// Clock `clock` now, in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` now, in ns.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    /// Parent, process group and session.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// The controlling terminal (`major << 8 | minor` in the kernel's
    /// encoding), 0 for none.
    pub tty_nr: i32,
    /// The foreground process group of the controlling terminal (-1: none).
    pub tpgid: i32,
    /// Start time after boot, in clock ticks: with the pid, it tells a
    /// process from a later one that got the same pid.
    pub start_time: u64,
    /// `start_code, end_code, start_data, end_data, start_brk, brk,
    /// start_stack, arg_start, arg_end, env_start, env_end`; `brk` is not
    /// in `/proc/PID/stat` and is 0 here.
    pub mm: [u64; 11],
    /// A zombie's wait status.
    pub exit_code: i32,
}

/// Parses the text of `/proc/PID/stat`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: after the last ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field n (1-based) of the whole line is f[n - 3].
    let num = |n: usize| -> i64 { f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let u = |n: usize| -> u64 { f.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    if f.len() < 49 {
        return None;
    }
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: num(4) as i32,
        pgid: num(5) as i32,
        sid: num(6) as i32,
        tty_nr: num(7) as i32,
        tpgid: num(8) as i32,
        start_time: u(22),
        mm: [
            u(26),
            u(27),
            u(45),
            u(46),
            u(47),
            0,
            u(28),
            u(48),
            u(49),
            u(50),
            u(51),
        ],
        exit_code: num(52) as i32,
    })
}

/// Reads `/proc/PID/stat`.
pub fn stat(pid: i32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("an unreadable /proc/{pid}/stat")))
}

/// The mm fields of `pid` ([`Stat::mm`]), with `brk_now` for `brk` (the
/// end of `[heap]`).
pub fn mm_fields(pid: i32, brk_now: u64) -> io::Result<[u64; 11]> {
    let mut mm = stat(pid)?.mm;
    mm[5] = brk_now;
    Ok(mm)
}

/// The text of `/proc/PID/status` (or of a thread's).
#[derive(Debug, Clone)]
pub struct Status(String);

impl Status {
    /// `/proc/PID/status`.
    pub fn of(pid: i32) -> io::Result<Self> {
        std::fs::read_to_string(format!("/proc/{pid}/status")).map(Self)
    }

    /// `/proc/PID/task/TID/status`.
    pub fn of_thread(pid: i32, tid: i32) -> io::Result<Self> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).map(Self)
    }

    /// A status read some other way.
    pub fn from_text(text: String) -> Self {
        Self(text)
    }

    /// The value of field `key` (`"Umask"`), trimmed.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.0.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .map(str::trim)
        })
    }

    /// Field `key` as a number in `radix`, or an error naming it.
    pub fn number(&self, key: &str, radix: u32) -> io::Result<u64> {
        let v = self
            .field(key)
            .ok_or_else(|| io::Error::other(format!("no {key} in status")))?;
        u64::from_str_radix(v, radix).map_err(io::Error::other)
    }
}

/// The blocked-signal mask of thread `tid` of `pid`.
pub fn sigmask(pid: i32, tid: i32) -> io::Result<u64> {
    Status::of_thread(pid, tid)?.number("SigBlk", 16)
}

/// The file mode creation mask of `pid`.
pub fn umask(pid: i32) -> io::Result<u32> {
    Status::of(pid)?.number("Umask", 8).map(|v| v as u32)
}

/// The execution domain of `pid`.
pub fn personality(pid: i32) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/personality"))?;
    u32::from_str_radix(s.trim(), 16).map_err(io::Error::other)
}

/// Number of resource limits (`RLIM_NLIMITS`).
pub const RLIMITS: u32 = 16;

/// The resource limits of `pid`, read from outside with `prlimit64`, or,
/// where that is not allowed (another user's process without
/// `CAP_SYS_RESOURCE`), from `/proc/PID/limits`.
pub fn rlimits(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    match prlimits(pid) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            parse_limits(&std::fs::read_to_string(format!("/proc/{pid}/limits"))?)
        }
        other => other,
    }
}

/// `/proc/PID/limits`: a header, then one line per limit in `RLIMIT_*`
/// order, the name in 25 columns then the soft and hard limits (numbers or
/// `unlimited`).
pub fn parse_limits(text: &str) -> io::Result<Vec<(u64, u64)>> {
    let value = |v: Option<&str>| match v {
        Some("unlimited") => Ok(u64::MAX),
        Some(n) => n.parse().map_err(io::Error::other),
        None => Err(io::Error::other("a limit without its values")),
    };
    let limits = text
        .lines()
        .skip(1)
        .take(RLIMITS as usize)
        .map(|l| {
            let mut v = l.get(26..).unwrap_or_default().split_whitespace();
            Ok((value(v.next())?, value(v.next())?))
        })
        .collect::<io::Result<Vec<_>>>()?;
    if limits.len() != RLIMITS as usize {
        return Err(io::Error::other(format!(
            "{} resource limits in /proc/PID/limits",
            limits.len()
        )));
    }
    Ok(limits)
}

fn prlimits(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    (0..RLIMITS)
        .map(|res| {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: reads only; the kernel writes one rlimit64.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    pid,
                    res,
                    std::ptr::null::<libc::rlimit64>(),
                    &mut old as *mut libc::rlimit64,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((old.rlim_cur, old.rlim_max))
        })
        .collect()
}

/// Real, effective, saved and filesystem uids, then gids, of `pid`.
pub fn creds(pid: i32) -> io::Result<[u32; 8]> {
    let status = Status::of(pid)?;
    let ids = |key: &str| -> io::Result<Vec<u32>> {
        status
            .field(key)
            .ok_or_else(|| io::Error::other(format!("no {key} in status")))?
            .split_whitespace()
            .map(|v| v.parse().map_err(io::Error::other))
            .collect()
    };
    let (u, g) = (ids("Uid")?, ids("Gid")?);
    if u.len() != 4 || g.len() != 4 {
        return Err(io::Error::other("unexpected Uid/Gid lines"));
    }
    Ok([u[0], u[1], u[2], u[3], g[0], g[1], g[2], g[3]])
}

/// The children of process `pid` (of all its threads), zombies included.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_status_of_ourselves_parse() {
        let me = std::process::id() as i32;
        let st = stat(me).unwrap();
        assert!(matches!(st.state, 'R' | 'S'));
        assert_eq!(st.ppid as u32, std::os::unix::process::parent_id());
        assert!(st.mm[0] < st.mm[1], "code start before code end");
        let line = std::fs::read_to_string("/proc/self/stat").unwrap();
        // A command name with spaces and parentheses.
        let odd = line.replacen('(', "(a) (b ", 1);
        assert_eq!(parse_stat(&odd).unwrap().start_time, st.start_time);
        assert!(parse_stat("12 (x) S 1").is_none());
        assert_eq!(
            Status::of(me).unwrap().field("Tgid"),
            Some(me.to_string().as_str())
        );
        assert_eq!(creds(me).unwrap()[0], own_uid());
        // /proc/PID/limits reads as prlimit64 does.
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert_eq!(parse_limits(&text).unwrap(), prlimits(me).unwrap());
        assert!(umask(me).unwrap() <= 0o777);
    }

    fn own_uid() -> u32 {
        Status::of(std::process::id() as i32)
            .unwrap()
            .field("Uid")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}
