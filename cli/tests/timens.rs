//! Restoring after the clocks went back (a reboot, another machine): the
//! process gets a time namespace whose CLOCK_MONOTONIC goes on from the
//! checkpoint's value. Simulated by moving the checkpoint's recorded clocks
//! 1000 s ahead of this machine's.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{clean, root};

const BIN: &str = env!("CARGO_BIN_EXE_cr-ebpf");

fn last_value(log: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let complete = &text[..text.rfind('\n')?];
    complete.lines().last()?.parse().ok()
}

#[test]
fn monotonic_time_goes_on_from_the_checkpoint_when_the_clocks_here_are_behind() {
    let test = "monotonic_time_goes_on_from_the_checkpoint_when_the_clocks_here_are_behind";
    if !root(test) {
        return;
    }
    let dir = common::fresh_dir("cr-ebpf-timens");
    let log = dir.join("log");
    let img = dir.join("image");
    let mut cmd = clean("python3");
    cmd.args([
        "-c",
        "import sys,time\n\
         while True:\n\
         \x20   open(sys.argv[1],'a').write('%.3f\\n' % time.monotonic())\n\
         \x20   time.sleep(0.05)",
    ])
    .arg(&log)
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while last_value(&log).is_none() {
        assert!(Instant::now() < deadline, "the workload did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(BIN)
        .args(["dump", "--pid", &pid.to_string(), "--images-dir"])
        .arg(&img)
        .output()
        .unwrap();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The checkpoint says its clocks were 1000 s ahead of ours.
    let mut m = cr_ebpf_image::Manifest::read(&img).unwrap();
    assert!(m.process.monotonic_ns > 0 && !m.process.boot_id.is_empty());
    m.process.monotonic_ns += 1000 * 1_000_000_000;
    m.process.boottime_ns += 1000 * 1_000_000_000;
    m.write(&img).unwrap();
    let ahead = m.process.monotonic_ns as f64 / 1e9;

    let report = dir.join("restore.err");
    let status = Command::new(BIN)
        .args(["restore", "--detach", "--images-dir"])
        .arg(&img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&report).unwrap())
        .status()
        .unwrap();
    let err = std::fs::read_to_string(&report).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("restored into a new time namespace"), "{err}");
    let restored: i32 = err
        .split("restored pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the restored pid");
    assert_eq!(restored, pid);
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let v = last_value(&log).unwrap_or(0.0);
        if v >= ahead {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the restored process's clock did not go on from {ahead:.3} s (last {v:.3})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(seen < ahead + 60.0, "{seen} against {ahead}");
    let ours = std::fs::read_link("/proc/self/ns/time").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{restored}/ns/time")).unwrap();
    assert_ne!(ours, theirs, "a time namespace of its own");
    // SAFETY: stopping the restored workload.
    unsafe { libc::kill(restored, libc::SIGKILL) };
    let _ = std::fs::remove_dir_all(&dir);
}
