//! Terminals, end to end: an interactive bash on a pseudo-terminal pair
//! whose master its parent holds comes back on a new pair with its
//! controlling terminal, foreground group, termios and window size, and
//! runs what is typed into the master; a shell job (a program on a
//! terminal the test holds outside the checkpoint) is refused without
//! `--shell-job` and comes back on the restorer's terminal with it.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// A terminal owner: opens a pair, makes the slave its controlling
/// terminal with a 33x101 window, keeps `/dev/tty` open on fd 9, runs an interactive bash on it as the
/// foreground job, copies what the master reads to `DIR/out` and writes
/// the contents of `DIR/cmd` (when it appears) into the master.
const OWNER: &str = r#"
import os, sys, termios, fcntl, struct, signal, select
d = sys.argv[1]
m, s = os.openpty()
fcntl.ioctl(s, termios.TIOCSCTTY, 0)
fcntl.ioctl(s, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
tty = os.open("/dev/tty", os.O_RDWR)
os.dup2(tty, 9)
os.close(tty)
pid = os.fork()
if pid == 0:
    os.close(m)
    os.close(9)
    for n in range(3):
        os.dup2(s, n)
    os.close(s)
    os.setpgid(0, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    fcntl.ioctl(0, termios.TIOCSPGRP, struct.pack("i", os.getpid()))
    signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    os.execv("/bin/bash", ["bash", "--norc", "--noprofile", "-i"])
os.close(s)
out = open(d + "/out", "ab", buffering=0)
with open(d + "/info.tmp", "w") as f:
    f.write("%d\n" % pid)
os.rename(d + "/info.tmp", d + "/info")
while True:
    r, _, _ = select.select([m], [], [], 0.02)
    if r:
        out.write(os.read(m, 4096))
    try:
        cmd = open(d + "/cmd", "rb").read()
        os.unlink(d + "/cmd")
        os.write(m, cmd)
    except FileNotFoundError:
        pass
"#;

fn stat(pid: i32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// (pgid, sid, tty_nr, tpgid) of `pid`.
fn ids(pid: i32) -> (i32, i32, i32, i32) {
    let f = stat(pid);
    let n = |i: usize| f[i].parse().unwrap();
    (n(2), n(3), n(4), n(5))
}

/// `tty_nr` of the terminal device `rdev`, in the kernel's encoding.
fn tty_nr(rdev: u64) -> i32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    ((major << 8) | (minor & 0xff) | ((minor & !0xff) << 12)) as i32
}

fn rdev(path: impl AsRef<Path>) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().rdev()
}

/// A duplicate of descriptor `fd` of `pid`.
fn grab(pid: i32, fd: i32) -> OwnedFd {
    // SAFETY: plain syscalls; the results are checked.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(pidfd >= 0, "pidfd_open");
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0);
        libc::close(pidfd as i32);
        assert!(got >= 0, "pidfd_getfd");
        OwnedFd::from_raw_fd(got as i32)
    }
}

/// The termios (`TCGETS2`) and window size of the terminal of `fd`.
fn settings(fd: &OwnedFd) -> (Vec<u8>, [u16; 4]) {
    let mut t = [0u8; 44];
    let mut w = [0u16; 4];
    // SAFETY: TCGETS2 writes 44 bytes, TIOCGWINSZ four u16.
    unsafe {
        assert_eq!(
            libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, t.as_mut_ptr()),
            0
        );
        assert_eq!(
            libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, w.as_mut_ptr()),
            0
        );
    }
    (t.to_vec(), w)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn output(dir: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join("out")).unwrap_or_default()).into_owned()
}

/// Types `line` into the master (through the owner) and waits for `want`
/// in what the master read.
fn type_line(dir: &Path, line: &str, want: &str) {
    std::fs::write(dir.join("cmd.tmp"), format!("{line}\n")).unwrap();
    std::fs::rename(dir.join("cmd.tmp"), dir.join("cmd")).unwrap();
    wait_for(want, || output(dir).contains(want));
}

/// A dump, tried again while bytes are still in flight between bash and
/// the owner (a terminal's queues are refused, not read).
fn dump_when_quiet(pid: i32, img: &Path, opts: &DumpOptions) {
    for _ in 0..50 {
        match dump(pid, img, opts) {
            Ok(_) => return,
            Err(e) if e.to_string().contains("waiting to be read") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("dump: {e}"),
        }
    }
    panic!("the terminal never went quiet");
}

