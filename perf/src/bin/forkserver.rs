//! A forking server for process-tree tests: a parent (a session leader)
//! and four workers, each worker on its own socket pair with the parent,
//! each with an epoll loop on a timerfd (every 20 ms it sends the parent
//! `I N`, its tick count); worker 1 leads its own process group. A fifth
//! child exits at once with status 3 and stays a zombie until the parent
//! is told to reap.
//!
//! The parent epolls on the workers' sockets, a signalfd (SIGUSR1) and a
//! 100 ms timerfd; every tick it appends `status w0=N w1=N w2=N w3=N
//! reaped=PID:CODE,...` to LOG. On SIGUSR1 it tells worker 0 to exit and
//! from then on reaps its children at every tick.
//!
//! The parent and the workers share a page of anonymous memory
//! (`MAP_SHARED`): each worker also counts its ticks there, and the status
//! line shows those counts as `shm=N,N,N,N`.
//!
//! On SIGUSR2, once worker 0 is gone, the parent starts a new worker 0 (a
//! new process, on a new socket pair, with only the descriptors it needs)
//! and logs `respawned 0 PID`: the tree gains a process.
//!
//! The parent and every worker keep a self-checking memory pattern (1 MiB,
//! a few words changed every 100 ms): a page lost or stale after a restore
//! shows as `bad=WHO:N` in the status line (`P` for the parent, a worker's
//! number otherwise); it stays empty while memory is intact.
//!
//! Usage: `forkserver LOG` (prints `ready PARENT W0 W1 W2 W3 ZOMBIE` to LOG).

use std::{io::Write as _, os::fd::RawFd};

fn ok(r: i64, what: &str) -> i64 {
    if r < 0 {
        eprintln!("forkserver: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    r
}

fn read_some(fd: RawFd) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    buf[..n.max(0) as usize].to_vec()
}

fn worker(i: usize, sock: RawFd, shared: *mut u64) -> ! {
    let mut pattern = cr_ebpf_perf::Pattern::new(1);
    // SAFETY: plain syscalls on our own descriptors.
    unsafe {
        let ep = ok(libc::epoll_create1(0) as i64, "epoll_create1") as RawFd;
        let tfd = cr_ebpf_perf::periodic_timerfd(20);
        cr_ebpf_perf::epoll_add(ep, tfd, 1);
        cr_ebpf_perf::epoll_add(ep, sock, 2);
        let mut n = 0u64;
        loop {
            let mut evs: [libc::epoll_event; 4] = std::mem::zeroed();
            let k = libc::epoll_wait(ep, evs.as_mut_ptr(), 4, -1);
            for ev in &evs[..k.max(0) as usize] {
                match ev.u64 {
                    1 => {
                        read_some(tfd);
                        n += 1;
                        shared.add(i).write_volatile(n);
                        let bad = if n.is_multiple_of(5) {
                            let (got, want) = pattern.step(n);
                            got != want
                        } else {
                            false
                        };
                        let line = format!("{i} {n}{}\n", if bad { " BAD" } else { "" });
                        libc::write(sock, line.as_ptr().cast(), line.len());
                    }
                    _ => {
                        let got = read_some(sock);
                        if got.is_empty() || got.windows(4).any(|w| w == b"exit") {
                            libc::_exit(10 + i as i32);
                        }
                    }
                }
            }
        }
    }
}

/// Forks worker `i` on a new socket pair: returns its pid and the parent's
/// end. A `clean` worker keeps only its own socket (and the shared page);
/// otherwise it inherits the parent's descriptors, as the first ones do.
///
/// # Safety
/// `shared` points at the shared page.
unsafe fn spawn_worker(i: usize, shared: *mut u64, clean: bool) -> (i32, RawFd) {
    // SAFETY: plain syscalls on descriptors we create, and a fork whose
    // child only makes syscalls before running the worker.
    unsafe {
        let mut sp = [0; 2];
        ok(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sp.as_mut_ptr()) as i64,
            "socketpair",
        );
        let pid = ok(libc::fork() as i64, "fork") as i32;
        if pid == 0 {
            libc::close(sp[0]);
            let mut sock = sp[1];
            if clean {
                let keep = 200;
                libc::dup2(sock, keep);
                libc::syscall(libc::SYS_close_range, 3u32, (keep - 1) as u32, 0u32);
                libc::syscall(libc::SYS_close_range, (keep + 1) as u32, u32::MAX, 0u32);
                sock = keep;
            }
            if i == 1 {
                libc::setpgid(0, 0);
            }
            worker(i, sock, shared);
        }
        libc::close(sp[1]);
        (pid, sp[0])
    }
}

