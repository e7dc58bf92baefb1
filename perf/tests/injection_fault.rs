//! An injected system call whose instruction faults (its address no longer
//! holds code: the process exec'd between finding the instruction and
//! using it) is an error, not a hang: before, the fault signal was held
//! back and the instruction ran again, for ever, with cr-ebpf waiting on
//! it. The thread gets its own registers back and runs on.

use std::{
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use cr_ebpf_perf::{spawn_clean, KillOnDrop};
use cr_ebpf_tracee::Tracee;

#[test]
fn a_faulting_injection_fails_and_leaves_the_thread_as_it_was() {
    if !cr_ebpf_perf::privileged("a_faulting_injection_fails_and_leaves_the_thread_as_it_was") {
        return;
    }
    let mut child = spawn_clean(
        Command::new("/bin/sleep")
            .arg("60")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = child.id() as i32;
    let _kill = KillOnDrop(pid);
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel();
    // In a thread of its own: a hang fails the test instead of blocking it.
    std::thread::spawn(move || {
        let t = Tracee::seize(pid).unwrap();
        t.interrupt().unwrap();
        let before = t.regs().unwrap();
        // A page nothing is mapped at.
        let r = t.inject_syscall(0x1000, libc::SYS_getpid, [0; 6]);
        let after = t.regs().unwrap();
        let same = (before.rip, before.rsp, before.rax) == (after.rip, after.rsp, after.rax);
        t.detach().unwrap();
        let _ = tx.send((r.map_err(|e| e.to_string()), same));
    });
    let (r, same) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the injection hung");
    let err = r.expect_err("a faulting instruction reported a result");
    assert!(err.contains("faulted"), "{err}");
    assert!(same, "the thread's registers were not put back");
    std::thread::sleep(Duration::from_millis(200));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("still there");
    let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
    assert_eq!(state, Some(Some('S')), "{stat}");
    let _ = child.kill();
    let _ = child.wait();
}
