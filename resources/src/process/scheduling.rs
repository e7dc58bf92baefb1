//! Scheduling: nice value, scheduling policy (with its reset-on-fork
//! flag), real-time priority and time slice of each thread (format 1.9:
//! saved with each thread by [`save_sched`], set again in each thread by
//! [`restore_sched`]; `SCHED_DEADLINE`, and settings cr-ebpf could not set
//! again without `CAP_SYS_NICE`, are refused at checkpoint time), and the
//! OOM score adjustment (recorded and written again; one below cr-ebpf's
//! own is refused when cr-ebpf lacks `CAP_SYS_RESOURCE`, which lowering it
//! takes).

use cr_ebpf_image::{ProcessInfo, Sched, SCHED_RESET_ON_FORK};

use super::{Phase, ProcessKind, SaveCx};
use crate::{error::proc_err, sys::Sys, RestoreError, SaveError};

/// Nice, policy, real-time priority, OOM score adjustment.
pub struct Scheduling;

/// `struct sched_attr` as far as `SCHED_ATTR_SIZE_VER1` (56 bytes).
const ATTR_LEN: usize = 56;
/// Capability numbers (`linux/capability.h`).
const CAP_SYS_NICE: u32 = 23;
const CAP_SYS_RESOURCE: u32 = 24;
/// `SCHED_DEADLINE`.
const SCHED_DEADLINE: u32 = 6;

/// `sched_getattr` of thread `tid`: (policy, flags, nice, priority, runtime).
fn getattr(tid: i32) -> std::io::Result<(u32, u64, i32, u32, u64)> {
    let mut a = [0u8; ATTR_LEN];
    // SAFETY: `a` is a writable buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, a.as_mut_ptr(), ATTR_LEN, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let u32_at = |i: usize| u32::from_le_bytes(a[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(a[i..i + 8].try_into().expect("8 bytes"));
    Ok((
        u32_at(4),
        u64_at(8),
        u32_at(16) as i32,
        u32_at(20),
        u64_at(24),
    ))
}

/// The nice value of thread `tid` (for a real-time thread too, which
/// `sched_getattr` does not show).
fn nice(tid: i32) -> std::io::Result<i32> {
    // SAFETY: plain syscall; it returns 20 - nice (1..=40), never negative.
    let r = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, tid) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(20 - r as i32)
}

/// The scheduling settings of thread `tid` of process `pid`; `Err` is a
/// refusal (what cannot be set again), `Ok(None)` a thread that is gone.
pub fn save_sched(pid: i32, tid: i32) -> Result<Option<Sched>, SaveError> {
    let refuse = |what: String| SaveError::NotSupported { pid, what };
    let (policy, flags, _, priority, runtime) = match getattr(tid) {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(proc_err(pid, format!("sched_getattr of thread {tid}"))(e)),
    };
    let value = nice(tid).map_err(proc_err(pid, format!("getpriority of thread {tid}")))?;
    if policy == SCHED_DEADLINE {
        return Err(refuse(format!(
            "the SCHED_DEADLINE policy of thread {tid}: it is not restored (its admission \
             control and fork rules)"
        )));
    }
    if flags & !(SCHED_RESET_ON_FORK as u64) != 0 {
        return Err(refuse(format!(
            "scheduling flags {flags:#x} of thread {tid}: they are not restored"
        )));
    }
    let fair = matches!(policy, 0 | 3 | 5);
    // The default slice is the one cr-ebpf's own thread has.
    let default_slice = getattr(0).map(|a| a.4).unwrap_or(0);
    let slice_ns = if fair && runtime != default_slice {
        runtime
    } else {
        0
    };
    let ours = nice(0).unwrap_or(0);
    let nice = value;
    let rt = matches!(policy, 1 | 2);
    if (rt || nice < ours || slice_ns != 0) && !crate::proc::have_cap(CAP_SYS_NICE) {
        return Err(refuse(format!(
            "thread {tid}'s scheduling (policy {policy}, rt priority {priority}, nice {nice}, \
             cr-ebpf's nice {ours}): setting it again needs CAP_SYS_NICE, which cr-ebpf lacks"
        )));
    }
    Ok(Some(Sched {
        policy,
        flags: flags as u32,
        nice,
        priority,
        slice_ns,
    }))
}

/// Sets `s` on the thread `sys` runs in: the nice value first (kept by a
/// real-time thread, which `sched_setattr` does not set), then the rest.
pub fn restore_sched(sys: &dyn Sys, s: &Sched) -> Result<(), RestoreError> {
    sys.call(
        "setpriority",
        libc::SYS_setpriority,
        [libc::PRIO_PROCESS as u64, 0, s.nice as i64 as u64, 0, 0, 0],
    )?;
    let mut a = [0u8; ATTR_LEN];
    a[0..4].copy_from_slice(&(ATTR_LEN as u32).to_le_bytes());
    a[4..8].copy_from_slice(&s.policy.to_le_bytes());
    a[8..16].copy_from_slice(&(s.flags as u64).to_le_bytes());
    a[16..20].copy_from_slice(&s.nice.to_le_bytes());
    a[20..24].copy_from_slice(&s.priority.to_le_bytes());
    a[24..32].copy_from_slice(&s.slice_ns.to_le_bytes());
    let at = sys.put(0, &a)?;
    sys.call(
        "sched_setattr",
        libc::SYS_sched_setattr,
        [0, at, 0, 0, 0, 0],
    )?;
    Ok(())
}

