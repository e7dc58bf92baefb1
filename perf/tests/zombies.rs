//! Zombies of a checkpointed tree: each comes back with the wait status it
//! had (an exit code, or the signal that killed it) for its parent to reap
//! (ZDTM `zombie00`), a zombie in a process group whose leader exited too
//! (ZDTM `zombie01`: a stand-in leads the group while it is made).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{spawn_clean, KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

/// Forks children that end as `KIDS` says, waits until each is a zombie,
/// and on SIGUSR1 reaps them and writes `pid status` lines to `ctl/answer`.
const WORKLOAD: &str = r#"
import ctypes, os, signal, sys, time
ctl = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
kids = []
for how in KIDS:
    pid = os.fork()
    if pid == 0:
        libc.prctl(4, 0, 0, 0, 0)  # no core dump
        if how == "leader":
            os.setpgid(0, 0)
            time.sleep(120)
        elif how == "joins":
            os.setpgid(0, kids[0])
            os._exit(0)
        elif how.startswith("exit"):
            os._exit(int(how[4:]))
        else:
            os.kill(os.getpid(), int(how))
        os._exit(99)
    if how == "leader":
        os.setpgid(pid, pid)
    kids.append(pid)
for pid, how in zip(kids, KIDS):
    if how != "leader":
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
if "leader" in KIDS:
    os.kill(kids[0], signal.SIGKILL)
    os.waitpid(kids[0], 0)
def answer(*_):
    out = []
    for pid, how in zip(kids, KIDS):
        if how != "leader":
            _, st = os.waitpid(pid, 0)
            out.append("%d %d" % (pid, st))
    with open(os.path.join(ctl, "answer.tmp"), "w") as f:
        f.write("\n".join(out))
    os.rename(os.path.join(ctl, "answer.tmp"), os.path.join(ctl, "answer"))
signal.signal(signal.SIGUSR1, answer)
with open(os.path.join(ctl, "kids"), "w") as f:
    f.write(" ".join(map(str, kids)))
open(os.path.join(ctl, "ready"), "w").close()
while True:
    time.sleep(0.05)
"#;

fn start(s: &Scratch, kids: &str) -> (std::process::Child, i32, std::path::PathBuf) {
    let ctl = s.0.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let child = spawn_clean(
        Command::new("/usr/bin/python3")
            .args(["-c", &WORKLOAD.replace("KIDS", kids)])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    cr_ebpf_perf::wait_for_file(&ctl.join("ready"));
    let pid = child.id() as i32;
    (child, pid, ctl)
}

fn state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 2..].chars().next().unwrap()
}

#[test]
fn zombies_come_back_with_their_exit_codes_and_signals() {
    if !cr_ebpf_perf::privileged("zombies_come_back_with_their_exit_codes_and_signals") {
        return;
    }
    let s = Scratch::new("zombies");
    let (mut child, pid, ctl) = start(&s, r#"["exit3", "11", "15", "9"]"#);
    let guard = KillOnDrop(pid);
    let kids: Vec<i32> = std::fs::read_to_string(ctl.join("kids"))
        .unwrap()
        .split_whitespace()
        .map(|k| k.parse().unwrap())
        .collect();
    for k in &kids {
        assert_eq!(state(*k), 'Z', "{k} is a zombie");
    }
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    // The zombies went to init, which reaps them a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while kids
        .iter()
        .any(|k| Path::new(&format!("/proc/{k}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "the old zombies were never reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    for k in &kids {
        assert_eq!(state(*k), 'Z', "{k} is a zombie again");
    }
    // SAFETY: plain kill.
    unsafe { libc::kill(r.pid, libc::SIGUSR1) };
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    let got = std::fs::read_to_string(ctl.join("answer")).unwrap();
    let want: Vec<String> = kids
        .iter()
        .zip([3 << 8, libc::SIGSEGV, libc::SIGTERM, libc::SIGKILL])
        .map(|(k, st)| format!("{k} {st}"))
        .collect();
    assert_eq!(got, want.join("\n"), "reaped with the statuses they had");
}

/// Field `n` (1-based, as proc(5) counts) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(n - 3)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_zombie_in_a_group_whose_leader_exited_comes_back_in_that_group() {
    if !cr_ebpf_perf::privileged("a_zombie_in_a_group_whose_leader_exited_comes_back_in_that_group")
    {
        return;
    }
    let s = Scratch::new("zombie-group");
    let (mut child, pid, ctl) = start(&s, r#"["leader", "joins"]"#);
    let guard = KillOnDrop(pid);
    let kids = std::fs::read_to_string(ctl.join("kids")).unwrap();
    let (leader, joined) = kids.split_once(' ').unwrap();
    let (leader, joined): (i32, i32) = (leader.parse().unwrap(), joined.parse().unwrap());
    assert!(
        !Path::new(&format!("/proc/{leader}")).exists(),
        "the leader is gone"
    );
    assert_eq!(stat_field(joined, 5), leader, "the zombie is in its group");
    let img = s.0.join("img");
    dump(pid, &img, &DumpOptions::default()).expect("dump");
    let _ = child.wait();
    drop(guard);
    // The zombie went to init, which reaps it a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{joined}")).exists() {
        assert!(Instant::now() < deadline, "the old zombie was never reaped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    let _k = KillOnDrop(r.pid);
    assert_eq!(state(joined), 'Z', "a zombie again");
    assert_eq!(stat_field(joined, 4), pid, "of its parent");
    assert_eq!(
        stat_field(joined, 5),
        leader,
        "in the group of the gone leader"
    );
    assert!(
        !Path::new(&format!("/proc/{leader}")).exists(),
        "the stand-in leader is gone again"
    );
    // SAFETY: plain kill.
    unsafe { libc::kill(r.pid, libc::SIGUSR1) };
    cr_ebpf_perf::wait_for_file(&ctl.join("answer"));
    let got = std::fs::read_to_string(ctl.join("answer")).unwrap();
    assert_eq!(got, format!("{joined} 0"), "reaped by its parent only");
}
