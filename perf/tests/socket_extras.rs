//! Privileged round trips (python3 workloads) of what rides on sockets:
//! files in flight (`SCM_RIGHTS`) queued on unix sockets, received after
//! the restore in order with their data; a classic BPF socket filter that
//! still filters; raw IP sockets with their options. And what cannot come
//! back is refused at checkpoint time with the process left running.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const PYTHON: &str = "/usr/bin/python3";

/// Starts the python3 `script` with a control directory and `args`, and
/// waits for it to write `CTL/ready`.
fn start(scratch: &Scratch, script: &str, args: &[&std::path::Path]) -> std::process::Child {
    let ctl = scratch.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let child = spawn_clean(
        Command::new(PYTHON)
            .args(["-c", script])
            .arg(&ctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    child
}

/// Dumps the ready `script` (killing it), restores it, lets it check
/// itself and returns its verdict.
fn round_trip(scratch: &Scratch, script: &str, args: &[&std::path::Path]) -> String {
    let img = scratch.0.join("image");
    let ctl = scratch.0.join("ctl");
    let mut child = start(scratch, script, args);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _guard = KillOnDrop(r.pid);
    std::fs::write(ctl.join("check"), b"").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("out"));
    std::fs::read_to_string(ctl.join("out")).unwrap()
}

/// Dumps the ready `script` expecting a refusal containing `what`; the
/// process must run on, untraced, and no image appear. The process is
/// killed when the returned guard goes.
fn refused(scratch: &Scratch, script: &str, what: &str) -> KillOnDrop {
    let mut child = start(scratch, script, &[]);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    let img = scratch.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("not supported: {what}")), "{msg}");
    assert!(!img.exists(), "no image published");
    assert!(child.try_wait().unwrap().is_none(), "the process runs on");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0\n"), "not traced any more");
    guard
}

/// What every script ends with: wait for `check`, run CHECKS (which append
/// to `bad`), write the verdict.
const CHECK: &str = r#"
open(os.path.join(ctl, 'ready'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'check')):
    time.sleep(0.02)
bad = []
try:
    CHECKS
except Exception as e:
    bad.append('exception: %r' % e)
with open(os.path.join(ctl, 'out.tmp'), 'w') as f:
    f.write('ok' if not bad else ' '.join(bad))
os.rename(os.path.join(ctl, 'out.tmp'), os.path.join(ctl, 'out'))
time.sleep(60)
"#;

fn script(setup: &str, checks: &str) -> String {
    let checks = checks.trim().replace('\n', "\n    ");
    format!(
        "import array, os, socket, struct, sys, time\nctl = sys.argv[1]\n{setup}{}",
        CHECK.replace("CHECKS", &checks)
    )
}

/// A regular file (also kept open: one open file, one offset), a pipe's
/// read end held only in flight, a socket held only in flight (and its
/// peer, held), and a pipe's write end on a seqpacket pair: received after
/// the restore, message by message, with their contents.
#[test]
fn files_in_flight_come_back_in_order_with_their_contents() {
    if !cr_ebpf_perf::privileged("files_in_flight_come_back_in_order_with_their_contents") {
        return;
    }
    let scratch = Scratch::new("sk-in-flight");
    let path = scratch.0.join("data");
    std::fs::write(&path, b"0123456789").unwrap();
    let setup = r#"
f = os.open(sys.argv[2], os.O_RDONLY); os.read(f, 4)
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
r, w = os.pipe(); os.write(w, b'piped')
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM); s2.send(b'via socket')
socket.send_fds(a, [b'first'], [f])
a.send(b'plain')
socket.send_fds(a, [b'second'], [r, s1.fileno()])
os.close(r); s1.close()
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c.send(b'before')
socket.send_fds(c, [b'abc'], [w])
c.send(b'def')
os.close(w)
open_before = sorted(os.listdir('/proc/self/fd'))
"#;
    let checks = r#"
