//! Privileged round trips of the descriptor kinds beyond files and pipes:
//! an established TCP connection (through TCP_REPAIR, with unread data in
//! its receive queue), a TCP listener, a UDP socket, unix socket pairs with
//! queued messages, an epoll set, an eventfd, a timerfd, a signalfd and
//! POSIX timers (ids, clocks, remaining time), all in the `fdkinds` workload. And what is not supported yet is refused
//! before anything is frozen for long, with the process left running.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpError, DumpOptions};
use cr_ebpf_image::{FdKind, FdState};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const FDKINDS: &str = env!("CARGO_BIN_EXE_fdkinds");

struct Control {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl Control {
    fn connect(port: u16) -> Self {
        let out = TcpStream::connect(("127.0.0.1", port)).expect("connect to the workload");
        out.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let input = BufReader::new(out.try_clone().unwrap());
        Self { out, input }
    }

    fn send(&mut self, line: &str) {
        self.out.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.input
            .read_line(&mut l)
            .expect("an answer from the workload");
        l.trim().to_string()
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }
}

/// The `fdkinds` workload started (a child of ours) with `args`: the child,
/// a guard that kills it, and its TCP and UDP ports.
fn start_fdkinds(args: &[&std::path::Path]) -> (std::process::Child, KillOnDrop, u16, u16) {
    let mut child = spawn_clean(
        Command::new(FDKINDS)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let guard = KillOnDrop(child.id() as i32);
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    let f: Vec<&str> = ready.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"ready"), "{ready:?}");
    (child, guard, f[1].parse().unwrap(), f[2].parse().unwrap())
}

/// A full dump of `pid` into `img`, the process killed after it.
fn dump_killing(
    pid: i32,
    img: &std::path::Path,
) -> Result<cr_ebpf_checkpoint::DumpReport, DumpError> {
    dump(
        pid,
        img,
        &DumpOptions {
            leave_running: false,
            threads: 0,
            shell_job: false,
            ghost_limit: 0,
            shm_limit: 0,
            freeze_limit: None,
            no_precopy: false,
            network_lock: None,
            ext_unix_sk: false,
        },
    )
}

/// Runs the python3 `script` with a control directory (and `args`): the
/// script writes `CTL/ready`, waits for `CTL/check`, then writes its verdict
/// to `CTL/out`. Once it is ready it is dumped (and killed), `between` runs
/// on the image and the control directory, and it is restored and asked for
/// its verdict, which is returned.
fn python_round_trip(
    scratch: &Scratch,
    script: &str,
    args: &[&std::path::Path],
    between: impl FnOnce(&std::path::Path, &std::path::Path),
) -> String {
    let img = scratch.0.join("image");
    let ctl = scratch.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new("python3")
            .args(["-c", script])
            .arg(&ctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    let wait = |file: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ctl.join(file).exists() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("ready", "python did not start");
    dump_killing(pid, &img).expect("dump");
    let _ = child.wait();
    drop(guard);
    between(&img, &ctl);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _guard = KillOnDrop(r.pid);
    std::fs::write(ctl.join("check"), b"").unwrap();
    wait("out", "the restored process did not answer");
    std::fs::read_to_string(ctl.join("out")).unwrap()
}

fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 2..].chars().next())
        .unwrap_or('?')
}