fn main() {
    let log_path = std::env::args().nth(1).expect("usage: forkserver LOG");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("opening the log");
    // SAFETY: plain syscalls creating and configuring our own descriptors
    // and children.
    unsafe {
        libc::setsid();
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::sigaddset(&mut mask, libc::SIGUSR1);
        libc::sigaddset(&mut mask, libc::SIGUSR2);
        libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut());
        let sfd = ok(libc::signalfd(-1, &mask, 0) as i64, "signalfd") as RawFd;
        let shared = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if shared == libc::MAP_FAILED {
            ok(-1, "mmap(MAP_SHARED)");
        }
        let shared = shared.cast::<u64>();
        let mut socks: Vec<RawFd> = Vec::new();
        let mut pids = Vec::new();
        for i in 0..4 {
            let (pid, sock) = spawn_worker(i, shared, false);
            socks.push(sock);
            pids.push(pid);
        }
        let zombie = ok(libc::fork() as i64, "fork") as i32;
        if zombie == 0 {
            libc::_exit(3);
        }
        let ep = ok(libc::epoll_create1(0) as i64, "epoll_create1") as RawFd;
        cr_ebpf_perf::epoll_add(ep, sfd, 1);
        let tfd = cr_ebpf_perf::periodic_timerfd(100);
        cr_ebpf_perf::epoll_add(ep, tfd, 2);
        for (i, s) in socks.iter().enumerate() {
            cr_ebpf_perf::epoll_add(ep, *s, 100 + i as u64);
        }
        let _ = writeln!(
            log,
            "ready {} {} {} {} {} {zombie}",
            libc::getpid(),
            pids[0],
            pids[1],
            pids[2],
            pids[3]
        );
        let mut last = [0u64; 4];
        let mut alive = [true; 4];
        let mut pattern = cr_ebpf_perf::Pattern::new(1);
        let mut ticks = 0u64;
        let mut bad: Vec<String> = Vec::new();
        let mut pending = [String::new(), String::new(), String::new(), String::new()];
        let mut reaping = false;
        let mut reaped: Vec<String> = Vec::new();
        loop {
            let mut evs: [libc::epoll_event; 8] = std::mem::zeroed();
            let k = libc::epoll_wait(ep, evs.as_mut_ptr(), 8, -1);
            for ev in &evs[..k.max(0) as usize] {
                match ev.u64 {
                    1 => {
                        // struct signalfd_siginfo starts with the signal number.
                        let info = read_some(sfd);
                        let signo = info
                            .get(..4)
                            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                        if signo == libc::SIGUSR2 as u32 {
                            if !alive[0] {
                                let (pid, sock) = spawn_worker(0, shared, true);
                                cr_ebpf_perf::epoll_add(ep, sock, 100);
                                socks[0] = sock;
                                alive[0] = true;
                                last[0] = 0;
                                pending[0].clear();
                                let _ = writeln!(log, "respawned 0 {pid}");
                            }
                        } else {
                            reaping = true;
                            libc::write(socks[0], b"exit\n".as_ptr().cast(), 5);
                        }
                    }
                    2 => {
                        read_some(tfd);
                        ticks += 1;
                        let (got, want) = pattern.step(ticks);
                        if got != want {
                            bad.push(format!("P:{ticks}"));
                        }
                        if reaping {
                            loop {
                                let mut st = 0;
                                let p = libc::waitpid(-1, &mut st, libc::WNOHANG);
                                if p <= 0 {
                                    break;
                                }
                                reaped.push(format!("{p}:{}", libc::WEXITSTATUS(st)));
                            }
                        }
                        let shm: Vec<String> = (0..4)
                            .map(|i| shared.add(i).read_volatile().to_string())
                            .collect();
                        let _ = writeln!(
                            log,
                            "status w0={} w1={} w2={} w3={} reaped={} shm={} bad={}",
                            last[0],
                            last[1],
                            last[2],
                            last[3],
                            reaped.join(","),
                            shm.join(","),
                            bad.join(",")
                        );
                    }
                    d => {
                        let i = (d - 100) as usize;
                        let got = read_some(socks[i]);
                        if got.is_empty() {
                            // The worker is gone: stop watching its socket.
                            libc::epoll_ctl(
                                ep,
                                libc::EPOLL_CTL_DEL,
                                socks[i],
                                std::ptr::null_mut(),
                            );
                            libc::close(socks[i]);
                            alive[i] = false;
                            continue;
                        }
                        pending[i].push_str(&String::from_utf8_lossy(&got));
                        while let Some(nl) = pending[i].find('\n') {
                            let line: String = pending[i].drain(..=nl).collect();
                            if let Some(n) =
                                line.split_whitespace().nth(1).and_then(|v| v.parse().ok())
                            {
                                last[i] = n;
                                if line.contains("BAD") {
                                    bad.push(format!("{i}:{n}"));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
