//! Kernel interfaces used to freeze, inspect and rebuild processes. Each
//! probe runs the interface for real, in a forked child where it changes
//! the caller's own state.

use std::{
    io::{Read as _, Write as _},
    os::fd::{AsRawFd, OwnedFd},
};

use nix::{
    sys::{
        ptrace,
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::{fork, pipe, ForkResult, Pid},
};

use super::Check;
use crate::sys;

const GROUP: &str = "process control";

pub fn checks() -> Vec<Check> {
    vec![
        Check::new(GROUP, "ptrace seize + interrupt", true, ptrace_seize()),
        Check::new(GROUP, "clone3 with set_tid", true, clone3_set_tid()),
        Check::new(
            GROUP,
            "pidfd_open + pidfd_getfd + kcmp",
            true,
            pidfd_getfd(),
        ),
        Check::new(GROUP, "prctl PR_SET_MM_MAP", true, pr_set_mm_map()),
        Check::new(GROUP, "vDSO/vvar remap (mremap)", true, vdso_remap()),
        Check::new(GROUP, "arch_prctl ARCH_MAP_VDSO_64", false, arch_map_vdso()),
        Check::new(GROUP, "/proc/PID/map_files", false, map_files()),
        Check::new(GROUP, "TCP_REPAIR", false, tcp_repair()),
        Check::new(GROUP, "time namespaces", false, time_namespace()),
        Check::new(GROUP, "cgroup freezer", false, cgroup_freezer()),
    ]
}

/// Runs `f` in a forked child; its error message comes back through a pipe.
fn in_child(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let (rd, wr) = pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: `check` forks before it starts any thread; the child only makes
    // syscalls and plain allocations, then leaves with _exit.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(rd);
            let code = match f() {
                Ok(()) => 0,
                Err(msg) => {
                    let _ = std::fs::File::from(wr).write_all(msg.as_bytes());
                    1
                }
            };
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, 0)) => Ok(()),
                Ok(WaitStatus::Exited(_, _)) => Err(msg),
                Ok(other) => Err(format!("probe child ended with {other:?}")),
                Err(e) => Err(format!("waitpid: {e}")),
            }
        }
    }
}

/// Forks a child that sleeps until killed; returns it.
fn sleeping_child() -> Result<Pid, String> {
    // SAFETY: the child only calls pause() in a loop.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        },
        ForkResult::Parent { child } => Ok(child),
    }
}

fn reap(child: Pid) {
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
}

fn ptrace_seize() -> Result<String, String> {
    let child = sleeping_child()?;
    let result = (|| {
        ptrace::seize(child, ptrace::Options::empty()).map_err(|e| format!("PTRACE_SEIZE: {e}"))?;
        ptrace::interrupt(child).map_err(|e| format!("PTRACE_INTERRUPT: {e}"))?;
        match waitpid(child, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(_, _, ev)) if ev == libc::PTRACE_EVENT_STOP => {}
            other => return Err(format!("expected a ptrace event stop, got {other:?}")),
        }
        ptrace::detach(child, None).map_err(|e| format!("PTRACE_DETACH: {e}"))?;
        Ok("seized, stopped and released a child without killing it".to_string())
    })();
    reap(child);
    result
}