if sorted(os.listdir('/proc/self/fd')) != open_before: bad.append('descriptors left open')
m, fds, _, _ = socket.recv_fds(b, 100, 4)
if m != b'first' or len(fds) != 1: bad.append('first %r %r' % (m, fds))
if os.read(fds[0], 100) != b'456789': bad.append('file offset')
if os.lseek(f, 0, os.SEEK_CUR) != 10: bad.append('one open file')
m, fds, _, _ = socket.recv_fds(b, 100, 4)
if m != b'plain' or fds: bad.append('plain %r %r' % (m, fds))
m, fds, _, _ = socket.recv_fds(b, 100, 4)
if m != b'second' or len(fds) != 2: bad.append('second %r %r' % (m, fds))
r2, s1b = fds
if os.read(r2, 100) != b'piped': bad.append('pipe contents')
s1b = socket.socket(fileno=s1b); s1b.settimeout(5)
if s1b.recv(100) != b'via socket': bad.append('socket in flight')
s1b.send(b'back'); s2.settimeout(5)
if s2.recv(100) != b'back': bad.append('socket in flight peer')
d.settimeout(5)
if d.recv(100) != b'before': bad.append('seqpacket before')
m, fds, _, _ = socket.recv_fds(d, 100, 4)
if m != b'abc' or len(fds) != 1: bad.append('seqpacket %r %r' % (m, fds))
if d.recv(100) != b'def': bad.append('seqpacket after')
os.write(fds[0], b'x')
if os.read(r2, 100) != b'x': bad.append('write end')
b.setblocking(False)
try:
    b.recv(100); bad.append('more messages')
except BlockingIOError:
    pass
"#;
    let out = round_trip(&scratch, &script(setup, checks), &[&path]);
    assert_eq!(out, "ok");
}

/// Files in flight on a unix stream, whose bytes carrying them cannot be
/// told apart from the bytes written before them, and a socket in flight
/// that itself carries files in flight: refused.
#[test]
fn files_in_flight_that_cannot_come_back_are_refused() {
    if !cr_ebpf_perf::privileged("files_in_flight_that_cannot_come_back_are_refused") {
        return;
    }
    let scratch = Scratch::new("sk-in-flight-stream");
    let setup = r#"
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
c.send(b'before')
socket.send_fds(c, [b'abc'], [0])
"#;
    refused(
        &scratch,
        &script(setup, "pass"),
        "descriptors in flight (SCM_RIGHTS) queued on a unix stream socket",
    );
    let scratch = Scratch::new("sk-in-flight-nested");
    let setup = r#"
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
socket.send_fds(x, [b'inner'], [0])
socket.send_fds(a, [b'outer'], [y.fileno()])
y.close()
"#;
    refused(
        &scratch,
        &script(setup, "pass"),
        "descriptors in flight (SCM_RIGHTS) queued on a unix socket that is itself in flight \
         (a file in flight on this unix socket)",
    );
}

/// A UDP socket with a classic BPF filter that drops every datagram keeps
/// dropping them (and reads the same program back); raw IP sockets keep
/// their protocol, address and options, and a raw UDP socket with
/// `IP_HDRINCL` still sends the packets it builds.
#[test]
fn socket_filters_and_raw_sockets_come_back() {
    if !cr_ebpf_perf::privileged("socket_filters_and_raw_sockets_come_back") {
        return;
    }
    let scratch = Scratch::new("sk-filter-raw");
    let setup = r#"
import ctypes
SO_ATTACH_FILTER = SO_GET_FILTER = 26
drop_all = struct.pack('HBBI', 6, 0, 0, 0)
prog = array.array('B', drop_all)
addr, _ = prog.buffer_info()
fprog = struct.pack('HL', 1, addr)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
u.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); srv.bind(('127.0.0.10', 0))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
raw.bind(('127.0.0.12', 0))
raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
raw.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 33)
raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
def packet(dst, port, data):
    udp = struct.pack('!HHHH', 4242, port, 8 + len(data), 0) + data
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton('127.0.0.12'), socket.inet_aton(dst))
    return ip + udp
"#;
    let checks = r#"
libc = ctypes.CDLL(None, use_errno=True)
buf, n = ctypes.create_string_buffer(64), ctypes.c_uint(8)  # room for 8 instructions
libc.getsockopt(u.fileno(), socket.SOL_SOCKET, SO_GET_FILTER, buf, ctypes.byref(n))
if buf.raw[:8 * n.value] != drop_all: bad.append('filter program %r' % buf.raw[:8 * n.value])
t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t.sendto(b'dropped', u.getsockname())
u.settimeout(0.5)
try:
    u.recv(100); bad.append('filter lets through')
except socket.timeout:
    pass
