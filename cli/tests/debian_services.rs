//! Debian's own services as Debian runs them: nginx (master root, workers
//! `www-data`), memcached (as `memcache`) and PostgreSQL 15 (as `postgres`,
//! six processes, System V and POSIX shared memory), each with its package's
//! default configuration, started the way its systemd unit starts it (this
//! test process is their supervisor: a child subreaper). Each is tracked
//! under load with `cr-ebpf track`, checkpointed once more when the load has
//! stopped, killed with SIGKILL and restored from the newest checkpoint. It
//! then serves with its data, a client connection opened before the
//! checkpoints goes on where one is kept open, and every process has exactly
//! the credentials it had (uids, gids, groups, the five capability sets,
//! no_new_privs, seccomp) and no more anonymous memory than before (+10%).
//! A Go HTTP server built by Debian's Go goes through the same.
//!
//! `cargo xtask setup` installs the packages. Outside CI a missing package
//! or root skips; with `CI=true` it fails, as does a service of the same
//! name already running (the test runs its own on the default ports).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{clean, in_ci, Tracking, BIN};

/// The tests of this file one at a time: each reaps the children it finds
/// (daemons reparented to it), which would take another test's `track`.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Root and every one of `files`; outside CI a missing one skips.
fn ready(test: &str, files: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!in_ci(), "{test} needs root, and CI=true: a failure in CI");
        eprintln!("SKIPPED {test}: needs root (eBPF, ptrace)");
        return false;
    }
    if let Some(f) = files.iter().find(|f| !Path::new(f).exists()) {
        assert!(
            !in_ci(),
            "{test} needs {f} (cargo xtask setup installs it), and CI=true: a failure in CI"
        );
        eprintln!("SKIPPED {test}: needs {f} (cargo xtask setup installs it)");
        return false;
    }
    // Daemons reparent to their supervisor: us.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    true
}

/// Fails naming `what` when something already listens on `port`.
fn port_free(port: u16, what: &str) {
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} is taken: stop the {what} running here (the test runs its own)"
    );
}

/// `pid` and its descendants.
fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for t in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
        i += 1;
    }
    out
}

/// What each process of `pids` is allowed: the credential lines of its
/// `/proc/PID/status`.
fn credentials(pids: &[i32]) -> BTreeMap<i32, String> {
    const KEYS: &[&str] = &[
        "Name",
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ];
    pids.iter()
        .map(|&p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
            let lines: Vec<&str> = status
                .lines()
                .filter(|l| KEYS.iter().any(|k| l.split(':').next() == Some(k)))
                .collect();
            (p, lines.join("; "))
        })
        .collect()
}

