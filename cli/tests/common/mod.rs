//! Helpers shared by the command-line tests.

#![allow(dead_code, reason = "each test binary uses a part of them")]

use std::process::Command;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the test may run: root, or skip outside CI (a failure in CI).
pub fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!in_ci(), "{test} needs root, and CI=true: a failure in CI");
    eprintln!("SKIPPED {test}: needs root (eBPF, ptrace)");
    false
}

/// `program` with no descriptors but 0, 1, 2 (the harness leaks its own,
/// which a checkpoint rightly refuses as pipes to the outside).
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(program);
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    cmd
}