if raw.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_UDP: bad.append('raw protocol')
if raw.getsockname()[0] != '127.0.0.12': bad.append('raw address %r' % (raw.getsockname(),))
if raw.getsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL) != 1: bad.append('raw hdrincl')
if raw.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) != 33: bad.append('raw ttl')
if raw6.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_RAW: bad.append('raw6 type')
raw.sendto(packet('127.0.0.10', srv.getsockname()[1], b'built'), ('127.0.0.10', 0))
srv.settimeout(5)
if srv.recv(100) != b'built': bad.append('raw send')
"#;
    let out = round_trip(&scratch, &script(setup, checks), &[]);
    assert_eq!(out, "ok");
}

/// An epoll set open under two descriptors and sent in flight twice is one
/// set after the restore: a registration made through one descriptor is
/// seen through the other and through the received ones.
#[test]
fn an_epoll_set_under_several_descriptors_and_in_flight_is_one_set() {
    if !cr_ebpf_perf::privileged("an_epoll_set_under_several_descriptors_and_in_flight_is_one_set")
    {
        return;
    }
    let scratch = Scratch::new("sk-epoll-flight");
    let setup = r#"
import select
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
ep = select.epoll()
again = os.dup(ep.fileno())
socket.send_fds(a, [b'1'], [ep.fileno()])
socket.send_fds(a, [b'2'], [ep.fileno()])
x, y = socket.socketpair()
"#;
    let checks = r#"
ep.register(y.fileno(), select.EPOLLIN)
x.send(b'ready')
_, fds1, _, _ = socket.recv_fds(b, 10, 1)
_, fds2, _, _ = socket.recv_fds(b, 10, 1)
for name, fd in (('dup', again), ('first in flight', fds1[0]), ('second in flight', fds2[0])):
    got = select.epoll.fromfd(fd).poll(0)
    if [f for f, _ in got] != [y.fileno()]: bad.append('%s: %r' % (name, got))
"#;
    let out = round_trip(&scratch, &script(setup, checks), &[]);
    assert_eq!(out, "ok");
}

/// Netlink sockets: one bound to its port and a group with the packet-info
/// flag, one connected to it, one in a group above 32: after the restore
/// they have their ports, groups, flag and peer, and a message sent to the
/// port arrives.
#[test]
fn netlink_sockets_come_back_with_their_port_groups_and_peer() {
    if !cr_ebpf_perf::privileged("netlink_sockets_come_back_with_their_port_groups_and_peer") {
        return;
    }
    let scratch = Scratch::new("sk-netlink");
    let setup = r#"
SOL_NETLINK, ADD, PKTINFO, LIST = 270, 1, 3, 9
a = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)
a.bind((0, 1 << 4))
a.setsockopt(SOL_NETLINK, PKTINFO, 1)
b = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 15)
b.connect((a.getsockname()[0], 0))
# A group above 32 (rtnetlink's bridge VLAN events: none here).
c = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
c.setsockopt(SOL_NETLINK, ADD, 33)
def state():
    return (a.getsockname(), b.getpeername(), c.getsockopt(SOL_NETLINK, LIST, 8))
before = state()
"#;
    let checks = r#"
after = state()
if after != before: bad.append('%r != %r' % (after, before))
if a.getsockopt(SOL_NETLINK, PKTINFO) != 1: bad.append('pktinfo')
msg = struct.pack('IHHII', 16, 0x1234, 0, 1, 0)
b.send(msg)
a.settimeout(5)
if a.recv(100) != msg: bad.append('message')
"#;
    let out = round_trip(&scratch, &script(setup, checks), &[]);
    assert_eq!(out, "ok");
}