fn clone3_set_tid() -> Result<String, String> {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    // Try a few pids far from the ones being handed out now.
    let start = (std::process::id() as i32 + pid_max / 2) % pid_max;
    for i in 0..20 {
        let want = 300 + (start + i * 97) % (pid_max - 300);
        if std::path::Path::new(&format!("/proc/{want}")).exists() {
            continue;
        }
        // SAFETY: the child only returns 0 and exits.
        match unsafe { cr_ebpf_tracee::fork_with_pid(want, || 0) } {
            Ok(got) => {
                let _ = waitpid(Pid::from_raw(got), None);
                return if got == want {
                    Ok(format!("asked for pid {want} and got it"))
                } else {
                    Err(format!("asked for pid {want}, got {got}"))
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(format!("clone3: {e}")),
        }
    }
    Err("no free pid found to try".into())
}

fn pidfd_getfd() -> Result<String, String> {
    let (rd, wr) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let child = sleeping_child()?;
    let result = (|| {
        let pidfd = sys::pidfd_open(child.as_raw()).map_err(|e| format!("pidfd_open: {e}"))?;
        let theirs: OwnedFd = sys::pidfd_getfd(pidfd.as_raw_fd(), wr.as_raw_fd())
            .map_err(|e| format!("pidfd_getfd: {e}"))?;
        let same = sys::kcmp_file(
            nix::unistd::getpid().as_raw(),
            child.as_raw(),
            theirs.as_raw_fd(),
            wr.as_raw_fd(),
        )
        .map_err(|e| format!("kcmp: {e}"))?;
        if same != 0 {
            return Err("kcmp says the fetched fd is not the child's file".to_string());
        }
        Ok("fetched a child's fd and kcmp confirmed it is the same file".to_string())
    })();
    reap(child);
    drop(rd);
    result
}

/// Fields of `/proc/self/stat` that `prctl_mm_map` needs.
fn mm_fields() -> Result<sys::PrctlMmMap, String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| e.to_string())?;
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // /proc/PID/stat field n (1-based) is f[n - 3].
    let at = |n: usize| f.get(n - 3).copied().ok_or("short stat");
    Ok(sys::PrctlMmMap {
        start_code: at(26)?,
        end_code: at(27)?,
        start_stack: at(28)?,
        start_data: at(45)?,
        end_data: at(46)?,
        start_brk: at(47)?,
        arg_start: at(48)?,
        arg_end: at(49)?,
        env_start: at(50)?,
        env_end: at(51)?,
        brk: sys::current_brk(),
        exe_fd: u32::MAX,
        ..Default::default()
    })
}

fn pr_set_mm_map() -> Result<String, String> {
    in_child(|| {
        let size = sys::prctl_mm_map_size().map_err(|e| format!("PR_SET_MM_MAP_SIZE: {e}"))?;
        if size as usize != std::mem::size_of::<sys::PrctlMmMap>() {
            return Err(format!("kernel expects a {size}-byte prctl_mm_map"));
        }
        let auxv = std::fs::read("/proc/self/auxv").map_err(|e| e.to_string())?;
        let mut map = mm_fields()?;
        map.auxv = auxv.as_ptr() as u64;
        map.auxv_size = auxv.len() as u32;
        sys::prctl_set_mm_map(&map).map_err(|e| format!("PR_SET_MM_MAP: {e}"))
    })
    .map(|()| "set a child's mm fields and auxv in one call".into())
}

/// `[vvar*]` and `[vdso]` ranges from `/proc/self/maps`.
fn vdso_ranges() -> Result<Vec<(u64, u64, String)>, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if name.starts_with("[vvar") || name == "[vdso]" {
            let range = line.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').ok_or("bad maps line")?;
            let a = u64::from_str_radix(a, 16).map_err(|e| e.to_string())?;
            let b = u64::from_str_radix(b, 16).map_err(|e| e.to_string())?;
            out.push((a, b, name.to_string()));
        }
    }
    if !out.iter().any(|r| r.2 == "[vdso]") {
        return Err("no [vdso] mapping in /proc/self/maps".into());
    }
    Ok(out)
}

