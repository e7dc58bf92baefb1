//! Files whose name is gone and pipes whose other side is gone, through a
//! real dump and restore: a deleted sparse file held open and mapped
//! (ZDTM `ghost_holes*`, `unlink_mmap*`), a named FIFO with bytes in
//! flight (ZDTM `fifo*`), a pipe whose writer closed (ZDTM `pstree`,
//! `xids00`), and signal-driven I/O on a pipe (ZDTM `file_fown`).
//!
//! Each workload waits for a `go` file in its control directory after the
//! restore, then reports what it sees in files written whole (renamed into
//! place).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, wait_for_file, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Python helpers every workload starts with: `ctl`, `say(name, bytes)`
/// (written whole), `wait(name)`.
const PRELUDE: &str = r#"
import os, sys, time
ctl = sys.argv[1]
def say(name, data):
    tmp = os.path.join(ctl, "." + name)
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(ctl, name))
def wait(name):
    while not os.path.exists(os.path.join(ctl, name)):
        time.sleep(0.02)
"#;

/// Starts `body` (after [`PRELUDE`]) with its control directory; returns
/// it once it said `ready`.
fn start(s: &Scratch, body: &str) -> (std::process::Child, PathBuf) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", &format!("{PRELUDE}{body}")])
            .arg(&ctl)
            .current_dir(&s.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_file(&ctl.join("ready"));
    (child, ctl)
}

/// Dumps (killing it) and restores the workload; returns the restored pid.
fn dump_restore(s: &Scratch, mut child: std::process::Child) -> (i32, KillOnDrop) {
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid, "same pid");
    (r.pid, KillOnDrop(r.pid))
}

/// What the workload said in `name`, after `go`.
fn answer(ctl: &Path, name: &str) -> Vec<u8> {
    std::fs::write(ctl.join("go"), b"").unwrap();
    wait_for_file(&ctl.join(name));
    std::fs::read(ctl.join(name)).unwrap()
}

fn link(pid: i32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap()
        .display()
        .to_string()
}

fn fdinfo_pos(pid: i32, fd: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("pos:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// An 8 MiB file with data at both ends and a hole between, open at 9,
/// mapped shared, unlinked.
const GHOST: &str = r#"
import mmap
SIZE = 8 << 20
fd = os.open("ghost.data", os.O_RDWR | os.O_CREAT, 0o640)
os.pwrite(fd, b"head", 0)
os.pwrite(fd, b"tail", SIZE - 4)
os.dup2(fd, 9); os.close(fd); fd = 9
m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.lseek(fd, 5, os.SEEK_SET)
os.unlink("ghost.data")
say("ready", b"")
wait("go")
m[0:4] = b"HEAD"
say("seen", bytes(m[SIZE - 4:SIZE]) + os.pread(fd, 4, 0))
while True:
    time.sleep(0.05)
"#;

#[test]
fn a_deleted_sparse_file_open_and_mapped_comes_back_deleted_with_its_holes() {
    if !cr_ebpf_perf::privileged(
        "a_deleted_sparse_file_open_and_mapped_comes_back_deleted_with_its_holes",
    ) {
        return;
    }
    let s = Scratch::new("files-ghost");
    let (child, ctl) = start(&s, GHOST);
    let pid = child.id() as i32;
    let name = s.0.join("ghost.data").display().to_string();
    assert_eq!(link(pid, 9), format!("{name} (deleted)"));
    let (pid, _k) = dump_restore(&s, child);
    assert_eq!(link(pid, 9), format!("{name} (deleted)"), "deleted again");
    assert!(!Path::new(&name).exists(), "its name stays gone");
    assert_eq!(fdinfo_pos(pid, 9), 5, "at its position");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains(" rw-s ") && l.ends_with(&format!("{name} (deleted)"))),
        "mapped shared from the deleted file:\n{maps}"
    );
    // Its contents, and the hole in the middle is a hole.
    let f = std::fs::File::open(format!("/proc/{pid}/fd/9")).unwrap();
    use std::os::{fd::AsRawFd as _, unix::fs::FileExt as _};
    let meta = f.metadata().unwrap();
    assert_eq!(
        (meta.len(), meta.permissions().mode() & 0o777),
        (8 << 20, 0o640)
    );
    // SAFETY: lseek on our descriptor.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(hole > 0 && hole < (8 << 20) - 4096, "a hole at {hole}");
    // SAFETY: as above.
    let data = unsafe { libc::lseek(f.as_raw_fd(), hole, libc::SEEK_DATA) };
    assert!(
        data >= (8 << 20) - 4096,
        "data again only at the end ({data})"
    );
    // The mapping and the descriptor are the same file.
    assert_eq!(answer(&ctl, "seen"), b"tailHEAD");
    let mut head = [0u8; 4];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"HEAD");
}

