//! Privileged tests of the network lock (an eBPF classifier pinned in
//! bpffs): a python3 server with a TCP connection to a peer outside the
//! checkpoint (this test) is dumped and killed; the peer sends while it is
//! down; after the restore the server has every byte and answers on the
//! same connection, and the restore has removed the lock. Without the lock the peer's connection is reset (the
//! test that shows the scenario can fail). A refused dump removes the lock
//! it made and the connection keeps working; `--leave-running` makes none.
//! A half-closed connection gets its peer's FIN again through the lock's
//! removal.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use cr_ebpf_checkpoint::{dump, ConnectionLock, DumpOptions, NetLockKey};
use cr_ebpf_loader::netlock;
use cr_ebpf_perf::{spawn_clean, wait_for_file, BpfLock, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

const PYTHON: &str = "/usr/bin/python3";

/// Accepts one connection, reads 6 bytes, answers `got:` and them.
const SERVER: &str = r#"
import mmap, os, socket, struct, sys, time
ctl, family = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    # Something a dump refuses: a packet socket whose ring is mapped.
    refused = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    refused.setsockopt(263, 5, struct.pack('IIII', 4096, 1, 1024, 4))
    ring = mmap.mmap(refused.fileno(), 4096)
fam = socket.AF_INET6 if family == '6' else socket.AF_INET
l = socket.socket(fam, socket.SOCK_STREAM)
l.bind(('::1' if family == '6' else '127.0.0.1', 0))
l.listen(1)
with open(os.path.join(ctl, 'port.tmp'), 'w') as f:
    f.write(str(l.getsockname()[1]))
os.rename(os.path.join(ctl, 'port.tmp'), os.path.join(ctl, 'port'))
c, _ = l.accept()
open(os.path.join(ctl, 'ready'), 'w').close()
got = b''
while len(got) < 6:
    d = c.recv(64)
    if not d:
        break
    got += d
c.sendall(b'got:' + got)
time.sleep(60)
"#;

/// The server, started with `args` after its control directory, and the
/// peer's connection to it (the server has accepted it).
fn start(scratch: &Scratch, args: &[&str]) -> (std::process::Child, TcpStream) {
    let ctl = scratch.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let child = spawn_clean(
        Command::new(PYTHON)
            .args(["-c", SERVER])
            .arg(&ctl)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    wait_for_file(&ctl.join("port"));
    let port: u16 = std::fs::read_to_string(ctl.join("port"))
        .unwrap()
        .parse()
        .unwrap();
    let host = if args[0] == "6" { "::1" } else { "127.0.0.1" };
    let peer = TcpStream::connect((host, port)).expect("connect to the server");
    wait_for_file(&ctl.join("ready"));
    (child, peer)
}

fn options(lock: bool, leave_running: bool) -> DumpOptions {
    DumpOptions {
        leave_running,
        network_lock: lock.then(|| Arc::new(BpfLock) as Arc<dyn ConnectionLock>),
        ..DumpOptions::default()
    }
}

/// The locks a dump of `pid` made that are still there.
fn locks_of(pid: i32) -> Vec<String> {
    let prefix = format!("dump-{pid}-");
    netlock::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// What the server answers (its whole answer, or the error that ended it).
fn answer(peer: &mut TcpStream) -> Result<String, std::io::Error> {
    // A guard against a hang, not a timing assertion.
    peer.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    while buf.len() < 10 {
        let mut b = [0u8; 64];
        let n = peer.read(&mut b)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Dumps the server (killed), sends while it is down, restores it, sends
/// again; returns the server's answer, or the error the peer got.
fn down_and_back(family: &str, lock: bool) -> Result<String, std::io::Error> {
    let scratch = Scratch::new(&format!("netlock-{family}-{lock}"));
    let img = scratch.0.join("image");
    let (mut child, mut peer) = start(&scratch, &[family]);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    peer.write_all(b"AB").unwrap();
    let report = dump(pid, &img, &options(lock, false)).expect("dump");
    let _ = child.wait();
    drop(guard);
    let name = cr_ebpf_image::Manifest::read(&img).unwrap().network_lock;
    assert_eq!(name, report.network_lock, "the image names the lock");
    if lock {
        let name = name.clone().expect("a lock for the connection");
        assert!(netlock::exists(&name), "the lock outlives the dump");
    } else {
        assert_eq!(name, None);
    }
    // Nobody holds the connection now: without the lock the kernel
    // answers this with a reset.
    let sent = peer.write_all(b"CD");
    // The lock's map, held open through the restore.
    let held = name.as_ref().map(|n| {
        let path = std::path::Path::new(netlock::ROOT)
            .join(n)
            .join("connections");
        let data = aya::maps::MapData::from_pin(path).expect("the pinned map");
        aya::maps::HashMap::<_, NetLockKey, u32>::try_from(aya::maps::Map::HashMap(data))
            .expect("a hash map")
    });
    assert_eq!(
        held.as_ref().map_or(0, |m| m.keys().count()),
        usize::from(lock)
    );
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _guard = KillOnDrop(r.pid);
    if let Some(name) = &name {
        // Removed by the restore once the connection existed again.
        assert!(!netlock::exists(name), "the lock outlived the restore");
        // Emptied, not only unpinned: the kernel detaches unpinned links
        // later, from a work queue, and until then they drop what the map
        // holds (the FINs and probes the restore makes right after).
        assert_eq!(held.unwrap().keys().count(), 0, "the lock's map emptied");
    }
    sent?;
    peer.write_all(b"EF")?;
    answer(&mut peer)
}

#[test]
fn a_peer_that_sends_while_the_process_is_down_keeps_its_connection() {
    if !cr_ebpf_perf::privileged("a_peer_that_sends_while_the_process_is_down_keeps_its_connection")
    {
        return;
    }
    for family in ["4", "6"] {
        let got = down_and_back(family, true).expect("the connection survives");
        assert_eq!(got, "got:ABCDEF", "IPv{family}");
    }
}

#[test]
fn without_the_lock_the_peer_is_reset() {
    if !cr_ebpf_perf::privileged("without_the_lock_the_peer_is_reset") {
        return;
    }
    let e = down_and_back("4", false).expect_err("the peer should have been reset");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{e}"
    );
}

#[test]
fn a_refused_dump_removes_its_lock_and_leave_running_takes_none() {
    if !cr_ebpf_perf::privileged("a_refused_dump_removes_its_lock_and_leave_running_takes_none") {
        return;
    }
    let scratch = Scratch::new("netlock-refused");
    // A packet socket's mapped ring: refused, after the connections were
    // locked.
    let (mut child, mut peer) = start(&scratch, &["4", "packet"]);
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let e = dump(pid, &scratch.0.join("image"), &options(true, false)).expect_err("refused");
    assert!(
        e.to_string()
            .contains("not supported: a packet socket whose ring is mapped"),
        "{e}"
    );
    assert_eq!(
        locks_of(pid),
        Vec::<String>::new(),
        "the refused dump's lock"
    );
    peer.write_all(b"ABCDEF").unwrap();
    assert_eq!(
        answer(&mut peer).unwrap(),
        "got:ABCDEF",
        "the connection works"
    );
    let _ = child.kill();
    let _ = child.wait();

    // A dump that leaves the process running locks nothing.
    let scratch = Scratch::new("netlock-running");
    let img = scratch.0.join("image");
    let (mut child, mut peer) = start(&scratch, &["4"]);
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let report = dump(pid, &img, &options(true, true)).expect("dump --leave-running");
    assert_eq!(report.network_lock, None);
    assert_eq!(
        cr_ebpf_image::Manifest::read(&img).unwrap().network_lock,
        None
    );
    assert_eq!(locks_of(pid), Vec::<String>::new());
    peer.write_all(b"ABCDEF").unwrap();
    assert_eq!(
        answer(&mut peer).unwrap(),
        "got:ABCDEF",
        "the connection works"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `cr-ebpf` next to the test's workload binaries (built with the workspace).
fn cli() -> Option<std::path::PathBuf> {
    let cr = std::path::Path::new(env!("CARGO_BIN_EXE_ticker")).with_file_name("cr-ebpf");
    if cr.exists() {
        return Some(cr);
    }
    assert!(
        !cr_ebpf_perf::in_ci(),
        "{} missing: build the workspace",
        cr.display()
    );
    eprintln!(
        "SKIPPED: {} not built (run `cargo xtask test`)",
        cr.display()
    );
    None
}

fn run(cr: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(cr)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run cr-ebpf");
    assert!(out.status.success(), "cr-ebpf {args:?}: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_cli_locks_at_dump_and_unlock_lets_the_connections_go() {
    if !cr_ebpf_perf::privileged("the_cli_locks_at_dump_and_unlock_lets_the_connections_go") {
        return;
    }
    let Some(cr) = cli() else { return };
    let scratch = Scratch::new("netlock-cli");
    let img = scratch.0.join("image");
    let img_s = img.to_str().unwrap();
    let (mut child, mut peer) = start(&scratch, &["4"]);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    peer.write_all(b"AB").unwrap();
    run(
        &cr,
        &["dump", "--pid", &pid.to_string(), "--images-dir", img_s],
    );
    let _ = child.wait();
    drop(guard);
    let locks = locks_of(pid);
    assert_eq!(locks.len(), 1, "one lock for the dump");
    assert!(run(&cr, &["unlock", "--list"]).contains(&locks[0]));
    // Sent while the process is down: held by the lock, not answered.
    peer.write_all(b"CD").unwrap();
    run(&cr, &["restore", "--images-dir", img_s, "--detach"]);
    let _guard = KillOnDrop(pid);
    assert_eq!(locks_of(pid), Vec::<String>::new(), "restore removed it");
    peer.write_all(b"EF").unwrap();
    assert_eq!(answer(&mut peer).unwrap(), "got:ABCDEF");

    // A second dump that will not be restored: `unlock` lets its
    // connection go, and the peer then gets a reset.
    let img2 = scratch.0.join("image2");
    run(
        &cr,
        &[
            "dump",
            "--pid",
            &pid.to_string(),
            "--images-dir",
            img2.to_str().unwrap(),
        ],
    );
    assert_eq!(locks_of(pid).len(), 1);
    let out = run(&cr, &["unlock", "--images-dir", img2.to_str().unwrap()]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(locks_of(pid), Vec::<String>::new());
    let _ = peer.write_all(b"GH");
    let e = answer(&mut peer).expect_err("the peer is reset once unlocked");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// Reads until its peer shuts down, waits for `go`, reads the end of the
/// stream again (the peer's FIN, made again by the restore) and answers.
const HALF_CLOSED: &str = r#"
import os, socket, sys, time
ctl = sys.argv[1]
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.bind(('127.0.0.1', 0))
l.listen(1)
with open(os.path.join(ctl, 'port.tmp'), 'w') as f:
    f.write(str(l.getsockname()[1]))
os.rename(os.path.join(ctl, 'port.tmp'), os.path.join(ctl, 'port'))
c, _ = l.accept()
open(os.path.join(ctl, 'ready'), 'w').close()
got = b''
while True:
    d = c.recv(64)
    if not d:
        break
    got += d
open(os.path.join(ctl, 'eof'), 'w').close()
while not os.path.exists(os.path.join(ctl, 'go')):
    time.sleep(0.02)
again = c.recv(64)
c.sendall(b'got:' + got + (b' eof' if again == b'' else b' data after eof'))
c.close()
time.sleep(60)
"#;

#[test]
fn a_half_closed_connection_gets_its_peers_fin_again_through_the_lock() {
    if !cr_ebpf_perf::privileged(
        "a_half_closed_connection_gets_its_peers_fin_again_through_the_lock",
    ) {
        return;
    }
    let scratch = Scratch::new("netlock-half");
    let ctl = scratch.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut child = spawn_clean(
        Command::new(PYTHON)
            .args(["-c", HALF_CLOSED])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    wait_for_file(&ctl.join("port"));
    let port: u16 = std::fs::read_to_string(ctl.join("port"))
        .unwrap()
        .parse()
        .unwrap();
    let mut peer = TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_for_file(&ctl.join("ready"));
    peer.write_all(b"ABCDEF").unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    // The server is in CLOSE_WAIT: its peer's FIN is made again at
    // restore, a packet the lock must no longer drop.
    wait_for_file(&ctl.join("eof"));
    let img = scratch.0.join("image");
    dump(pid, &img, &options(true, false)).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _guard = KillOnDrop(r.pid);
    assert_eq!(
        locks_of(pid),
        Vec::<String>::new(),
        "restore removed the lock"
    );
    std::fs::write(ctl.join("go"), b"").unwrap();
    let mut all = String::new();
    peer.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    peer.read_to_string(&mut all)
        .expect("the answer, then the end");
    assert_eq!(all, "got:ABCDEF eof");
}
