//! The uffd-wp dirty tracker attached to another process: exactly the pages
//! it writes come back, and its descriptor table is left untouched.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

const PAGEWRITER: &str = env!("CARGO_BIN_EXE_pagewriter");

#[test]
fn attached_tracker_sees_exactly_the_pages_another_process_writes() {
    if !cr_ebpf_perf::privileged("attached_tracker_sees_exactly_the_pages_another_process_writes") {
        return;
    }
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(PAGEWRITER);
    cmd.arg("64").stdin(Stdio::piped()).stdout(Stdio::piped());
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    let base = u64::from_str_radix(line.trim().strip_prefix("ready 0x").unwrap(), 16).unwrap();
    let range = base..base + 64 * 4096;
    let fds_before: Vec<String> = fd_links(pid);

    let tracker = cr_ebpf_dirty_tracker::attach::attach(pid).expect("attach");
    assert_eq!(
        fd_links(pid),
        fds_before,
        "no descriptor left in the target"
    );
    tracker.register(range.clone()).expect("register");
    let mut write = |pages: &str| -> Vec<std::ops::Range<u64>> {
        writeln!(input, "w {pages}").unwrap();
        input.flush().unwrap();
        let mut ok = String::new();
        output.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "ok");
        let mut found = Vec::new();
        tracker.scan(range.clone(), &mut found).expect("scan");
        found
    };
    let page = |i: u64| base + i * 4096..base + (i + 1) * 4096;
    assert_eq!(write(""), vec![], "nothing written since registration");
    assert_eq!(write("3 7 40"), vec![page(3), page(7), page(40)]);
    assert_eq!(write(""), vec![], "the scan re-protected them");
    assert_eq!(
        write("7 8"),
        vec![page(7).start..page(8).end],
        "adjacent pages merge"
    );
    drop(input);
    assert!(child.wait().unwrap().success());
}

fn fd_links(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path()).unwrap().display()
            )
        })
        .collect();
    v.sort();
    v
}
