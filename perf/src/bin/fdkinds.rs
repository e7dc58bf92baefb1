//! A single-threaded event loop holding one descriptor of each kind the
//! checkpointer saves beyond files and pipes, for round-trip tests.
//!
//! It listens on TCP (127.0.0.1, any port), binds a UDP socket, creates an
//! eventfd (count 5), a timerfd (30 s, then every 7 s), a signalfd for
//! SIGUSR1 (blocked), a seqpacket socket pair with two queued messages and
//! a stream pair with queued bytes, two POSIX timers (one created and
//! deleted first, so the ids are 1 and 2: SIGUSR2 once after 3 s, and a
//! silent one at 40 s then every 3 s on CLOCK_BOOTTIME), and waits in
//! `epoll_wait` on the listener, the UDP socket, the signalfd (SIGUSR1 and
//! SIGUSR2, blocked) and every accepted connection. With a directory
//! argument it also watches DIR/a then DIR/b with inotify and removes the
//! first watch (the one left has descriptor 2), in the epoll set too.
//! Prints `ready TCP_PORT UDP_PORT` on stdout.
//!
//! Every accepted connection takes line commands, each answered with one
//! line: `ping` -> `pong`; `sleep MS` (sleeps in the loop, then `slept`);
//! `eventfd` (reads it) -> `eventfd N`; `timer` -> `timer REMAINING_MS
//! INTERVAL_MS`; `pair` -> `pair M1,M2`; `stream` -> `stream BYTES`;
//! `ptimers` -> `ptimers ID:REMAINING_MS:INTERVAL_MS,...`; `pidfd` -> `pidfd
//! PID SIGNAL0_RESULT` for the pidfd it holds on its parent;
//! `events` -> `events usr1=N usr2=N udp=D1,D2 accepted=N inotify=WD:NAME,...`.
//!
//! Usage: `fdkinds [WATCH_DIR]`

use std::{collections::HashMap, io::Write as _, os::fd::RawFd};

/// Aborts with the errno when a libc call fails.
fn ok(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        eprintln!("fdkinds: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    r
}

const LISTENER: u64 = 0x11;
const UDP: u64 = 0x0d;
const SIGNALS: u64 = 0x516;
const INOTIFY: u64 = 0x1f;
/// The pidfd on the parent.
static PIDFD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
/// Data of a connection: this tag in the high half, the fd in the low.
const CONN: u64 = 0xc0_0000_0000;

fn port(fd: RawFd) -> u16 {
    // SAFETY: zeroed sockaddr_in is valid; our own buffer.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: as above.
    ok(
        unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) },
        "getsockname",
    );
    u16::from_be(sa.sin_port)
}

fn inet_socket(kind: i32) -> RawFd {
    // SAFETY: plain syscalls on our own socket and address.
    unsafe {
        let fd = ok(
            libc::socket(libc::AF_INET, kind | libc::SOCK_NONBLOCK, 0),
            "socket",
        );
        let one: i32 = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const i32).cast(),
            4,
        );
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        ok(
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            ),
            "bind",
        );
        fd
    }
}