/// Anonymous memory of `pids` together, in KiB.
fn rss_anon(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            let l = s.lines().find(|l| l.starts_with("RssAnon:"))?.to_string();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// SIGKILL to every process of `pids`, each reaped (they are ours, or
/// become ours when their parent dies).
fn kill_and_reap(pids: &[i32]) {
    for &p in pids {
        // SAFETY: signalling processes this test started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        // SAFETY: reaping our children, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        assert!(Instant::now() < deadline, "{pids:?} were not reaped");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reaps whatever of ours has exited, for `wait` at most, until `gone`.
fn reap_until(wait: Duration, gone: impl Fn() -> bool) {
    let deadline = Instant::now() + wait;
    while !gone() && Instant::now() < deadline {
        // SAFETY: reaping our children, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `Uid:` line of a process running as `user` (from /etc/passwd).
fn runs_as(user: &str) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let uid = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == user)
        .map(|f| f[2].to_string())
        .unwrap_or_else(|| panic!("no user {user}"));
    format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")
}

/// A scratch directory for images, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = common::fresh_dir(&format!("cr-ebpf-{name}"));
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The credentials and anonymous memory of a service before its kill and
/// after its restore.
struct RoundTrip {
    before: BTreeMap<i32, String>,
    after: BTreeMap<i32, String>,
    anon_before: u64,
    anon_after: u64,
}

/// The service of `pid`, tracked while `load` runs (then at least 3 more
/// checkpoints), checkpointed once more when quiet, killed with SIGKILL and
/// restored; with what `load` returned.
fn round_trip<T>(pid: i32, images: &Path, load: impl FnOnce(&Tracking) -> T) -> (RoundTrip, T) {
    let track = Tracking::start(pid, &["--interval", "500ms"], images);
    let loaded = load(&track);
    let mut ok = 0;
    while ok < 3 {
        let r = track
            .reports
            .recv_timeout(Duration::from_secs(60))
            .expect("a checkpoint report");
        ok += usize::from(r["ok"] == true);
    }
    let snap = Command::new(BIN)
        .args(["snapshot", "--incremental", "--json", "--images-dir"])
        .arg(images)
        .output()
        .unwrap();
    assert!(
        snap.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&snap.stderr)
    );
    let pids = tree(pid);
    let before = credentials(&pids);
    let anon_before = rss_anon(&pids);
    kill_and_reap(&pids);
    let (status, err) = track.finish();
    // 4: the service ended because the process is gone.
    assert_eq!(status.code(), Some(4), "track: {err}");
    common::restore_detached(images);
    let after = credentials(&tree(pid));
    let anon_after = rss_anon(&tree(pid));
    eprintln!("anonymous memory: {anon_before} KiB before, {anon_after} KiB after the restore");
    let rt = RoundTrip {
        before,
        after,
        anon_before,
        anon_after,
    };
    (rt, loaded)
}

impl RoundTrip {
    /// Same processes, same credentials, no memory bloat.
    fn check(&self) {
        assert_eq!(self.after, self.before, "credentials after the restore");
        assert!(
            self.anon_after * 10 <= self.anon_before * 11,
            "anonymous memory grew from {} to {} KiB",
            self.anon_before,
            self.anon_after
        );
    }
}

/// One HTTP/1.1 request on a kept-alive connection: status and body.
fn http_get(conn: &mut BufReader<TcpStream>) -> (u32, Vec<u8>) {
    conn.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut status = String::new();
    conn.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0;
    loop {
        let mut h = String::new();
        conn.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).unwrap();
    (code, body)
}

fn http_connect() -> BufReader<TcpStream> {
    http_connect_to(80)
}

fn http_connect_to(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("the server answers");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

#[test]
fn debian_nginx_is_tracked_killed_and_restored_with_its_workers_as_www_data() {
    let _serial = serial();
    let test = "debian_nginx_is_tracked_killed_and_restored_with_its_workers_as_www_data";
    if !ready(test, &["/usr/sbin/nginx", "/etc/nginx/nginx.conf"]) {
        return;
    }
    port_free(80, "nginx");
    let scratch = Scratch::new("nginx");
    // As nginx.service: `nginx -g 'daemon on; master_process on;'`.
    let started = clean("/usr/sbin/nginx")
        .args(["-g", "daemon on; master_process on;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(started.success(), "nginx did not start");
    let pid: i32 = std::fs::read_to_string("/run/nginx.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut kept = http_connect();
    let (code, page) = http_get(&mut kept);
    assert_eq!(code, 200);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rt, ()) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(http_get(&mut http_connect()).0, 200);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        round_trip(pid, &scratch.0.join("images"), |track| {
            // Load through two checkpoints, then quiet.
            for _ in 0..2 {
                let _ = track.reports.recv_timeout(Duration::from_secs(60));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    });
    // The kept-alive connection goes on, and new ones are served.
    assert_eq!(http_get(&mut kept), (200, page.clone()));
    assert_eq!(http_get(&mut http_connect()), (200, page));
    rt.check();
    let workers = rt
        .before
        .values()
        .filter(|c| c.contains(&runs_as("www-data")));
    assert!(workers.count() >= 1, "workers as www-data: {:?}", rt.before);
    assert!(rt.before[&pid].contains(&runs_as("root")));
    // SAFETY: asking the restored master to quit (as nginx.service's stop).
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    reap_until(Duration::from_secs(10), || {
        !Path::new("/run/nginx.pid").exists()
    });
    kill_and_reap(&tree(pid));
}

/// One memcached text-protocol command and its reply up to `end`.
fn memcache(conn: &mut BufReader<TcpStream>, cmd: &str, end: &str) -> String {
    conn.get_mut().write_all(cmd.as_bytes()).unwrap();
    let mut out = String::new();
    while !out.ends_with(end) {
        let n = conn.read_line(&mut out).unwrap();
        assert!(n > 0, "memcached closed the connection after {out:?}");
    }
    out
}

fn memcache_connect() -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", 11211)).expect("memcached answers on port 11211");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

#[test]
fn debian_memcached_is_tracked_killed_and_restored_as_memcache() {
    let _serial = serial();
    let test = "debian_memcached_is_tracked_killed_and_restored_as_memcache";
    let wrapper = "/usr/share/memcached/scripts/systemd-memcached-wrapper";
    if !ready(
        test,
        &["/usr/bin/memcached", wrapper, "/etc/memcached.conf"],
    ) {
        return;
    }
    port_free(11211, "memcached");
    let scratch = Scratch::new("memcached");
    // As memcached.service: the wrapper execs memcached with the options
    // of /etc/memcached.conf (`-u memcache`, its pid file in /run/memcached).
    let run = Path::new("/run/memcached");
    std::fs::create_dir_all(run).unwrap();
    let chown = Command::new("chown")
        .args(["memcache:memcache"])
        .arg(run)
        .status();
    assert!(chown.unwrap().success());
    let server = clean(wrapper)
        .arg("/etc/memcached.conf")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = server.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kept = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", 11211)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            break BufReader::new(s);
        }
        assert!(Instant::now() < deadline, "memcached did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    for i in 0..2000 {
        let v = format!("value-{i}-{}", "x".repeat(i % 300));
        let cmd = format!("set k{i} 0 0 {}\r\n{v}\r\n", v.len());
        assert_eq!(memcache(&mut kept, &cmd, "\r\n"), "STORED\r\n");
    }
    let (rt, ()) = round_trip(pid, &scratch.0.join("images"), |track| {
        // Writes through two checkpoints on another connection.
        let mut c = memcache_connect();
        let mut n = 0;
        let mut seen = 0;
        while seen < 2 {
            let cmd = format!("set load{} 0 0 4\r\n{:04}\r\n", n % 100, n % 10_000);
            assert_eq!(memcache(&mut c, &cmd, "\r\n"), "STORED\r\n");
            n += 1;
            seen += usize::from(track.reports.try_recv().is_ok());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // The same data, through the connection kept since before.
    for i in (0..2000).step_by(7) {
        let v = format!("value-{i}-{}", "x".repeat(i % 300));
        let want = format!("VALUE k{i} 0 {}\r\n{v}\r\nEND\r\n", v.len());
        assert_eq!(
            memcache(&mut kept, &format!("get k{i}\r\n"), "END\r\n"),
            want
        );
    }
    let mut fresh = memcache_connect();
    assert_eq!(
        memcache(&mut fresh, "set after 0 0 1\r\n1\r\n", "\r\n"),
        "STORED\r\n"
    );
    rt.check();
    assert!(
        rt.before[&pid].contains(&runs_as("memcache")),
        "{:?}",
        rt.before
    );
    drop(server);
    kill_and_reap(&tree(pid));
}

/// `psql` as the `postgres` user over the cluster's unix socket: one
/// statement, its unaligned output.
fn psql(sql: &str) -> String {
    let out = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-qAt",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn debian_postgresql_15_is_tracked_killed_and_restored_as_postgres() {
    let _serial = serial();
    let test = "debian_postgresql_15_is_tracked_killed_and_restored_as_postgres";
    let ctl = "/usr/bin/pg_ctlcluster";
    let conf = "/etc/postgresql/15/main/postgresql.conf";
    if !ready(test, &["/usr/lib/postgresql/15/bin/postgres", ctl, conf]) {
        return;
    }
    port_free(5432, "PostgreSQL cluster");
    let scratch = Scratch::new("postgresql");
    // As postgresql@15-main.service.
    let start = |what: &str| {
        let s = clean(ctl)
            .args(["--skip-systemctl-redirect", "15", "main", what])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(s.success(), "pg_ctlcluster 15 main {what} failed");
    };
    start("start");
    let pid: i32 = std::fs::read_to_string("/var/lib/postgresql/15/main/postmaster.pid")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    psql("DROP TABLE IF EXISTS cr_ebpf_t; CREATE TABLE cr_ebpf_t (x int, s text)");
    psql("INSERT INTO cr_ebpf_t SELECT i, md5(i::text) FROM generate_series(1, 20000) i");
    let base = tree(pid).len();
    let digest = "SELECT count(*), sum(x), md5(string_agg(s, ',' ORDER BY x)) FROM cr_ebpf_t";
    let (rt, before) = round_trip(pid, &scratch.0.join("images"), |track| {
        // Short sessions through two checkpoints (a checkpoint that meets
        // a backend still talking to psql over the unix socket is refused,
        // the service runs on), then the backends gone.
        let mut seen = 0;
        let mut n = 20000;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen < 2 {
            assert!(Instant::now() < deadline, "no checkpoint in 60 s of load");
            n += 1;
            psql(&format!("INSERT INTO cr_ebpf_t VALUES ({n}, md5('{n}'))"));
            seen += usize::from(track.reports.try_recv().is_ok_and(|r| r["ok"] == true));
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = psql(digest);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tree(pid).len() > base {
            assert!(Instant::now() < deadline, "backends still running");
            std::thread::sleep(Duration::from_millis(20));
        }
        before
    });
    // The table as it was, and the cluster takes writes.
    assert_eq!(psql(digest), before);
    psql("INSERT INTO cr_ebpf_t VALUES (0, 'after')");
    rt.check();
    let postgres = runs_as("postgres");
    assert!(rt.before.len() >= 5, "{:?}", rt.before);
    assert!(
        rt.before.values().all(|c| c.contains(&postgres)),
        "{:?}",
        rt.before
    );
    psql("DROP TABLE cr_ebpf_t");
    start("stop");
    kill_and_reap(&tree(pid));
}

/// A Go service as one is deployed: a static binary built by Debian's Go
/// from the standard library only, its own runtime threads, and 16 MiB of
/// heap that each request changes. A request answers the number of hits and
/// an FNV-1a hash of that heap.
const GO_SERVER: &str = r#"package main

import (
	"fmt"
	"hash/fnv"
	"net/http"
	"sync"
)

func main() {
	var mu sync.Mutex
	state := make([]byte, 16<<20)
	for i := range state {
		state[i] = byte(i * 7)
	}
	hits := 0
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		hits++
		state[(hits*4099)%len(state)]++
		h := fnv.New64a()
		h.Write(state)
		body := fmt.Sprintf("hits=%d fnv=%x", hits, h.Sum64())
		mu.Unlock()
		fmt.Fprint(w, body)
	})
	panic(http.ListenAndServe("127.0.0.1:18080", nil))
}
"#;

/// What the Go server answers after `hits` requests.
fn go_answer(hits: usize) -> String {
    let mut state: Vec<u8> = (0..16usize << 20).map(|i| (i * 7) as u8).collect();
    let n = state.len();
    for k in 1..=hits {
        state[(k * 4099) % n] = state[(k * 4099) % n].wrapping_add(1);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &state {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("hits={hits} fnv={h:x}")
}

/// The hit count of a Go server's answer.
fn go_hits(body: &[u8]) -> usize {
    let text = String::from_utf8_lossy(body);
    text.strip_prefix("hits=")
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a Go server answer: {text:?}"))
}

#[test]
fn a_go_http_server_is_tracked_killed_and_restored_with_its_heap() {
    let _serial = serial();
    let test = "a_go_http_server_is_tracked_killed_and_restored_with_its_heap";
    if !ready(test, &["/usr/bin/go"]) {
        return;
    }
    port_free(18080, "Go server (of another run of this test?)");
    let scratch = Scratch::new("go-http");
    std::fs::write(scratch.0.join("main.go"), GO_SERVER).unwrap();
    // The build cache outlives the test: the first build takes a while.
    let cache = std::env::temp_dir().join("cr-ebpf-go-cache");
    let built = Command::new("/usr/bin/go")
        .args(["build", "-o", "server", "main.go"])
        .current_dir(&scratch.0)
        .env("GOCACHE", &cache)
        .env("GOPATH", scratch.0.join("gopath"))
        .env("GO111MODULE", "off")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    // Its output to a log file, as a supervisor would keep it (a pipe to
    // this test would become the restorer's own stream).
    let log = std::fs::File::create(scratch.0.join("server.log")).unwrap();
    let child = clean(scratch.0.join("server"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", 18080)).is_err() {
        assert!(Instant::now() < deadline, "the Go server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut kept = http_connect_to(18080);
    let (code, body) = http_get(&mut kept);
    assert_eq!(
        (code, String::from_utf8_lossy(&body)),
        (200, go_answer(1).into())
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rt, ()) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(http_get(&mut http_connect_to(18080)).0, 200);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        round_trip(pid, &scratch.0.join("images"), |track| {
            for _ in 0..2 {
                let _ = track.reports.recv_timeout(Duration::from_secs(60));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    });
    // (Reaped by round_trip: the pid is the restored server's now.)
    drop(child);
    // The heap is exactly what those hits made of it, on the connection
    // kept open and on a new one.
    let (code, body) = http_get(&mut kept);
    assert_eq!(code, 200);
    let hits = go_hits(&body);
    assert!(hits > 2, "only {hits} hits");
    assert_eq!(String::from_utf8_lossy(&body), go_answer(hits));
    let (_, body) = http_get(&mut http_connect_to(18080));
    assert_eq!(String::from_utf8_lossy(&body), go_answer(hits + 1));
    rt.check();
    kill_and_reap(&tree(pid));
}
