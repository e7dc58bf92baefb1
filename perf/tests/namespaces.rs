//! UTS and IPC namespaces of their own: a python3 process tree in a UTS
//! namespace with its own hostname comes back with it (both processes in
//! one namespace again, the host's hostname untouched); a process in an
//! IPC namespace of its own gets back its System V shared memory segment
//! (contents, attached at the same address), semaphore set and message
//! queue with the same ids, keys and values, and the namespace's sysctls.

use std::{
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Starts `code` (python, argument: the control directory) in new
/// namespaces `flags`, after `setup` ran in the child.
fn start(
    s: &Scratch,
    code: &str,
    flags: i32,
    hostname: Option<&'static str>,
) -> (std::process::Child, i32, PathBuf) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", code])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: unshare and sethostname are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(h) = hostname {
                if libc::sethostname(h.as_ptr().cast(), h.len()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = spawn_clean(&mut cmd);
    let pid = child.id() as i32;
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    (child, pid, ctl)
}

/// Asks the workload for its report (SIGUSR1) and reads it.
fn report(pid: i32, ctl: &Path, name: &str) -> String {
    let path = ctl.join(name);
    let _ = std::fs::remove_file(&path);
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    cr_ebpf_perf::wait_for_file(&path);
    std::fs::read_to_string(&path).unwrap()
}

fn ns(pid: i32, kind: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .ino()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap()
}

/// A parent and its child in one UTS namespace; each reports its
/// hostname, domain name and namespace.
const UTS_TREE: &str = r#"
import os, signal, sys, time
ctl = sys.argv[1]
def answer(*_):
    me = "parent" if os.getpid() == parent else "child"
    text = "%s %s %s" % (os.uname().nodename, open("/proc/sys/kernel/domainname").read().strip(), os.getpid())
    with open(os.path.join(ctl, me + ".tmp"), "w") as f:
        f.write(text)
    os.rename(os.path.join(ctl, me + ".tmp"), os.path.join(ctl, me))
parent = os.getpid()
signal.signal(signal.SIGUSR1, answer)
with open("/proc/sys/kernel/domainname", "w") as f:
    f.write("cr-ebpf-domain")
kid = os.fork()
if kid == 0:
    while True:
        time.sleep(0.05)
with open(os.path.join(ctl, "kid"), "w") as f:
    f.write(str(kid))
open(os.path.join(ctl, "ready"), "w").close()
while True:
    time.sleep(0.05)
"#;

#[test]
fn a_uts_namespace_comes_back_with_its_hostname_shared_by_the_tree() {
    if !cr_ebpf_perf::privileged("a_uts_namespace_comes_back_with_its_hostname_shared_by_the_tree")
    {
        return;
    }
    // The child of the killed parent comes to us, and we reap it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let s = Scratch::new("uts-ns");
    let host_before = hostname();
    let (mut child, pid, ctl) = start(&s, UTS_TREE, libc::CLONE_NEWUTS, Some("cr-ebpf-uts"));
    let _g = KillOnDrop(pid);
    let kid: i32 = std::fs::read_to_string(ctl.join("kid"))
        .unwrap()
        .parse()
        .unwrap();
    let _k = KillOnDrop(kid);
    assert_ne!(ns(pid, "uts"), ns(std::process::id() as i32, "uts"));
    let before = report(pid, &ctl, "parent");
    assert_eq!(before, format!("cr-ebpf-uts cr-ebpf-domain {pid}"));
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    // SAFETY: reaping the child, ours now.
    unsafe { libc::waitpid(kid, std::ptr::null_mut(), 0) };
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _r = KillOnDrop(r.pid);
    assert_eq!(r.pid, pid);
    assert_eq!(report(pid, &ctl, "parent"), before, "the parent's names");
    assert_eq!(
        report(kid, &ctl, "child"),
        format!("cr-ebpf-uts cr-ebpf-domain {kid}"),
        "the child's names"
    );
    let me = std::process::id() as i32;
    assert_ne!(ns(pid, "uts"), ns(me, "uts"), "a namespace of its own");
    assert_eq!(ns(pid, "uts"), ns(kid, "uts"), "shared by the tree again");
    assert_eq!(hostname(), host_before, "the host's hostname is untouched");
}

/// Makes (and removes) one object of each kind first, so that the ids
/// kept are not the first ones; then a segment with contents, attached, a
/// semaphore set and a queue with two messages; reports them on SIGUSR1.
const IPC: &str = r#"
import ctypes, os, signal, struct, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_CREAT, IPC_RMID, GETALL, SETALL = 0o1000, 0, 13, 17
libc.shmctl(libc.shmget(0, 4096, IPC_CREAT | 0o600), IPC_RMID, None)
libc.semctl(libc.semget(0, 1, IPC_CREAT | 0o600), 0, IPC_RMID)
libc.msgctl(libc.msgget(0, IPC_CREAT | 0o600), IPC_RMID, None)
with open("/proc/sys/kernel/msgmni", "w") as f:
    f.write("1234")
with open("/proc/sys/kernel/sem", "w") as f:  # longer than 32 bytes
    f.write("32000 2147483647 2147483647 32000")
shmid = libc.shmget(0x1234, 3 * 4096, IPC_CREAT | 0o640)
addr = libc.shmat(shmid, None, 0)
ctypes.memmove(addr + 4096, b"segment contents", 16)
semid = libc.semget(0x5678, 3, IPC_CREAT | 0o600)
libc.semctl(semid, 0, SETALL, (ctypes.c_ushort * 3)(4, 5, 6))
msqid = libc.msgget(0x9abc, IPC_CREAT | 0o644)
for t, m in [(1, b"first"), (7, b"second!")]:
    libc.msgsnd(msqid, struct.pack("l", t) + m, len(m), 0)
def answer(*_):
    vals = (ctypes.c_ushort * 3)()
    libc.semctl(semid, 0, GETALL, vals)
    msgs = []
    buf = ctypes.create_string_buffer(8 + 64)
    while True:
        n = libc.msgrcv(msqid, buf, 64, 0, 0o4000)  # IPC_NOWAIT
        if n < 0:
            break
        msgs.append("%d:%s" % (struct.unpack("l", buf.raw[:8])[0], buf.raw[8:8 + n].decode()))
    out = [
        "ids %d %d %d" % (shmid, semid, msqid),
        "keys " + " ".join(l.split()[0] for l in open("/proc/sysvipc/shm").read().splitlines()[1:]
                           + open("/proc/sysvipc/sem").read().splitlines()[1:]
                           + open("/proc/sysvipc/msg").read().splitlines()[1:]),
        "at %#x %s" % (addr, ctypes.string_at(addr + 4096, 16).decode()),
        "sem %s" % list(vals),
        "msgs %s" % msgs,
        "msgmni " + open("/proc/sys/kernel/msgmni").read().strip(),
        "sem " + " ".join(open("/proc/sys/kernel/sem").read().split()),
    ]
    # Put the messages back for the next report.
    for m in msgs:
        t, text = m.split(":", 1)
        libc.msgsnd(msqid, struct.pack("l", int(t)) + text.encode(), len(text), 0)
    with open(os.path.join(ctl, "report.tmp"), "w") as f:
        f.write("\n".join(out))
    os.rename(os.path.join(ctl, "report.tmp"), os.path.join(ctl, "report"))
signal.signal(signal.SIGUSR1, answer)
open(os.path.join(ctl, "ready"), "w").close()
while True:
    time.sleep(0.05)
"#;

#[test]
fn an_ipc_namespace_comes_back_with_its_segments_semaphores_and_messages() {
    if !cr_ebpf_perf::privileged(
        "an_ipc_namespace_comes_back_with_its_segments_semaphores_and_messages",
    ) {
        return;
    }
    let s = Scratch::new("ipc-ns");
    let (mut child, pid, ctl) = start(&s, IPC, libc::CLONE_NEWIPC, None);
    let _g = KillOnDrop(pid);
    let before = report(pid, &ctl, "report");
    assert!(
        before.contains("keys 4660 22136 39612")
            && before.contains("segment contents")
            && before.contains("sem [4, 5, 6]")
            && before.contains("msgs ['1:first', '7:second!']")
            && before.contains("msgmni 1234")
            && before.contains("sem 32000 2147483647 2147483647 32000"),
        "{before}"
    );
    let ids = before.lines().next().unwrap().to_string();
    assert_ne!(ids, "ids 0 0 0", "not the first ids");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _r = KillOnDrop(r.pid);
    assert_eq!(r.pid, pid);
    assert_eq!(report(pid, &ctl, "report"), before, "everything as it was");
    let me = std::process::id() as i32;
    assert_ne!(ns(pid, "ipc"), ns(me, "ipc"), "a namespace of its own");
    // Nothing of it leaked into the restorer's namespace.
    let ours = std::fs::read_to_string("/proc/sysvipc/msg").unwrap();
    assert!(
        !ours
            .lines()
            .skip(1)
            .any(|l| l.trim_start().starts_with("39612 ")),
        "{ours}"
    );
}