/// Unix seqpacket sockets as ZDTM's `sockets01/02/03-seqpacket` make them:
/// ends shut down for reading or both ways with nothing queued, an end
/// whose peer sent messages (one empty) and closed, and an accepted
/// connection shut down for reading with a message queued. Peeking such a
/// queue reads 0 bytes at its end forever: the dump spun there (100% CPU,
/// the process held stopped). Now it returns, and each socket comes back
/// as it was.
#[test]
fn seqpacket_sockets_shut_down_or_with_a_closed_peer_dump_and_come_back() {
    if !cr_ebpf_perf::privileged(
        "seqpacket_sockets_shut_down_or_with_a_closed_peer_dump_and_come_back",
    ) {
        return;
    }
    let scratch = Scratch::new("sk-seqpacket");
    let setup = r#"
SEQ = socket.SOCK_SEQPACKET
def pair():
    return socket.socketpair(socket.AF_UNIX, SEQ)
a1, b1 = pair(); a1.shutdown(socket.SHUT_RD)
a2, b2 = pair(); a2.shutdown(socket.SHUT_RDWR)
a3, b3 = pair()
for m in [b'one', b'', b'three']:
    b3.send(m)
b3.close()
srv = socket.socket(socket.AF_UNIX, SEQ)
srv.bind(os.path.join(ctl, 'srv')); srv.listen(1)
cl = socket.socket(socket.AF_UNIX, SEQ); cl.connect(os.path.join(ctl, 'srv'))
acc, _ = srv.accept()
cl.send(b'queued'); acc.shutdown(socket.SHUT_RD)
def recv(s):
    try:
        return s.recv(64, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 'EAGAIN'
def send(s, m):
    try:
        return s.send(m)
    except BrokenPipeError:
        return 'EPIPE'
"#;
    let checks = r#"
got = [recv(a1), send(b1, b'x'), send(a1, b'y'), recv(b1)]
if got != [b'', 'EPIPE', 1, b'y']: bad.append('shut for reading %r' % got)
got = [recv(a2), send(a2, b'x'), send(b2, b'x')]
if got != [b'', 'EPIPE', 'EPIPE']: bad.append('shut both ways %r' % got)
got = [recv(a3) for _ in range(4)] + [send(a3, b'x')]
if got != [b'one', b'', b'three', b'', 'EPIPE']: bad.append('peer closed %r' % got)
got = [recv(acc), recv(acc), send(cl, b'x'), send(acc, b'z'), recv(cl)]
if got != [b'queued', b'', 'EPIPE', 1, b'z']: bad.append('accepted %r' % got)
"#;
    let script = script(setup, checks);
    let ctl = scratch.0.join("ctl");
    let img = scratch.0.join("image");
    let mut child = start(&scratch, &script, &[]);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    // The dump in a thread of its own: one that never returns is a failure
    // here, not a test run that never ends.
    let (tx, rx) = std::sync::mpsc::channel();
    let to = img.clone();
    std::thread::spawn(move || {
        let _ = tx.send(dump(pid, &to, &DumpOptions::default()).map(|_| ()));
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("the dump never returned")
        .expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _guard = KillOnDrop(r.pid);
    std::fs::write(ctl.join("check"), b"").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("out"));
    assert_eq!(std::fs::read_to_string(ctl.join("out")).unwrap(), "ok");
}

/// A TCP connection reset by its peer keeps the bytes that came before the
/// reset and the error until the process reads them: refused (reading them
/// to save them would take them from the process), and the process still
/// finds both. Likewise a closed connection whose error was read and whose
/// bytes were not.
#[test]
fn a_reset_tcp_connection_with_what_the_process_has_not_read_is_refused() {
    if !cr_ebpf_perf::privileged(
        "a_reset_tcp_connection_with_what_the_process_has_not_read_is_refused",
    ) {
        return;
    }
    let reset = r#"
srv = socket.socket()
srv.bind(('127.0.0.1', 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
s, _ = srv.accept()
c.sendall(b'abc')
time.sleep(0.2)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
c.close()
time.sleep(0.2)
ERROR_READ
"#;
    let with_error = r#"
if s.recv(10) != b'abc':
    bad.append('bytes before the reset')
try:
    s.recv(10)
    bad.append('no reset')
except ConnectionResetError:
    pass
"#;
    let scratch = Scratch::new("tcp-reset");
    let ctl = scratch.0.join("ctl");
    let _running = refused(
        &scratch,
        &script(&reset.replace("ERROR_READ", ""), with_error),
        "a TCP connection that ended with an error the process has not read yet (reset by its \
         peer)",
    );
    std::fs::write(ctl.join("check"), b"").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("out"));
    assert_eq!(std::fs::read_to_string(ctl.join("out")).unwrap(), "ok");

    let error_read = "assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0";
    let scratch = Scratch::new("tcp-reset-read");
    let ctl = scratch.0.join("ctl");
    let _also_running = refused(
        &scratch,
        &script(
            &reset.replace("ERROR_READ", error_read),
            "r = s.recv(10, socket.MSG_DONTWAIT)\nif r != b'abc': bad.append(repr(r))",
        ),
        "a closed TCP connection holding bytes the process has not read",
    );
    std::fs::write(ctl.join("check"), b"").unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("out"));
    assert_eq!(std::fs::read_to_string(ctl.join("out")).unwrap(), "ok");
}
