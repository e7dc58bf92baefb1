//! What `/proc` shows of a process: `stat`, `status`, `maps` and the
//! clocks, each parsed in one place.

pub mod maps;

use std::io;

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

/// `start_code, end_code, start_data, end_data, start_brk, brk, start_stack,
/// arg_start, arg_end, env_start, env_end` of process `pid`. `brk` is not in
/// `/proc/PID/stat`; `brk_now` supplies it (the end of `[heap]`).
pub fn mm_fields(pid: i32, brk_now: u64) -> io::Result<[u64; 11]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // /proc/PID/stat field n (1-based) is f[n - 3].
    let at = |n: usize| {
        f.get(n - 3)
            .copied()
            .ok_or_else(|| io::Error::other("short /proc/PID/stat"))
    };
    Ok([
        at(26)?,
        at(27)?,
        at(45)?,
        at(46)?,
        at(47)?,
        brk_now,
        at(28)?,
        at(48)?,
        at(49)?,
        at(50)?,
        at(51)?,
    ])
}

/// The blocked-signal mask of thread `tid` of `pid`.
pub fn sigmask(pid: i32, tid: i32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))?;
    let hex = s
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .ok_or_else(|| io::Error::other("no SigBlk in status"))?;
    u64::from_str_radix(hex.trim(), 16).map_err(io::Error::other)
}

/// The file mode creation mask of `pid`.
pub fn umask(pid: i32) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let v = s
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .ok_or_else(|| io::Error::other("no Umask in status"))?;
    u32::from_str_radix(v.trim(), 8).map_err(io::Error::other)
}

/// The execution domain of `pid`.
pub fn personality(pid: i32) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/personality"))?;
    u32::from_str_radix(s.trim(), 16).map_err(io::Error::other)
}

/// Number of resource limits (`RLIM_NLIMITS`).
pub const RLIMITS: u32 = 16;

/// The resource limits of `pid`, read from outside with `prlimit64`.
pub fn rlimits(pid: i32) -> io::Result<Vec<(u64, u64)>> {
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
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ids = |key: &str| -> io::Result<Vec<u32>> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| io::Error::other(format!("no {key} in status")))?
            .split_whitespace()
            .map(|v| v.parse().map_err(io::Error::other))
            .collect()
    };
    let (u, g) = (ids("Uid:")?, ids("Gid:")?);
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
