//! Fault injection: freezes process `PID`, injects `getppid()` into its
//! thread number `THREAD` (0: the main one) through the rt_sigreturn
//! trampoline, stops after step `STEP` (0 to 4, see
//! `cr_ebpf_tracee::Step`) and dies by SIGKILL without letting anything
//! go, as cr-ebpf killed at that instant would.
//!
//! Usage: `inject_and_die PID THREAD STEP`

use cr_ebpf_tracee::{Frozen, Injector, Step};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("usage: inject_and_die PID THREAD STEP")
    };
    let (pid, thread, step) = (num(1) as i32, num(2), num(3));
    let frozen = Frozen::freeze(pid).expect("freezing the process");
    let injector = Injector::new(pid).expect("preparing injection");
    let Some(trampoline) = injector.trampoline() else {
        println!("no trampoline");
        return;
    };
    let t = &frozen.threads()[thread.min(frozen.threads().len() - 1)];
    let r = injector
        .call_until(t, libc::SYS_getppid, [0; 6], Step::ALL[step])
        .expect("injecting");
    println!(
        "trampoline {trampoline:#x}, stopped after {:?} ({r})",
        Step::ALL[step]
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: killing ourselves; nothing runs after.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
}
