//! Bytes waiting in a pseudo-terminal pair of the process (ZDTM pty00,
//! pty02): lines typed on the master and not read yet from the slave (one
//! ended by end-of-file, one incomplete), their echo and the slave's output
//! not read yet from the master. A dump that leaves the process running
//! does not take them from it, and a restored process reads the same.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// python3: a pair with queued bytes both ways; on `ctl/ask` it reads the
/// slave read by read (canonical), then ends the incomplete line and reads
/// it, then reads the master, and writes what each read returned.
const WORKLOAD: &str = r#"
import os, sys, time, fcntl, termios
ctl = sys.argv[1]
m, s = os.openpty()
# No echo: what the master reads does not depend on when the kernel
# processes the input.
t = termios.tcgetattr(s)
t[3] &= ~termios.ECHO
termios.tcsetattr(s, termios.TCSANOW, t)
for fd in (m, s):
    fcntl.fcntl(fd, fcntl.F_SETFL, os.O_NONBLOCK)
os.write(m, b'one\n')
os.write(m, b'two\x04')
os.write(m, b'\x04')
os.write(m, b'par')
os.write(s, b'out\n')
def reads(fd):
    out = []
    while True:
        try:
            b = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                b = os.read(fd, 4096)
            except BlockingIOError:
                return out
        out.append(b)
        if not b and fd == s and len(out) > 8:
            return out
def answer():
    a = reads(s)
    os.write(m, b'\n')
    time.sleep(0.05)
    a += [b'|'] + reads(s) + [b'|'] + reads(m)
    return repr(a)
open(os.path.join(ctl, 'ready'), 'w').close()
while True:
    if os.path.exists(os.path.join(ctl, 'ask')):
        with open(os.path.join(ctl, 'answer.tmp'), 'w') as f:
            f.write(answer())
        os.rename(os.path.join(ctl, 'answer.tmp'), os.path.join(ctl, 'answer'))
        os.unlink(os.path.join(ctl, 'ask'))
    time.sleep(0.02)
"#;

fn start(s: &Scratch, name: &str) -> (std::process::Child, i32, std::path::PathBuf) {
    let ctl = s.0.join(name);
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", WORKLOAD])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = spawn_clean(&mut cmd);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let pid = child.id() as i32;
    (child, pid, ctl)
}

fn ask(ctl: &std::path::Path) -> String {
    std::fs::write(ctl.join("ask"), "").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    std::fs::read_to_string(ctl.join("answer")).unwrap()
}

#[test]
fn queued_terminal_bytes_stay_with_the_process_and_come_back() {
    if !cr_ebpf_perf::privileged("queued_terminal_bytes_stay_with_the_process_and_come_back") {
        return;
    }
    let s = Scratch::new("ptyq");
    // What a process that was never checkpointed reads.
    let (_c, pid, ctl) = start(&s, "plain");
    let _k = KillOnDrop(pid);
    let want = ask(&ctl);
    assert!(want.starts_with("[b'one\\n', b'two', b''"), "{want}");
    assert!(want.contains("b'par\\n'"), "{want}");
    assert!(want.ends_with("b'|', b'out\\r\\n']"), "{want}");

    // A dump that leaves the process running takes nothing from it.
    let (_c, pid, ctl) = start(&s, "left");
    let _k = KillOnDrop(pid);
    let opts = DumpOptions {
        leave_running: true,
        ..DumpOptions::default()
    };
    dump(pid, &s.0.join("img-left"), &opts).expect("dump --leave-running");
    assert_eq!(ask(&ctl), want, "after a dump that left it running");

    // A restored process reads the same.
    let (mut child, pid, ctl) = start(&s, "restored");
    let guard = KillOnDrop(pid);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), want, "after a restore");
}
