//! Zombies of a tree: each stub is made to end as the process did (an exit
//! status, or death by a signal), and its parent reaps it later.

use std::time::{Duration, Instant};

use cr_ebpf_resources::sys::{Injected, Sys as _, PAGE};
use cr_ebpf_tracee::Tracee;

use crate::{
    stub::{self, KillGuard},
    RestoreError,
};

/// Makes the stub `t` of zombie `pid` end with wait status `status`: an
/// exit code by `exit_group`; a signal sent to itself with the signal's
/// default action, unblocked, and core dumps off (a status that says a core
/// was dumped is refused at checkpoint time).
pub(crate) fn exit_as_zombie(
    pid: i32,
    status: i32,
    t: Tracee,
    mut guard: KillGuard,
    tramp: u64,
) -> Result<(), RestoreError> {
    let sig = status & 0x7f;
    if status & 0x80 != 0 {
        return Err(RestoreError::NotSupported(format!(
            "zombie {pid} dumped core when signal {sig} killed it"
        )));
    }
    if sig == 0 || sig == libc::SIGKILL {
        let (name, nr, args) = if sig == 0 {
            let code = ((status >> 8) & 0xff) as u64;
            ("exit_group", libc::SYS_exit_group, [code, 0, 0, 0, 0, 0])
        } else {
            let kill = [pid as u64, libc::SIGKILL as u64, 0, 0, 0, 0];
            ("kill", libc::SYS_kill, kill)
        };
        let r = stub::stub_syscall(&t, tramp, name, nr, args);
        if !matches!(r, Err(RestoreError::Build { .. })) {
            return Err(RestoreError::stub(format!(
                "zombie {pid} did not exit: {r:?}"
            )));
        }
        t.forget();
        guard.disarm();
        return Ok(());
    }
    let s = Injected::new(&t, pid, tramp, tramp + PAGE);
    // struct sigaction of the kernel: handler SIG_DFL, flags, restorer, mask.
    let act = s.put(0, &[0u8; 32])?;
    s.call(
        "rt_sigaction",
        libc::SYS_rt_sigaction,
        [sig as u64, act, 0, 8, 0, 0],
    )?;
    s.call(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        [libc::PR_SET_DUMPABLE as u64, 0, 0, 0, 0, 0],
    )?;
    let mask = s.put(32, &(!(1u64 << (sig - 1))).to_le_bytes())?;
    s.call(
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        [libc::SIG_SETMASK as u64, mask, 0, 8, 0, 0],
    )?;
    s.call("kill", libc::SYS_kill, [pid as u64, sig as u64, 0, 0, 0, 0])?;
    // Let go, it dies of the signal pending.
    guard.disarm();
    t.detach().map_err(|source| RestoreError::Build {
        what: format!("letting zombie {pid} die of signal {sig}"),
        source,
    })?;
    wait_dead(pid, status)
}

/// Waits until `pid` is a zombie with wait status `status`.
fn wait_dead(pid: i32, status: i32) -> Result<(), RestoreError> {
    let start = Instant::now();
    loop {
        let st = cr_ebpf_resources::proc::stat(pid).ok();
        match st {
            Some(st) if st.state == 'Z' && st.exit_code == status => return Ok(()),
            Some(st) if st.state == 'Z' => {
                return Err(RestoreError::stub(format!(
                    "zombie {pid} ended with status {:#x}, not {status:#x}",
                    st.exit_code
                )))
            }
            _ if start.elapsed() > Duration::from_secs(5) => {
                return Err(RestoreError::stub(format!(
                    "zombie {pid} did not die of signal {}",
                    status & 0x7f
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