#[test]
fn bash_on_a_pty_of_the_tree_comes_back_on_a_new_pair_and_runs_what_is_typed() {
    if !cr_ebpf_perf::privileged(
        "bash_on_a_pty_of_the_tree_comes_back_on_a_new_pair_and_runs_what_is_typed",
    ) {
        return;
    }
    let s = Scratch::new("terminals-bash");
    let dir = s.0.clone();
    let mut child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", OWNER])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let owner = child.id() as i32;
    let _g = KillOnDrop(owner);
    cr_ebpf_perf::wait_for_file(&dir.join("info"));
    let bash: i32 = std::fs::read_to_string(dir.join("info"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _b = KillOnDrop(bash);
    type_line(&dir, "echo before-$((2+3))", "before-5");
    let before = ids(bash);
    assert_eq!(before.0, bash, "bash leads its job's group");
    assert_eq!(before.1, owner, "in the owner's session");
    assert_eq!(before.3, bash, "the foreground job");
    let master = grab(owner, 3);
    let (termios, winsize) = settings(&master);
    drop(master);
    assert_eq!(&winsize[..2], &[33, 101]);

    let img = dir.join("img");
    dump_when_quiet(owner, &img, &DumpOptions::default());
    let _ = child.wait();
    wait_for("bash to go", || {
        !Path::new(&format!("/proc/{bash}")).exists()
    });

    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(r.pid, owner);
    let after = ids(bash);
    assert_ne!(after.2, 0, "bash has a controlling terminal");
    assert_eq!(
        after.2,
        tty_nr(rdev(format!("/proc/{bash}/fd/0"))),
        "its controlling terminal is the terminal on its fd 0"
    );
    assert_eq!((after.0, after.1, after.3), (bash, owner, bash));
    let master = grab(owner, 3);
    assert_eq!(
        settings(&master),
        (termios, winsize),
        "termios and window size"
    );
    drop(master);
    type_line(&dir, "echo after-$((6*7))", "after-42");
    // The owner's /dev/tty is open again, on the new terminal.
    let tty = std::fs::read_link(format!("/proc/{owner}/fd/9")).unwrap();
    assert_eq!(tty, Path::new("/dev/tty"));
    let mut dev: libc::c_uint = 0;
    // SAFETY: TIOCGDEV writes one unsigned int.
    let r = unsafe { libc::ioctl(grab(owner, 9).as_raw_fd(), libc::TIOCGDEV, &mut dev) };
    assert_eq!(
        (r, dev as i32),
        (0, after.2),
        "/dev/tty is the new terminal"
    );
}

/// A shell on a terminal the test holds (outside the checkpoint) and its
/// foreground job, which prints `ready`, then answers each line it reads
/// with `got LINE`.
const SHELL: &str = r#"
import os, signal, time
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.execv("/usr/bin/python3", ["python3", "-c", JOB])
try:
    os.setpgid(pid, pid)
except PermissionError:
    pass  # the child has exec'd: it made its group itself
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
os.tcsetpgrp(0, pid)
os.waitpid(pid, 0)
"#;

const JOB: &str = r#"
import os, sys, time
while os.tcgetpgrp(0) != os.getpgrp():
    time.sleep(0.01)
print("ready", flush=True)
for line in sys.stdin:
    print("got " + line.strip(), flush=True)
"#;

/// A new pseudo-terminal pair of ours: (master, slave path).
fn pair() -> (OwnedFd, PathBuf) {
    // SAFETY: posix_openpt and friends on a new descriptor we own.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut n: libc::c_int = 0;
        assert_eq!(libc::ioctl(m, libc::TIOCGPTN, &mut n), 0);
        (
            OwnedFd::from_raw_fd(m),
            PathBuf::from(format!("/dev/pts/{n}")),
        )
    }
}

/// `cmd` in a session of its own whose controlling terminal and stdio are
/// the slave `slave`.
fn on_terminal<'a>(cmd: &'a mut Command, slave: &Path) -> &'a mut Command {
    use std::os::unix::process::CommandExt as _;
    let path = std::ffi::CString::new(slave.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: async-signal-safe calls only between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for n in 0..3 {
                libc::dup2(fd, n);
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

/// Reads what `master` has until `want` shows up.
fn read_until(master: &OwnedFd, want: &str) -> String {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&got).contains(want) {
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {:?}",
            String::from_utf8_lossy(&got)
        );
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut buf = [0u8; 4096];
        // SAFETY: poll and read into our buffer.
        unsafe {
            if libc::poll(&mut pfd, 1, 100) == 1 {
                let n = libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
                if n > 0 {
                    got.extend_from_slice(&buf[..n as usize]);
                }
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: writing our buffer to our descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, bytes.len() as isize);
}

#[test]
fn a_shell_job_is_refused_without_the_option_and_restored_on_our_terminal_with_it() {
    if !cr_ebpf_perf::privileged(
        "a_shell_job_is_refused_without_the_option_and_restored_on_our_terminal_with_it",
    ) {
        return;
    }
    let cr = Path::new(env!("CARGO_BIN_EXE_ticker")).with_file_name("cr-ebpf");
    if !cr.exists() {
        assert!(
            !cr_ebpf_perf::in_ci(),
            "{} missing: build the workspace",
            cr.display()
        );
        eprintln!("SKIPPED: {} not built", cr.display());
        return;
    }
    let s = Scratch::new("terminals-shell-job");
    // The job runs on our terminal 1, in the session its shell leads.
    let (m1, slave1) = pair();
    let script = SHELL.replace("JOB", &format!("{JOB:?}"));
    let mut shell = on_terminal(
        Command::new("/usr/bin/python3").args(["-c", &script]),
        &slave1,
    )
    .spawn()
    .expect("start the shell");
    let sh = shell.id() as i32;
    let _sg = KillOnDrop(sh);
    read_until(&m1, "ready");
    let job: i32 = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _jg = KillOnDrop(job);
    let before = ids(job);
    assert_eq!(before.1, sh, "the job is in the shell's session");
    assert_eq!(before.2, tty_nr(rdev(&slave1)));

    let img = s.0.join("img");
    let err = dump(job, &img, &DumpOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not supported") && err.contains("--shell-job"),
        "{err}"
    );
    assert!(!img.exists());
    write_all(&m1, b"still\n");
    read_until(&m1, "got still");

    let opts = DumpOptions {
        shell_job: true,
        ..DumpOptions::default()
    };
    dump(job, &img, &opts).expect("dump --shell-job");
    // Gone, or a zombie (read once: it may be reaped meanwhile).
    wait_for("the job to go", || {
        std::fs::read_to_string(format!("/proc/{job}/stat")).map_or(true, |s| {
            s[s.rfind(')').unwrap_or(0) + 2..].starts_with('Z')
        })
    });
    let _ = shell.wait();

    // Without --shell-job the restore is refused; with it, the job joins
    // the restorer's session on our terminal 2.
    let (m2, slave2) = pair();
    let out = Command::new(&cr)
        .args(["restore", "--images-dir"])
        .arg(&img)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shell-job"));
    let mut restorer = on_terminal(
        Command::new(&cr)
            .args(["restore", "--shell-job", "--images-dir"])
            .arg(&img),
        &slave2,
    )
    .spawn()
    .expect("start cr-ebpf restore");
    let _rg = KillOnDrop(restorer.id() as i32);
    // Restored and let go: not traced, and its own program again (the
    // restore's stub, with that pid before, was a copy of cr-ebpf).
    wait_for("the job to come back", || {
        let exe = std::fs::read_link(format!("/proc/{job}/exe")).unwrap_or_default();
        std::fs::read_to_string(format!("/proc/{job}/status"))
            .is_ok_and(|t| t.contains("TracerPid:\t0\n") && !t.contains("State:\tZ"))
            && !exe.to_string_lossy().contains("cr-ebpf")
    });
    let cr_pid = restorer.id() as i32;
    let after = ids(job);
    assert_eq!(after.1, cr_pid, "in the restorer's session");
    assert_eq!(after.0, job, "leading its own group again");
    assert_eq!(after.2, tty_nr(rdev(&slave2)), "on the restorer's terminal");
    assert_eq!(rdev(format!("/proc/{job}/fd/0")), rdev(&slave2));
    assert_eq!(after.3, job, "the foreground job, as it was");
    write_all(&m2, b"again\n");
    read_until(&m2, "got again");
    // SAFETY: plain kill.
    unsafe { libc::kill(job, libc::SIGKILL) };
    let _ = restorer.wait();
}
