//! A real terminal program end to end: a tmux server with an interactive
//! bash in its pane is dumped, killed and restored; a new tmux client then
//! reaches it, bash runs what is typed and sees the same window size. (In a
//! file of its own: the test makes itself a child subreaper, which must not
//! change what the other tests' orphans do.)

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cr_ebpf_checkpoint::{dump, DumpOptions};
use cr_ebpf_perf::{KillOnDrop, Scratch};
use cr_ebpf_restore::{restore, RestoreOptions};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `tmux -S SOCK ARGS`, its output.
fn tmux(sock: &Path, args: &[&str]) -> String {
    let out = cr_ebpf_perf::workload(Command::new("tmux").arg("-S").arg(sock).args(args))
        .stdin(Stdio::null())
        .output()
        .expect("run tmux");
    assert!(out.status.success(), "tmux {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reaps `pids` if they ended (children of ours: we are a subreaper here;
/// only these, the other tests have children of their own).
fn reap(pids: &[i32]) {
    for &p in pids {
        // SAFETY: waitpid without a status pointer.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG) };
    }
}

#[test]
fn a_tmux_server_with_bash_inside_comes_back_and_serves_new_clients() {
    if !cr_ebpf_perf::privileged("a_tmux_server_with_bash_inside_comes_back_and_serves_new_clients")
    {
        return;
    }
    if !Path::new("/usr/bin/tmux").exists() {
        assert!(
            !cr_ebpf_perf::in_ci(),
            "tmux missing: run `cargo xtask setup`"
        );
        eprintln!("SKIPPED: tmux is not installed");
        return;
    }
    // tmux daemonizes its server: as our subreaper it stays our child, and
    // its pid is free again once the dump killed it and we reaped it.
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    let s = Scratch::new("terminals-tmux");
    let sock = s.0.join("sock");
    tmux(
        &sock,
        &[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "90",
            "-y",
            "30",
            "bash --norc --noprofile -i",
        ],
    );
    let server: i32 = tmux(&sock, &["display-message", "-p", "#{pid}"])
        .trim()
        .parse()
        .unwrap();
    let _g = KillOnDrop(server);
    let pane = || tmux(&sock, &["capture-pane", "-p"]);
    tmux(&sock, &["send-keys", "echo hi-$((3*4))", "Enter"]);
    wait_for("hi-12", || pane().contains("hi-12"));
    let bash: i32 = std::fs::read_to_string(format!("/proc/{server}/task/{server}/children"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let img = s.0.join("img");
    // Clients that just went may still be closing on the server's side,
    // output may still be on its way to tmux: try again for a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match dump(server, &img, &DumpOptions::default()) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("dump refused, trying again: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("dump: {e}"),
        }
    }
    wait_for("the server and bash to go", || {
        reap(&[server, bash]);
        ![server, bash]
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    });
    let r = restore(&img, &RestoreOptions::default()).expect("restore");
    assert_eq!(r.pid, server);
    // The first client after the restore. In about 1 CI run in 5 it was
    // told "no server running" (its connect refused); while the restored
    // server runs it is asked again for up to 3 s, each refusal reported,
    // and a server that is gone fails the test with what was seen.
    let keys = [
        "send-keys",
        "echo after-$((5*5)); tput lines; tput cols",
        "Enter",
    ];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = cr_ebpf_perf::workload(Command::new("tmux").arg("-S").arg(&sock).args(keys))
            .stdin(Stdio::null())
            .output()
            .expect("run tmux");
        if out.status.success() {
            break;
        }
        let alive = Path::new(&format!("/proc/{server}")).exists();
        let state = std::fs::read_to_string(format!("/proc/{server}/stat")).unwrap_or_default();
        let seen = format!(
            "tmux {keys:?}: {out:?}; server {server} alive {alive} ({}), socket file {}",
            state.split_whitespace().nth(2).unwrap_or("-"),
            if sock.exists() { "present" } else { "gone" },
        );
        assert!(alive && Instant::now() < deadline, "{seen}");
        eprintln!("refused right after the restore, asking again: {seen}");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for("bash to answer", || {
        let p = pane();
        p.contains("after-25\n30\n90")
    });
    tmux(&sock, &["kill-server"]);
    wait_for("the restored server to go", || {
        reap(&[server, bash]);
        ![server, bash]
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    });
}