fn write_all(fd: RawFd, b: &[u8]) {
    let mut off = 0;
    while off < b.len() {
        // SAFETY: writing our own buffer.
        let n = unsafe { libc::write(fd, b[off..].as_ptr().cast(), b.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

/// Everything read without blocking, as messages (one per read).
fn read_messages(fd: RawFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            return out;
        }
        out.push(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
    }
}

/// Timer 0 created and deleted; timer 1: SIGUSR2 (value 0xabc) once after
/// 3 s; timer 2: no signal, 40 s then every 3 s, on CLOCK_BOOTTIME.
fn posix_timers() {
    let create = |clock: libc::clockid_t, notify: i32, signo: i32| -> i32 {
        // SAFETY: zeroed sigevent is valid; fields set below.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = notify;
        ev.sigev_signo = signo;
        ev.sigev_value = libc::sigval {
            sival_ptr: 0xabc as *mut libc::c_void,
        };
        let mut id: i32 = -1;
        // SAFETY: the raw syscall writes the kernel's timer id into `id`.
        ok(
            unsafe { libc::syscall(libc::SYS_timer_create, clock, &mut ev, &mut id) } as i32,
            "timer_create",
        );
        id
    };
    let arm = |id: i32, secs: i64, every: i64| {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: every,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        };
        // SAFETY: arming one of our timers.
        ok(
            unsafe {
                libc::syscall(
                    libc::SYS_timer_settime,
                    id,
                    0,
                    &spec,
                    std::ptr::null_mut::<libc::itimerspec>(),
                )
            } as i32,
            "timer_settime",
        );
    };
    let first = create(libc::CLOCK_MONOTONIC, libc::SIGEV_NONE, 0);
    // SAFETY: deleting the timer just made.
    unsafe { libc::syscall(libc::SYS_timer_delete, first) };
    let once = create(libc::CLOCK_MONOTONIC, libc::SIGEV_SIGNAL, libc::SIGUSR2);
    arm(once, 3, 0);
    let silent = create(libc::CLOCK_BOOTTIME, libc::SIGEV_NONE, 0);
    arm(silent, 40, 3);
}

fn main() {
    // SAFETY: plain syscalls creating and configuring our own descriptors.
    let (ep, listener, udp, efd, tfd, sfd, pair, stream) = unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::sigaddset(&mut mask, libc::SIGUSR1);
        libc::sigaddset(&mut mask, libc::SIGUSR2);
        ok(
            libc::sigprocmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut()),
            "sigprocmask",
        );
        let sfd = ok(libc::signalfd(-1, &mask, libc::SFD_NONBLOCK), "signalfd");
        let efd = ok(libc::eventfd(0, 0), "eventfd");
        write_all(efd, &5u64.to_ne_bytes());
        let tfd = ok(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, 0),
            "timerfd_create",
        );
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 7,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 30,
                tv_nsec: 0,
            },
        };
        ok(
            libc::timerfd_settime(tfd, 0, &spec, std::ptr::null_mut()),
            "timerfd_settime",
        );
        let mut p = [0; 2];
        ok(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, p.as_mut_ptr()),
            "socketpair",
        );
        write_all(p[0], b"hello");
        write_all(p[0], b"world");
        let mut q = [0; 2];
        ok(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, q.as_mut_ptr()),
            "socketpair",
        );
        write_all(q[0], b"stream-");
        write_all(q[0], b"bytes");
        posix_timers();
        let pidfd = ok(
            libc::syscall(libc::SYS_pidfd_open, libc::getppid(), 0) as i32,
            "pidfd_open",
        );
        PIDFD.store(pidfd, std::sync::atomic::Ordering::Relaxed);
        let listener = inet_socket(libc::SOCK_STREAM);
        ok(libc::listen(listener, 7), "listen");
        let udp = inet_socket(libc::SOCK_DGRAM);
        let ep = ok(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1");
        (ep, listener, udp, efd, tfd, sfd, p[1], q[1])
    };
    let ino = std::env::args().nth(1).map(|dir| {
        // SAFETY: plain syscalls on our own descriptor and paths.
        unsafe {
            let fd = ok(libc::inotify_init1(libc::IN_NONBLOCK), "inotify_init1");
            let mut wds = Vec::new();
            for sub in ["a", "b"] {
                let p = format!("{dir}/{sub}");
                let _ = std::fs::create_dir_all(&p);
                let c = std::ffi::CString::new(p).unwrap_or_default();
                wds.push(ok(
                    libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE),
                    "inotify_add_watch",
                ));
            }
            libc::inotify_rm_watch(fd, wds[0]);
            // The IN_IGNORED of the removed watch.
            let mut buf = [0u8; 256];
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            fd
        }
    });
    if let Some(fd) = ino {
        cr_ebpf_perf::epoll_add(ep, fd, INOTIFY);
    }
    cr_ebpf_perf::epoll_add(ep, listener, LISTENER);
    cr_ebpf_perf::epoll_add(ep, udp, UDP);
    cr_ebpf_perf::epoll_add(ep, sfd, SIGNALS);
    println!("ready {} {}", port(listener), port(udp));
    let _ = std::io::stdout().flush();

    let (mut signals, mut accepted, mut datagrams) = ([0u32; 2], 0u32, Vec::<String>::new());
    let mut watched = Vec::<String>::new();
    let mut lines: HashMap<RawFd, Vec<u8>> = HashMap::new();
    loop {
        // SAFETY: zeroed events are valid; epoll_wait fills at most 16.
        let mut evs: [libc::epoll_event; 16] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 16, -1) };
        if n < 0 {
            continue; // EINTR
        }
        for ev in &evs[..n as usize] {
            let data = ev.u64;
            match data {
                LISTENER => {
                    // SAFETY: accepting on our listener.
                    let c = unsafe {
                        libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), 0)
                    };
                    if c >= 0 {
                        accepted += 1;
                        cr_ebpf_perf::epoll_add(ep, c, CONN | c as u64);
                    }
                }
                UDP => datagrams.extend(read_messages(udp)),
                INOTIFY => {
                    let mut buf = [0u8; 4096];
                    let fd = ino.unwrap_or(-1);
                    // SAFETY: reading inotify events into our buffer.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                    let mut at = 0;
                    while n > 0 && at + 16 <= n as usize {
                        // struct inotify_event: wd, mask, cookie, len, name.
                        let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4]));
                        let len =
                            u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap_or([0; 4]))
                                as usize;
                        let name = &buf[at + 16..(at + 16 + len).min(n as usize)];
                        let name = String::from_utf8_lossy(name)
                            .trim_end_matches('\0')
                            .to_string();
                        watched.push(format!("{wd}:{name}"));
                        at += 16 + len;
                    }
                }
                SIGNALS => {
                    let mut si = [0u8; 128];
                    // SAFETY: reading siginfo records into our buffer.
                    while unsafe { libc::read(sfd, si.as_mut_ptr().cast(), 128) } == 128 {
                        // ssi_signo first.
                        match u32::from_ne_bytes([si[0], si[1], si[2], si[3]]) as i32 {
                            libc::SIGUSR1 => signals[0] += 1,
                            _ => signals[1] += 1,
                        }
                    }
                }
                d if d & CONN == CONN => {
                    let c = (d & 0xffff_ffff) as RawFd;
                    let mut buf = [0u8; 4096];
                    // SAFETY: reading into our buffer.
                    let got = unsafe { libc::read(c, buf.as_mut_ptr().cast(), buf.len()) };
                    if got <= 0 {
                        // SAFETY: closing the finished connection (removes it from the set).
                        unsafe { libc::close(c) };
                        lines.remove(&c);
                        continue;
                    }
                    let pending = lines.entry(c).or_default();
                    pending.extend_from_slice(&buf[..got as usize]);
                    while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=nl).collect();
                        let line = String::from_utf8_lossy(&line).trim().to_string();
                        let mut reply =
                            answer(&line, efd, tfd, pair, stream, signals, accepted, &datagrams);
                        if line == "events" {
                            reply += &format!(" inotify={}", watched.join(","));
                        }
                        write_all(c, format!("{reply}\n").as_bytes());
                    }
                }
                _ => {}
            }
        }
    }
}

