//! Memory a process can see comes back: shared memory objects larger than
//! 64 MiB (ZDTM maps01; PostgreSQL's shared buffers); membarrier
//! registrations (ZDTM membarrier); guard pages (ZDTM maps12).

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Starts the python3 `script` with a control directory as its argument;
/// it writes `ctl/ready` once set up and answers `ctl/ask` (any content)
/// by writing `ctl/answer`.
fn start(s: &Scratch, script: &str) -> (std::process::Child, i32, std::path::PathBuf) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = spawn_clean(&mut cmd);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let pid = child.id() as i32;
    (child, pid, ctl)
}

/// What the workload answers when asked.
fn ask(ctl: &std::path::Path) -> String {
    let _ = std::fs::remove_file(ctl.join("answer"));
    std::fs::write(ctl.join("ask.tmp"), "?").unwrap();
    std::fs::rename(ctl.join("ask.tmp"), ctl.join("ask")).unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    std::fs::read_to_string(ctl.join("answer")).unwrap()
}

/// The answering loop of a workload: `ANSWER()` returns a string.
const LOOP: &str = r#"
open(os.path.join(ctl, 'ready'), 'w').close()
while True:
    if os.path.exists(os.path.join(ctl, 'ask')):
        os.unlink(os.path.join(ctl, 'ask'))
        with open(os.path.join(ctl, 'answer.tmp'), 'w') as f:
            f.write(ANSWER())
        os.rename(os.path.join(ctl, 'answer.tmp'), os.path.join(ctl, 'answer'))
    time.sleep(0.02)
"#;

/// Eight pages, each written, then guard regions on pages 1 and 4-5; the
/// answer: which pages are guards (pagemap bit 58) and what the others
/// hold.
const GUARDS: &str = r#"
import ctypes, mmap, os, struct, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
a = libc.mmap(None, 8 * 4096, 3, 0x22, -1, 0)
for i in range(8):
    ctypes.memmove(a + i * 4096, b'page%d' % i, 5)
assert libc.madvise(a + 4096, 4096, 102) == 0
assert libc.madvise(a + 4 * 4096, 2 * 4096, 102) == 0
def ANSWER():
    with open('/proc/self/pagemap', 'rb') as f:
        f.seek(a // 4096 * 8)
        e = struct.unpack('<8Q', f.read(64))
    guards = [i for i in range(8) if e[i] >> 58 & 1]
    data = [ctypes.string_at(a + i * 4096, 5).decode() for i in range(8) if i not in guards]
    return '%s %s' % (guards, data)
"#;

#[test]
fn a_shared_memory_object_over_64_mib_comes_back() {
    if !cr_ebpf_perf::privileged("a_shared_memory_object_over_64_mib_comes_back") {
        return;
    }
    // 1 GiB of shared anonymous memory, sparse, and a 160 MiB memfd with
    // 72 MiB written in one run (more than one stored piece).
    let script = r#"
import hashlib, mmap, os, sys, time
ctl = sys.argv[1]
big = mmap.mmap(-1, 1 << 30, mmap.MAP_SHARED)
for off in (0, 1 << 29, (1 << 30) - 4096):
    big[off:off + 5] = b'mark!'
fd = os.memfd_create('buffers')
os.ftruncate(fd, 160 << 20)
buf = mmap.mmap(fd, 160 << 20, mmap.MAP_SHARED)
for i in range(0, 72 << 20, 4096):
    buf[(8 << 20) + i:(8 << 20) + i + 8] = i.to_bytes(8, 'little')
def ANSWER():
    h = hashlib.sha256(buf[:]).hexdigest()
    return ' '.join([big[0:5].decode(), big[1 << 29:(1 << 29) + 5].decode(),
                     big[(1 << 30) - 4096:(1 << 30) - 4091].decode(), h])
"#;
    let s = Scratch::new("mem-bigshm");
    let (mut child, pid, ctl) = start(&s, &format!("{script}{LOOP}"));
    let guard = KillOnDrop(pid);
    let before = ask(&ctl);
    assert!(before.starts_with("mark! mark! mark! "), "{before}");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), before, "the same contents");
}

#[test]
fn membarrier_registrations_come_back() {
    if !cr_ebpf_perf::privileged("membarrier_registrations_come_back") {
        return;
    }
    // Registered for global and private expedited barriers; the answer is
    // the registrations the kernel reports and whether a private expedited
    // barrier works (EPERM without its registration).
    let script = r#"
import ctypes, os, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
mb = lambda cmd: libc.syscall(324, cmd, 0, 0)
assert mb(1 << 2) == 0 and mb(1 << 4) == 0
def ANSWER():
    return '%#x %d' % (mb(1 << 9), mb(1 << 3))
"#;
    let s = Scratch::new("mem-membarrier");
    let (mut child, pid, ctl) = start(&s, &format!("{script}{LOOP}"));
    let guard = KillOnDrop(pid);
    let before = ask(&ctl);
    assert_eq!(before, "0x14 0", "registered before");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), before, "registered again");
}

#[test]
fn guard_pages_come_back_where_they_were() {
    if !cr_ebpf_perf::privileged("guard_pages_come_back_where_they_were") {
        return;
    }
    let s = Scratch::new("mem-guards");
    let (mut child, pid, ctl) = start(&s, &format!("{GUARDS}{LOOP}"));
    let guard = KillOnDrop(pid);
    let before = ask(&ctl);
    assert!(before.starts_with("[1, 4, 5] "), "{before}");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), before, "the same guards, the same data");
}

#[test]
fn guard_pages_carried_over_by_an_incremental_checkpoint_come_back() {
    if !cr_ebpf_perf::privileged("guard_pages_carried_over_by_an_incremental_checkpoint_come_back")
    {
        return;
    }
    use cr_ebpf_checkpoint::{Changes, Session, SessionOptions};
    let s = Scratch::new("mem-guards-incr");
    let (mut child, pid, ctl) = start(&s, &format!("{GUARDS}{LOOP}"));
    let guard = KillOnDrop(pid);
    let before = ask(&ctl);
    assert!(before.starts_with("[1, 4, 5] "), "{before}");
    let images = s.0.join("images");
    let mut session = Session::new(pid, &images, None, SessionOptions::default()).expect("session");
    let first = session.checkpoint(&Changes::all()).expect("first");
    // The log shows nothing since: the guards are taken from the first.
    let second = session.checkpoint(&Changes::none()).expect("second");
    drop(session);
    let guarded = |name: &str| {
        let m = cr_ebpf_image::Manifest::read(&images.join(name)).unwrap();
        m.mappings.iter().map(|x| x.guards.len()).sum::<usize>()
    };
    assert_eq!(guarded(&first.name), 2);
    assert_eq!(guarded(&second.name), 2, "carried over");
    // SAFETY: plain kill.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
    drop(guard);
    let r = restore(&images, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(ask(&ctl), before, "the same guards, the same data");
}
