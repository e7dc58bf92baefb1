//! A real service under load: redis-server (Debian's package) with 200k
//! keys, under redis-benchmark, tracked with `cr-ebpf track --interval 1s`;
//! killed with SIGKILL after several checkpoints and restored from the
//! newest. It answers on the same port with the dataset of that checkpoint
//! (DBSIZE and DEBUG DIGEST as captured), and a client connection opened
//! before the checkpoints keeps working (TCP repair).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{clean, in_ci, Tracking, BIN};

/// Root and redis-server present; outside CI a missing one skips.
fn ready(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let redis = ["redis-server", "redis-benchmark"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if root && redis {
        return true;
    }
    let why = if root {
        "redis-server and redis-benchmark (cargo xtask setup installs them)"
    } else {
        "root (eBPF, ptrace)"
    };
    assert!(!in_ci(), "{test} needs {why}, and CI=true: a failure in CI");
    eprintln!("SKIPPED {test}: needs {why}");
    false
}

/// One redis connection speaking RESP.
struct Redis {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

impl Redis {
    fn connect(port: u16) -> std::io::Result<Self> {
        let out = TcpStream::connect(("127.0.0.1", port))?;
        out.set_read_timeout(Some(Duration::from_secs(30)))?;
        let input = BufReader::new(out.try_clone()?);
        Ok(Self { out, input })
    }

    fn call(&mut self, args: &[&str]) -> Reply {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        self.out
            .write_all(req.as_bytes())
            .expect("sending to redis");
        let mut line = String::new();
        self.input.read_line(&mut line).expect("a reply from redis");
        assert!(!line.is_empty(), "redis closed the connection ({args:?})");
        let (kind, rest) = line.trim_end().split_at(1);
        match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(rest.parse().unwrap()),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Reply::Bulk(None);
                }
                let mut b = vec![0u8; n as usize + 2];
                self.input.read_exact(&mut b).unwrap();
                b.truncate(n as usize);
                Reply::Bulk(Some(b))
            }
            _ => panic!("unexpected redis reply {line:?}"),
        }
    }

    fn digest(&mut self) -> String {
        match self.call(&["DEBUG", "DIGEST"]) {
            Reply::Simple(d) => d,
            Reply::Bulk(Some(d)) => String::from_utf8(d).unwrap(),
            other => panic!("DEBUG DIGEST: {other:?}"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Reap(Vec<Child>, Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for &pid in &self.1 {
            // SAFETY: signalling and reaping processes this test made.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

#[test]
fn redis_under_load_is_killed_and_restored_from_its_newest_checkpoint() {
    let test = "redis_under_load_is_killed_and_restored_from_its_newest_checkpoint";
    if !ready(test) {
        return;
    }
    // The restored server is reparented to us when `cr-ebpf restore` exits.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let dir = common::fresh_dir("cr-ebpf-redis");
    let images: PathBuf = dir.join("images");
    let port = free_port();
    let log = std::fs::File::create(dir.join("redis.log")).unwrap();
    let server = clean("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
        .args(["--protected-mode", "no", "--enable-debug-command", "local"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting redis-server");
    let pid = server.id() as i32;
    let mut reap = Reap(vec![server], Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admin = loop {
        if let Ok(r) = Redis::connect(port) {
            break r;
        }
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        admin.call(&["DEBUG", "POPULATE", "200000"]),
        Reply::Simple("OK".into())
    );
    // The client whose connection spans the checkpoints.
    let mut client = Redis::connect(port).unwrap();
    assert_eq!(client.call(&["PING"]), Reply::Simple("PONG".into()));

    let bench = clean("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "-n", "100000000"])
        .args(["-r", "200000", "-c", "4", "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let bench_pid = bench.id() as i32;
    reap.0.push(bench);
    let track = Tracking::start(pid, &["--interval", "1s"], &images);
    let rx = &track.reports;
    // Several checkpoints under load.
    let mut reports = Vec::new();
    while reports.len() < 4 {
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a checkpoint report");
        assert_eq!(r["ok"], true, "{r}");
        reports.push(r);
    }
    // Writes pause: the load stops, and its connections close.
    // SAFETY: stopping our own child.
    unsafe { libc::kill(bench_pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let dbsize = admin.call(&["DBSIZE"]);
    let digest = admin.digest();
    assert!(
        matches!(dbsize, Reply::Int(n) if n >= 200_000),
        "{dbsize:?}"
    );
    drop(admin);
    std::thread::sleep(Duration::from_millis(100));
    let snap = Command::new(BIN)
        .args(["snapshot", "--incremental", "--json", "--images-dir"])
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        snap.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&snap.stderr)
    );

    // SIGKILL, reaped.
    // SAFETY: killing our own child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = reap.0[0].wait();
    let (status, err) = track.finish();
    // 4: the service ended because the process is gone.
    assert_eq!(status.code(), Some(4), "track: {err}");
    assert!(
        err.contains("1 established TCP connection(s)"),
        "the spanning connection was kept: {err}"
    );

    common::restore_detached(&images);
    reap.1.push(pid);
    // The same connection, the same data.
    assert_eq!(client.call(&["PING"]), Reply::Simple("PONG".into()));
    assert_eq!(client.call(&["DBSIZE"]), dbsize);
    assert_eq!(client.digest(), digest);
    // New connections on the same port, and writes.
    let mut fresh = Redis::connect(port).expect("the port answers after restore");
    assert_eq!(
        fresh.call(&["SET", "after-restore", "1"]),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        client.call(&["GET", "after-restore"]),
        Reply::Bulk(Some(b"1".to_vec()))
    );
    drop(reap);
    let _ = std::fs::remove_dir_all(&dir);
}