#[allow(clippy::too_many_arguments, reason = "the loop's whole state, once")]
fn answer(
    line: &str,
    efd: RawFd,
    tfd: RawFd,
    pair: RawFd,
    stream: RawFd,
    signals: [u32; 2],
    accepted: u32,
    datagrams: &[String],
) -> String {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("ping") => "pong".into(),
        Some("sleep") => {
            let ms: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            "slept".into()
        }
        Some("eventfd") => {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into our u64.
            unsafe { libc::read(efd, (&mut v as *mut u64).cast(), 8) };
            format!("eventfd {v}")
        }
        Some("timer") => {
            // SAFETY: zeroed itimerspec is valid; filled by the kernel.
            let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::timerfd_gettime(tfd, &mut cur) };
            let ms = |t: libc::timespec| t.tv_sec * 1000 + t.tv_nsec / 1_000_000;
            format!("timer {} {}", ms(cur.it_value), ms(cur.it_interval))
        }
        Some("pair") => format!("pair {}", read_messages(pair).join(",")),
        Some("stream") => format!("stream {}", read_messages(stream).concat()),
        Some("events") => format!(
            "events usr1={} usr2={} udp={} accepted={accepted}",
            signals[0],
            signals[1],
            datagrams.join(",")
        ),
        Some("pidfd") => {
            let fd = PIDFD.load(std::sync::atomic::Ordering::Relaxed);
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let pid = info
                .lines()
                .find_map(|l| l.strip_prefix("Pid:"))
                .map_or("?", str::trim)
                .to_string();
            // SAFETY: signal 0 through our pidfd: only checks the process exists.
            let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd, 0, 0usize, 0) };
            format!("pidfd {pid} {r}")
        }
        Some("ptimers") => {
            let ids = std::fs::read_to_string("/proc/self/timers").unwrap_or_default();
            let mut out = Vec::new();
            for id in ids.lines().filter_map(|l| l.strip_prefix("ID: ")) {
                let id: i32 = id.trim().parse().unwrap_or(-1);
                // SAFETY: zeroed itimerspec is valid; filled by the kernel.
                let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
                // SAFETY: timer_gettime on one of our timer ids.
                unsafe { libc::syscall(libc::SYS_timer_gettime, id, &mut cur) };
                let ms = |t: libc::timespec| t.tv_sec * 1000 + t.tv_nsec / 1_000_000;
                out.push(format!("{id}:{}:{}", ms(cur.it_value), ms(cur.it_interval)));
            }
            out.sort();
            format!("ptimers {}", out.join(","))
        }
        _ => format!("unknown {line:?}"),
    }
}
