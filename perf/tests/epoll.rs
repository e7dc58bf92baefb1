//! An epoll registration whose number was closed or now holds another file
//! lives on while its file does (ZDTM epoll, epoll01): it comes back,
//! reporting the same events and data for the same file; an epoll set
//! shared by two processes (fork) is refused.

use std::process::{Command, Stdio};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// python3: pipe A registered under 700, 700 closed (A's read end stays
/// open elsewhere); pipe B's read end then put under 700 and registered
/// too; pipe C registered under its own number. On `ctl/ask` it writes
/// into the pipes named in the request and answers with the data words
/// `epoll_wait` reports.
const WORKLOAD: &str = r#"
import os, select, sys, time
ctl = sys.argv[1]
ep = select.epoll()
pipes = {k: os.pipe() for k in 'ABC'}
os.dup2(pipes['A'][0], 700)
ep.register(700, select.EPOLLIN)
os.close(700)
os.dup2(pipes['B'][0], 700)
os.close(pipes['B'][0])
ep.register(700, select.EPOLLIN)
ep.register(pipes['C'][0], select.EPOLLIN)
open(os.path.join(ctl, 'ready'), 'w').close()
while True:
    if os.path.exists(os.path.join(ctl, 'ask')):
        which = open(os.path.join(ctl, 'ask')).read()
        for k in which:
            os.write(pipes[k][1], b'x')
        got = sorted(fd for fd, ev in ep.poll(1))
        reads = {}
        for k in which:
            src = 700 if k == 'B' else pipes[k][0]
            reads[k] = os.read(src, 10)
        with open(os.path.join(ctl, 'answer.tmp'), 'w') as f:
            f.write(repr((got, sorted(reads.items()))))
        os.rename(os.path.join(ctl, 'answer.tmp'), os.path.join(ctl, 'answer'))
        os.unlink(os.path.join(ctl, 'ask'))
    time.sleep(0.02)
"#;

fn ask(ctl: &std::path::Path, which: &str) -> String {
    let _ = std::fs::remove_file(ctl.join("answer"));
    std::fs::write(ctl.join("ask.tmp"), which).unwrap();
    std::fs::rename(ctl.join("ask.tmp"), ctl.join("ask")).unwrap();
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    std::fs::read_to_string(ctl.join("answer")).unwrap()
}

#[test]
fn registrations_of_closed_and_reused_numbers_come_back() {
    if !cr_ebpf_perf::privileged("registrations_of_closed_and_reused_numbers_come_back") {
        return;
    }
    let s = Scratch::new("epoll-stale");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", WORKLOAD])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_clean(&mut cmd);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    // Python's epoll reports the registered number as its data: A's
    // registration (number 700, file A) and B's (700, file B) alike.
    let before = [ask(&ctl, "A"), ask(&ctl, "B"), ask(&ctl, "C")];
    assert!(before[0].starts_with("([700]"), "{}", before[0]);
    assert!(before[1].starts_with("([700]"), "{}", before[1]);
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    let m = cr_ebpf_image::Manifest::read(&img).unwrap();
    let sources: Vec<_> = m
        .fds
        .iter()
        .filter_map(|f| match &f.state {
            cr_ebpf_image::FdState::Epoll(items) => Some(items.clone()),
            _ => None,
        })
        .flatten()
        .filter(|i| i.source.is_some())
        .collect();
    assert_eq!(sources.len(), 1, "A's registration names where A is open");
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    let after = [ask(&ctl, "A"), ask(&ctl, "B"), ask(&ctl, "C")];
    assert_eq!(after, before);
    let at_700 = std::fs::read_link(format!("/proc/{}/fd/700", r.pid)).unwrap();
    assert!(
        at_700.display().to_string().starts_with("pipe:"),
        "B under 700"
    );
}

#[test]
fn an_epoll_set_shared_across_fork_is_refused() {
    if !cr_ebpf_perf::privileged("an_epoll_set_shared_across_fork_is_refused") {
        return;
    }
    // The child inherits the parent's epoll set: one set, two processes.
    let script = r#"
import os, select, sys, time
ctl = sys.argv[1]
ep = select.epoll()
r, w = os.pipe()
ep.register(r, select.EPOLLIN)
if os.fork() == 0:
    while True: time.sleep(1)
open(os.path.join(ctl, 'ready'), 'w').close()
while True: time.sleep(1)
"#;
    let s = Scratch::new("epoll-shared");
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", script])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = spawn_clean(&mut cmd);
    let pid = child.id() as i32;
    let guard = KillOnDrop(pid);
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let kid: i32 = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let kid_guard = KillOnDrop(kid);
    let img = s.0.join("img");
    let err = dump(pid, &img, &DumpOptions::default()).unwrap_err();
    assert!(err.to_string().contains("epoll set shared"), "{err}");
    assert!(!img.exists(), "no image published");
    for p in [pid, kid] {
        let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
        assert!(st.contains("TracerPid:\t0"), "{p} let go: {st}");
    }
    drop((guard, kid_guard));
    let _ = child.wait();
}