#[test]
fn sockets_epoll_eventfd_timerfd_signalfd_round_trip() {
    if !cr_ebpf_perf::privileged("sockets_epoll_eventfd_timerfd_signalfd_round_trip") {
        return;
    }
    let scratch = Scratch::new("fdk-all");
    let img = scratch.0.join("image");
    let watch = scratch.0.join("watch");
    let (mut child, guard, tcp_port, udp_port) = start_fdkinds(&[&watch]);
    let pid = child.id() as i32;
    let started = Instant::now();

    let mut c = Control::connect(tcp_port);
    assert_eq!(c.ask("ping"), "pong");
    // The workload sleeps; our next command waits unread in its socket's
    // receive queue while it is checkpointed.
    c.send("sleep 300");
    c.send("ping");
    std::thread::sleep(Duration::from_millis(100));
    let d = dump_killing(pid, &img).expect("dump");
    assert!(d.pages > 0);
    // What the image holds: one of each kind, and the unread command in
    // the connection's receive queue.
    let m = cr_ebpf_image::Manifest::read(&img).expect("the manifest");
    let kinds: Vec<FdKind> = m.fds.iter().map(|f| f.kind).collect();
    for k in [
        FdKind::Epoll,
        FdKind::EventFd,
        FdKind::TimerFd,
        FdKind::SignalFd,
        FdKind::Socket,
        FdKind::Inotify,
        FdKind::Pidfd,
    ] {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    let queued: Vec<Vec<u8>> = m
        .fds
        .iter()
        .filter_map(|f| match &f.state {
            FdState::Socket(s) => s.tcp.as_ref().map(|t| t.recv_queue.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        queued,
        vec![b"ping\n".to_vec()],
        "one connection, its unread command"
    );
    let _ = child.wait();
    drop(guard);

    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, pid);
    let _guard = KillOnDrop(r.pid);
    // The same connection goes on: the queued command is answered.
    assert_eq!(c.line(), "slept");
    assert_eq!(c.line(), "pong", "the command queued at checkpoint time");
    assert_eq!(c.ask("ping"), "pong");
    assert_eq!(c.ask("eventfd"), "eventfd 5");
    let t = c.ask("timer");
    let v: Vec<i64> = t
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let elapsed = started.elapsed().as_millis() as i64;
    assert_eq!(v[1], 7000, "interval: {t}");
    assert!(
        v[0] <= 30_000 && v[0] >= 30_000 - elapsed - 2000,
        "remaining time {t} after {elapsed} ms"
    );
    // POSIX timers: the same ids, counting down from where they were.
    let pt = c.ask("ptimers");
    let timers: Vec<Vec<i64>> = pt
        .trim_start_matches("ptimers ")
        .split(',')
        .map(|t| t.split(':').map(|x| x.parse().unwrap()).collect())
        .collect();
    let elapsed = started.elapsed().as_millis() as i64;
    assert_eq!(timers.len(), 2, "{pt}");
    assert_eq!((timers[0][0], timers[1][0]), (1, 2), "timer ids: {pt}");
    assert!(
        timers[0][1] > 0 || elapsed >= 3000,
        "the 3 s timer is still armed: {pt}"
    );
    assert_eq!(timers[1][2], 3000, "interval: {pt}");
    assert!(
        timers[1][1] <= 40_000 && timers[1][1] >= 40_000 - elapsed - 2000,
        "the 40 s timer after {elapsed} ms: {pt}"
    );
    assert_eq!(
        c.ask("pidfd"),
        format!("pidfd {} 0", std::process::id()),
        "the pidfd on its parent"
    );
    assert_eq!(c.ask("pair"), "pair hello,world");
    assert_eq!(c.ask("stream"), "stream stream-bytes");
    // The listener, the UDP socket and the signalfd, through the epoll set.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"udp-hi", ("127.0.0.1", udp_port)).unwrap();
    // The inotify watch left (descriptor 2, on watch/b) sees a new file.
    std::fs::write(watch.join("b").join("new-file"), b"x").unwrap();
    std::fs::write(watch.join("a").join("unwatched"), b"x").unwrap();
    // SAFETY: signalling the restored workload.
    unsafe { libc::kill(r.pid, libc::SIGUSR1) };
    let mut second = Control::connect(tcp_port);
    assert_eq!(second.ask("ping"), "pong");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = c.ask("events");
        // usr2: the 3 s POSIX timer fired in the restored process.
        if e == "events usr1=1 usr2=1 udp=udp-hi accepted=2 inotify=2:new-file" {
            break;
        }
        assert!(Instant::now() < deadline, "events after restore: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_can_be_closed_instead_of_restored() {
    if !cr_ebpf_perf::privileged("connections_can_be_closed_instead_of_restored") {
        return;
    }
    let scratch = Scratch::new("fdk-close");
    let img = scratch.0.join("image");
    let (mut child, guard, tcp_port, _) = start_fdkinds(&[]);
    let pid = child.id() as i32;
    let mut c = Control::connect(tcp_port);
    assert_eq!(c.ask("ping"), "pong");
    dump_killing(pid, &img).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(
        &img,
        &RestoreOptions {
            close_connections: true,
            ..RestoreOptions::default()
        },
    )
    .expect("restore");
    let _guard = KillOnDrop(r.pid);
    // The old connection is reset, not left hanging.
    let mut buf = String::new();
    let got = c.input.read_line(&mut buf);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(got, Ok(0)),
        "the closed connection: {got:?} {buf:?}"
    );
    // The process runs on and takes new connections.
    let mut fresh = Control::connect(tcp_port);
    assert_eq!(fresh.ask("ping"), "pong");
    let e = fresh.ask("events");
    assert!(e.contains(" accepted=2 "), "{e}");
}

#[test]
fn an_unsupported_descriptor_is_named_and_the_process_keeps_running() {
    if !cr_ebpf_perf::privileged("an_unsupported_descriptor_is_named_and_the_process_keeps_running")
    {
        return;
    }
    let scratch = Scratch::new("fdk-unsupported");
    let img = scratch.0.join("image");
    // python3 holding a userfaultfd.
    let mut child = spawn_clean(
        Command::new("python3")
            .args([
                "-c",
                "import ctypes,sys,time\n\
                 fd=ctypes.CDLL(None).syscall(323, 0)\n\
                 print(fd,flush=True)\n\
                 time.sleep(60)",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let fd: i32 = line.trim().parse().expect("the userfaultfd descriptor");
    let err = dump_killing(pid, &img).unwrap_err();
    assert!(matches!(err, DumpError::NotSupportedFd { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("not supported: [userfaultfd] on fd {fd} of pid {pid}")
    );
    assert!(!img.exists(), "nothing published");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        matches!(state(pid), 'S' | 'R'),
        "the process runs on, state {}",
        state(pid)
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Shared anonymous memory and a memfd (two mappings of it, contents
/// beyond them written through the descriptor, seals) in python3: after a
/// round trip the contents, the sharing between the two mappings, the
/// seals and the `/dev/zero (deleted)` name are all back.
#[test]
fn shared_anonymous_memory_and_memfds_round_trip() {
    if !cr_ebpf_perf::privileged("shared_anonymous_memory_and_memfds_round_trip") {
        return;
    }
    let scratch = Scratch::new("fdk-shm");
    let script = r#"
import fcntl, mmap, os, sys, time
ctl = sys.argv[1]
m = mmap.mmap(-1, 3 * 4096, flags=mmap.MAP_SHARED)
m[0:11] = b'anon-shared'
m[8192:8196] = b'tail'
fd = os.memfd_create('buf', os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 16384)
os.pwrite(fd, b'via-write', 12288)
m2 = mmap.mmap(fd, 8192, flags=mmap.MAP_SHARED)
m3 = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, offset=4096)
m2[0:5] = b'world'
m2[4096:4100] = b'SAME'
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
if m[0:11] != b'anon-shared' or m[8192:8196] != b'tail': bad.append('anonymous contents')
if m2[0:5] != b'world' or m3[0:4] != b'SAME': bad.append('memfd contents')
if os.pread(fd, 9, 12288) != b'via-write': bad.append('memfd contents past the mappings')
m2[4100:4104] = b'LIVE'
if m3[4:8] != b'LIVE': bad.append('the two mappings no longer share')
if fcntl.fcntl(fd, fcntl.F_GET_SEALS) != fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK: bad.append('seals')
if not any('/dev/zero (deleted)' in l for l in open('/proc/self/maps')): bad.append('maps name')
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;
    let out = python_round_trip(&scratch, script, &[], |img, _| {
        let m = cr_ebpf_image::Manifest::read(img).unwrap();
        let kinds: Vec<_> = m.shmem.iter().map(|o| (o.kind, o.size)).collect();
        assert_eq!(m.shmem.len(), 2, "{kinds:?}");
    });
    assert_eq!(out, "ok");
}

/// Unix sockets beyond socket pairs: a named listener, a connection to it
/// accepted in the same process with bytes queued, a datagram pair with
/// messages queued, and an abstract-namespace datagram socket (python3).
/// After a round trip the queued data is there, in order and with message
/// boundaries, and the listener takes new connections on its path.
#[test]
fn named_and_datagram_unix_sockets_round_trip() {
    if !cr_ebpf_perf::privileged("named_and_datagram_unix_sockets_round_trip") {
        return;
    }
    let scratch = Scratch::new("fdk-unix");
    let path = scratch.0.join("listener.sock");
    let script = r#"
import os, socket, sys, time
ctl, path = sys.argv[1], sys.argv[2]
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(path); lst.listen(5)
cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); cli.connect(path)
srv, _ = lst.accept()
cli.sendall(b'queued-stream')
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
a.send(b'first'); a.send(b'second')
ab = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); ab.bind(b'\0cr-ebpf-test-' + str(os.getpid()).encode())
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
srv.settimeout(5); b.settimeout(5)
if srv.recv(100) != b'queued-stream': bad.append('stream queue')
if b.recv(100) != b'first' or b.recv(100) != b'second': bad.append('datagram queue')
srv.sendall(b'back'); cli.settimeout(5)
if cli.recv(100) != b'back': bad.append('stream pair')
lst.settimeout(5)
c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c2.connect(path)
s2, _ = lst.accept(); c2.sendall(b'new')
if s2.recv(100) != b'new': bad.append('listener')
if ab.getsockname() != b'\0cr-ebpf-test-' + str(os.getpid()).encode(): bad.append('abstract name')
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;
    let out = python_round_trip(&scratch, script, &[&path], |_, _| {});
    assert_eq!(out, "ok");
}

/// A System V shared memory segment attached by python3: removed after
/// the checkpoint (as a reboot would), it is made again with the same id
/// and contents and attached at the same address.
#[test]
fn system_v_shared_memory_round_trip() {
    if !cr_ebpf_perf::privileged("system_v_shared_memory_round_trip") {
        return;
    }
    let scratch = Scratch::new("fdk-sysv");
    let script = r#"
import ctypes, os, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
shmid = libc.shmget(0, 8192, 0o1000 | 0o600)
addr = libc.shmat(shmid, None, 0)
ctypes.memmove(addr, b'sysv-contents', 13)
ctypes.memmove(addr + 4096, b'page-two', 8)
with open(os.path.join(ctl, 'ready.tmp'), 'w') as f:
    f.write('%d %d' % (shmid, addr))
os.rename(os.path.join(ctl, 'ready.tmp'), os.path.join(ctl, 'ready'))
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
if ctypes.string_at(addr, 13) != b'sysv-contents' or ctypes.string_at(addr + 4096, 8) != b'page-two':
    bad.append('contents')
if not any(l.startswith('%x-' % addr) and 'SYSV' in l for l in open('/proc/self/maps')):
    bad.append('mapping')
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;
    let mut shmid = -1;
    let out = python_round_trip(&scratch, script, &[], |_, ctl| {
        shmid = std::fs::read_to_string(ctl.join("ready"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // SAFETY: removing the test's own segment, now attached nowhere.
        let removed = unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
        assert_eq!(removed, 0);
    });
    // SAFETY: removing the segment again (it outlives the process).
    unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
    assert_eq!(out, "ok");
}

/// A file on tmpfs mapped shared, as `shm_open` makes it (python3): two
/// mappings of it, a hole, contents written through the mappings. Between
/// checkpoint and restore the file is overwritten and then removed (as the
/// process writing on, then a reboot, would): the restore writes it back
/// with the checkpoint's contents and mode, and the mappings share it again.
#[test]
fn tmpfs_files_mapped_shared_round_trip() {
    if !cr_ebpf_perf::privileged("tmpfs_files_mapped_shared_round_trip") {
        return;
    }
    let scratch = Scratch::new("fdk-tmpfs");
    let shm = std::path::PathBuf::from(format!("/dev/shm/cr-ebpf-test-{}", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    let script = r#"
import mmap, os, stat, sys, time
ctl, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
os.fchmod(fd, 0o640)
os.ftruncate(fd, 4 * 4096)
a = mmap.mmap(fd, 2 * 4096, flags=mmap.MAP_SHARED)
b = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, offset=3 * 4096)
os.close(fd)
a[0:9] = b'shm-first'
a[4096:4100] = b'next'
b[0:4] = b'last'
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
if a[0:9] != b'shm-first' or a[4096:4100] != b'next' or b[0:4] != b'last': bad.append('contents')
with open(path, 'rb') as f:
    whole = f.read()
if len(whole) != 4 * 4096 or whole[8192:12288] != bytes(4096): bad.append('size or hole')
a[100:104] = b'LIVE'
with open(path, 'rb') as f:
    if f.read(104)[100:] != b'LIVE': bad.append('the mapping no longer shares the file')
if stat.S_IMODE(os.stat(path).st_mode) != 0o640: bad.append('mode')
if not any(path in l and ' rw-s ' in l for l in open('/proc/self/maps')): bad.append('maps name')
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;
    let out = python_round_trip(&scratch, script, &[&shm], |img, _| {
        let m = cr_ebpf_image::Manifest::read(img).unwrap();
        let files: Vec<_> = m
            .shmem
            .iter()
            .filter(|o| o.kind == cr_ebpf_image::ShmemKind::TmpfsFile)
            .collect();
        assert_eq!(files.len(), 1, "{:?}", m.shmem);
        assert_eq!(files[0].name, shm.display().to_string());
        // Written on after the checkpoint, then lost.
        std::fs::write(&shm, b"garbage").unwrap();
        std::fs::remove_file(&shm).unwrap();
    });
    let _ = std::fs::remove_file(&shm);
    assert_eq!(out, "ok");
}

/// A process with a directory open (and as its cwd) restores after files
/// came and went in that directory: a directory is checked for being the
/// same directory, not for its size or time.
#[test]
fn a_directory_that_gained_files_since_the_checkpoint_restores() {
    if !cr_ebpf_perf::privileged("a_directory_that_gained_files_since_the_checkpoint_restores") {
        return;
    }
    let scratch = Scratch::new("fdk-dir");
    let dir = scratch.0.join("work");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("old"), b"x").unwrap();
    let script = r#"
import os, sys, time
ctl, d = sys.argv[1], sys.argv[2]
fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
os.chdir(d)
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
if os.fstat(fd).st_ino != os.stat(d).st_ino: bad.append('another directory')
if sorted(os.listdir(fd)) != ['new', 'sub']: bad.append('listing %r' % sorted(os.listdir(fd)))
if os.getcwd() != d: bad.append('cwd')
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;
    let out = python_round_trip(&scratch, script, &[&dir], |_, _| {
        std::fs::remove_file(dir.join("old")).unwrap();
        std::fs::write(dir.join("new"), b"y").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
    });
    assert_eq!(out, "ok");
}