impl ProcessKind for Scheduling {
    fn name(&self) -> &'static str {
        "nice, scheduling policy, OOM score adjustment"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let read = |p: String| std::fs::read_to_string(&p).map_err(proc_err(pid, p));
        let adj: i32 = read(format!("/proc/{pid}/oom_score_adj"))?
            .trim()
            .parse()
            .unwrap_or(0);
        let ours: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if adj < ours && !crate::proc::have_cap(CAP_SYS_RESOURCE) {
            return Err(cx.refuse(format!(
                "an OOM score adjustment of {adj}, below cr-ebpf's {ours}: setting it again \
                 needs CAP_SYS_RESOURCE, which cr-ebpf lacks here"
            )));
        }
        p.oom_score_adj = adj;
        Ok(())
    }

    fn restore(&self, sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
        // The defaults, whatever the restorer runs with (its threads made
        // later inherit them).
        sys.call(
            "setpriority",
            libc::SYS_setpriority,
            [libc::PRIO_PROCESS as u64, 0, 0, 0, 0, 0],
        )?;
        let param = sys.put(0, &0i32.to_le_bytes())?;
        sys.call(
            "sched_setscheduler",
            libc::SYS_sched_setscheduler,
            [0, libc::SCHED_OTHER as u64, param, 0, 0, 0],
        )?;
        if p.oom_score_adj != 0 {
            let fd = sys.openat("/proc/self/oom_score_adj", libc::O_WRONLY | libc::O_CLOEXEC)?;
            let text = p.oom_score_adj.to_string();
            let at = sys.put(0, text.as_bytes())?;
            let r = sys.call(
                "write(oom_score_adj)",
                libc::SYS_write,
                [fd as u64, at, text.len() as u64, 0, 0, 0],
            );
            sys.close(fd)?;
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process::testing::save_with, sys::ask::Scripted};

    #[test]
    fn oom_score_adjustment_is_written_again_and_defaults_set_first() {
        save_with(
            &Scheduling,
            &Scripted::default(),
            None,
            &super::super::Changes::all(),
        );
        let rec = crate::sys::fake::Recording::new();
        Scheduling.restore(&rec, &ProcessInfo::default()).unwrap();
        assert_eq!(rec.names(), ["setpriority", "sched_setscheduler"]);
        let rec = crate::sys::fake::Recording::new();
        let p = ProcessInfo {
            oom_score_adj: 400,
            ..ProcessInfo::default()
        };
        Scheduling.restore(&rec, &p).unwrap();
        let w = rec.calls("write(oom_score_adj)")[0];
        assert_eq!(rec.memory("write(oom_score_adj)", 0, w[1], 3), b"400");
    }

    /// Thread ids of the test process, by gettid.
    fn gettid() -> i32 {
        // SAFETY: plain syscall.
        unsafe { libc::syscall(libc::SYS_gettid) as i32 }
    }

    #[test]
    fn a_threads_policy_nice_and_reset_on_fork_are_saved_and_set_again() {
        let me = std::process::id() as i32;
        let ours = nice(0).unwrap();
        // A thread of our own, made a batch thread with a higher nice value
        // and reset-on-fork (none of which takes a privilege).
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let mut a = [0u8; ATTR_LEN];
            a[0..4].copy_from_slice(&(ATTR_LEN as u32).to_le_bytes());
            a[4..8].copy_from_slice(&3u32.to_le_bytes());
            a[8..16].copy_from_slice(&1u64.to_le_bytes());
            a[16..20].copy_from_slice(&(ours + 3).min(19).to_le_bytes());
            // SAFETY: a valid sched_attr for this thread.
            let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, a.as_ptr(), 0) };
            tx.send((gettid(), r)).unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, r) = rx.recv().unwrap();
        assert_eq!(r, 0, "sched_setattr: {}", std::io::Error::last_os_error());
        let s = save_sched(me, tid).unwrap().unwrap();
        done_tx.send(()).unwrap();
        h.join().unwrap();
        assert_eq!(
            s,
            Sched {
                policy: 3,
                flags: SCHED_RESET_ON_FORK,
                nice: (ours + 3).min(19),
                priority: 0,
                slice_ns: 0,
            }
        );
        // Our own thread: the defaults.
        let plain = save_sched(me, gettid()).unwrap().unwrap();
        assert_eq!(
            (plain.policy, plain.flags, plain.nice, plain.slice_ns),
            (0, 0, ours, 0)
        );
        // A thread that is gone.
        assert_eq!(save_sched(me, i32::MAX - 1).unwrap(), None);

        let rec = crate::sys::fake::Recording::new();
        let rr = Sched {
            policy: 2,
            flags: SCHED_RESET_ON_FORK,
            nice: -4,
            priority: 3,
            slice_ns: 0,
        };
        restore_sched(&rec, &rr).unwrap();
        assert_eq!(rec.names(), ["setpriority", "sched_setattr"]);
        assert_eq!(rec.calls("setpriority")[0][2] as i64, -4);
        let at = rec.calls("sched_setattr")[0][1];
        let a = rec.memory("sched_setattr", 0, at, ATTR_LEN);
        assert_eq!(&a[0..4], &56u32.to_le_bytes());
        assert_eq!(&a[4..8], &2u32.to_le_bytes());
        assert_eq!(&a[8..16], &1u64.to_le_bytes());
        assert_eq!(&a[20..24], &3u32.to_le_bytes());
    }
}
