//! An injector outlives its stop only in `track`'s warm-up, which asks a
//! running process one question per stop: a process that replaces its
//! program between two stops must not get the next question through an
//! instruction that is no longer there (it would run whatever lies at
//! that address now). `Injector::intact` tells.

use std::{process::Command, time::Duration};

use cr_ebpf_perf::{spawn_clean, wait_for_file, KillOnDrop, Scratch};
use cr_ebpf_tracee::Injector;

#[test]
fn an_injector_is_no_longer_intact_once_the_process_execs() {
    if !cr_ebpf_perf::privileged("an_injector_is_no_longer_intact_once_the_process_execs") {
        return;
    }
    let s = Scratch::new("exec-injector");
    let ready = s.0.join("ready");
    let go = s.0.join("go");
    let mut child = spawn_clean(Command::new("/usr/bin/python3").arg("-c").arg(format!(
        "import os, time\n\
         open({ready:?}, 'w').write('1')\n\
         while not os.path.exists({go:?}): time.sleep(0.01)\n\
         os.execv('/bin/sleep', ['sleep', '60'])"
    )));
    let pid = child.id() as i32;
    let _g = KillOnDrop(pid);
    wait_for_file(&ready);
    let injector = Injector::new(pid).expect("an injector for python");
    assert!(injector.intact(), "nothing changed yet");
    std::thread::sleep(Duration::from_millis(200));
    assert!(injector.intact(), "still the same program");
    std::fs::write(&go, "1").unwrap();
    let exe = format!("/proc/{pid}/exe");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep")) {
        assert!(std::time::Instant::now() < deadline, "python did not exec");
        std::thread::sleep(Duration::from_millis(10));
    }
    // With address randomisation the new program's code lies elsewhere.
    // (Without it the same vDSO and libc may come back at the same
    // addresses, where the borrowed instructions then truly are.)
    let randomized = std::fs::read_to_string("/proc/sys/kernel/randomize_va_space")
        .is_ok_and(|v| v.trim() != "0");
    if randomized {
        assert!(
            !injector.intact(),
            "the process runs another program: the borrowed instructions are gone"
        );
    }
    // The exec is seen as soon as the new program is named; its libc
    // (where the instructions are borrowed) is mapped a moment later, and
    // sleep then sleeps.
    let stat = format!("/proc/{pid}/stat");
    while !std::fs::read_to_string(&stat)
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('S')))
    {
        assert!(std::time::Instant::now() < deadline, "sleep did not sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Injector::new(pid).expect("one for sleep").intact());
    let _ = child.kill();
    let _ = child.wait();
}