fn vdso_remap() -> Result<String, String> {
    let ranges = vdso_ranges()?;
    let names: Vec<String> = ranges
        .iter()
        .map(|(a, b, n)| format!("{n} {}p", (b - a) / 4096))
        .collect();
    in_child(move || {
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let away = sys::reserve(hi - lo).map_err(|e| format!("mmap: {e}"))?;
        for (a, b, _) in &ranges {
            sys::mremap_fixed(*a, b - a, away + (a - lo))
                .map_err(|e| format!("mremap away: {e}"))?;
        }
        for (a, b, _) in &ranges {
            sys::mremap_fixed(away + (a - lo), b - a, *a)
                .map_err(|e| format!("mremap back: {e}"))?;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer; goes through the vDSO just moved back.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 || ts.tv_sec == 0 {
            return Err("clock_gettime through the moved vDSO failed".into());
        }
        Ok(())
    })
    .map(|()| {
        format!(
            "moved {} away and back, clock_gettime works",
            names.join(", ")
        )
    })
}

fn arch_map_vdso() -> Result<String, String> {
    const ARCH_MAP_VDSO_64: i32 = 0x2003;
    match sys::arch_prctl(ARCH_MAP_VDSO_64, 0x1000_0000) {
        // With a vDSO already mapped, a supporting kernel answers EEXIST.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            Ok("supported (answers EEXIST while a vDSO is mapped)".into())
        }
        Ok(_) => Ok("supported".into()),
        Err(e) => Err(format!("arch_prctl(ARCH_MAP_VDSO_64): {e}")),
    }
}

fn map_files() -> Result<String, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let range = maps
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|n| n.starts_with('/'))
        })
        .and_then(|l| l.split_whitespace().next())
        .ok_or("no file-backed mapping found")?;
    let target = std::fs::read_link(format!("/proc/self/map_files/{range}"))
        .map_err(|e| format!("readlink /proc/self/map_files/{range}: {e}"))?;
    Ok(format!("resolves mappings to files ({})", target.display()))
}

fn tcp_repair() -> Result<String, String> {
    // A fresh, unconnected socket: listening sockets may never enter repair mode.
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one int from a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r == 0 {
        Ok("a TCP socket entered repair mode".into())
    } else {
        Err(format!(
            "setsockopt(TCP_REPAIR): {} (needs CAP_NET_ADMIN)",
            std::io::Error::last_os_error()
        ))
    }
}

fn time_namespace() -> Result<String, String> {
    if !std::path::Path::new("/proc/self/ns/time").exists() {
        return Err("no /proc/self/ns/time (CONFIG_TIME_NS unset)".into());
    }
    in_child(|| {
        nix::sched::unshare(nix::sched::CloneFlags::from_bits_retain(
            libc::CLONE_NEWTIME,
        ))
        .map_err(|e| format!("unshare(CLONE_NEWTIME): {e}"))?;
        std::fs::write("/proc/self/timens_offsets", "monotonic 100 0")
            .map_err(|e| format!("writing timens_offsets: {e}"))
    })
    .map(|()| "created a time namespace and set a monotonic offset".into())
}

/// Mount points of cgroup hierarchies: (v2 mount, v1 freezer mount).
fn cgroup_mounts() -> (Option<String>, Option<String>) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let (mut v2, mut v1_freezer) = (None, None);
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [_, dir, "cgroup2", ..] if v2.is_none() => v2 = Some(dir.to_string()),
            [_, dir, "cgroup", opts, ..] if opts.split(',').any(|o| o == "freezer") => {
                v1_freezer = Some(dir.to_string())
            }
            _ => {}
        }
    }
    (v2, v1_freezer)
}

/// Creates a scratch cgroup under `root`, checks it has `file`, removes it.
fn scratch_cgroup_has(root: &str, file: &str) -> Result<(), String> {
    let dir = std::path::Path::new(root).join(format!("cr-ebpf-check-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let has = dir.join(file).exists();
    let _ = std::fs::remove_dir(&dir);
    if has {
        Ok(())
    } else {
        Err(format!("a new cgroup under {root} has no {file}"))
    }
}

fn cgroup_freezer() -> Result<String, String> {
    match cgroup_mounts() {
        (Some(v2), _) if scratch_cgroup_has(&v2, "cgroup.freeze").is_ok() => Ok(format!(
            "cgroup v2 at {v2}: cgroup.freeze present in a new cgroup"
        )),
        (_, Some(v1)) => scratch_cgroup_has(&v1, "freezer.state")
            .map(|()| format!("cgroup v1 freezer at {v1}: freezer.state present in a new cgroup")),
        (Some(v2), None) => scratch_cgroup_has(&v2, "cgroup.freeze").map(|()| String::new()),
        (None, None) => Err("no cgroup2 mount and no v1 freezer hierarchy".into()),
    }
}