/// A FIFO read at 5 and written at 6, with bytes in flight.
const FIFO: &str = r#"
os.mkfifo("f", 0o600)
r = os.open("f", os.O_RDONLY | os.O_NONBLOCK)
w = os.open("f", os.O_WRONLY)
os.dup2(r, 5); os.dup2(w, 6); os.close(r); os.close(w)
os.write(6, b"in flight")
say("ready", b"")
wait("go")
got = os.read(5, 100)
os.close(6)
say("got", got + b"|" + os.read(5, 100))
while True:
    time.sleep(0.05)
"#;

#[test]
fn a_fifo_pair_comes_back_with_its_bytes_in_flight() {
    if !cr_ebpf_perf::privileged("a_fifo_pair_comes_back_with_its_bytes_in_flight") {
        return;
    }
    let s = Scratch::new("files-fifo");
    let (child, ctl) = start(&s, FIFO);
    let (pid, _k) = dump_restore(&s, child);
    let path = s.0.join("f").display().to_string();
    assert_eq!((link(pid, 5), link(pid, 6)), (path.clone(), path));
    // The bytes, then end of file once its writer is closed: no reader or
    // writer of the restorer's is left.
    assert_eq!(answer(&ctl, "got"), b"in flight|");
}

/// A pipe whose write end it closed after writing.
const CLOSED_WRITER: &str = r#"
r, w = os.pipe()
os.write(w, b"last words")
os.close(w)
os.dup2(r, 7); os.close(r)
say("ready", b"")
wait("go")
got = b""
while True:
    b = os.read(7, 100)
    if not b:
        break
    got += b
say("got", got)
while True:
    time.sleep(0.05)
"#;

#[test]
fn a_pipe_whose_writer_closed_reads_its_bytes_then_end_of_file() {
    if !cr_ebpf_perf::privileged("a_pipe_whose_writer_closed_reads_its_bytes_then_end_of_file") {
        return;
    }
    let s = Scratch::new("files-pipe");
    let (child, ctl) = start(&s, CLOSED_WRITER);
    let (_pid, _k) = dump_restore(&s, child);
    assert_eq!(answer(&ctl, "got"), b"last words", "then end of file");
}

/// A pipe read end with O_ASYNC, owned by the process, signal SIGUSR2.
const ASYNC: &str = r#"
import fcntl, signal
got = []
signal.signal(signal.SIGUSR2, lambda n, f: got.append(n))
r, w = os.pipe()
os.dup2(r, 5); os.dup2(w, 6); os.close(r); os.close(w)
F_SETSIG = 10
fcntl.fcntl(5, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
fcntl.fcntl(5, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(5, F_SETSIG, signal.SIGUSR2)
say("ready", b"")
while not got:
    time.sleep(0.02)
say("signal", str(got[0]).encode() + b" " + os.read(5, 10))
while True:
    time.sleep(0.05)
"#;

#[test]
fn signal_driven_io_keeps_its_owner_and_signal() {
    if !cr_ebpf_perf::privileged("signal_driven_io_keeps_its_owner_and_signal") {
        return;
    }
    let s = Scratch::new("files-async");
    let (child, ctl) = start(&s, ASYNC);
    let (pid, _k) = dump_restore(&s, child);
    // Bytes arriving in the pipe: the kernel signals its owner.
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/6"))
        .and_then(|mut w| std::io::Write::write_all(&mut w, b"ping"))
        .unwrap();
    wait_for_file(&ctl.join("signal"));
    let said = std::fs::read(ctl.join("signal")).unwrap();
    assert_eq!(said, format!("{} ping", libc::SIGUSR2).into_bytes());
}
