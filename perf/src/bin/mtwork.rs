//! A multi-threaded, self-checking workload for checkpoint/restore tests.
//!
//! * `MIB` MiB filled with a seeded pattern, changed and re-verified each tick
//!   by the main thread (as in `ticker`).
//! * a thread that sleeps in `nanosleep` and counts its wake-ups;
//! * a thread blocked in a futex wait (a condition variable) that the main
//!   thread signals every tick;
//! * `EXTRA` threads that spin on arithmetic and check their own results;
//! * a thread blocked in `poll` then `read` on a pipe the main thread feeds
//!   every tick;
//! * an interval timer (`ITIMER_REAL`, 20 ms) whose `SIGALRM`s are counted;
//! * a data file (`FILE.data`, written at start) open at an offset, a pipe
//!   holding unread bytes, `/dev/null` open for writing;
//! * `SIGUSR2` blocked everywhere with one queued for the process (value
//!   42), and an alternate signal stack on the main thread;
//! * a `SIGUSR1` handler: on the next tick the main thread checks that every
//!   thread made progress since the previous check, that the data file
//!   continues at the right offset with the right bytes and that the pipe
//!   still holds its unread bytes, then writes `usr1 ok` or `usr1 FAILED ...`.
//!
//! Each tick appends `tick N ok SUM sleeper=S waiter=W` to `FILE` (opened
//! and closed every time).
//!
//! Usage: `mtwork FILE [MIB] [EXTRA]`

use std::{
    io::{Read as _, Write as _},
    os::fd::{AsRawFd, FromRawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

static USR1: AtomicBool = AtomicBool::new(false);
static ALARMS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1.store(true, Ordering::SeqCst);
}

extern "C" fn on_alarm(_: libc::c_int) {
    ALARMS.fetch_add(1, Ordering::SeqCst);
}

use cr_ebpf_perf::{xorshift, Pattern};

fn append(file: &str, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let file = args.next().expect("usage: mtwork FILE [MIB] [EXTRA]");
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let extra: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);

    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        // An interval timer (ITIMER_REAL, every 20 ms) counting SIGALRMs.
        sa.sa_sigaction = on_alarm as *const () as usize;
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        let it = libc::itimerval {
            it_interval: tv,
            it_value: tv,
        };
        libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut());
    }

    // SIGUSR2 blocked in every thread (inherited), one pending with a value;
    // an alternate signal stack on the main thread.
    let altstack = vec![0u8; 64 * 1024].leak();
    // SAFETY: plain signal-state calls on this process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let ss = libc::stack_t {
            ss_sp: altstack.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: altstack.len(),
        };
        libc::sigaltstack(&ss, std::ptr::null_mut());
        libc::sigqueue(
            libc::getpid(),
            libc::SIGUSR2,
            libc::sigval {
                sival_ptr: 42 as *mut libc::c_void,
            },
        );
    }
    let altstack_at = altstack.as_ptr() as usize;

    // A data file open at an offset, a pipe with unread bytes, /dev/null.
    let data_path = format!("{file}.data");
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&data_path, &pattern).expect("write the data file");
    let mut data = std::fs::File::open(&data_path).expect("open the data file");
    let mut first = [0u8; 1000];
    data.read_exact(&mut first).expect("read the data file");
    let mut data_pos = 1000usize;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new descriptors owned from here on.
    let (mut held_r, mut held_w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    const UNREAD: &[u8] = b"bytes nobody read yet";
    held_w.write_all(UNREAD).unwrap();
    let mut devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();

    // A thread blocked in read() on a pipe fed by the main thread.
    let reader = Arc::new(AtomicU64::new(0));
    // SAFETY: pipe2 writes two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are new descriptors owned from here on.
    let (mut feed_r, mut feed_w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    {
        let c = reader.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            loop {
                let mut pfd = libc::pollfd {
                    fd: feed_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polling one descriptor we own.
                if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                    continue; // EINTR (a SIGALRM): poll again
                }
                if feed_r.read_exact(&mut b).is_err() {
                    break;
                }
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
    }

    let sleeper = Arc::new(AtomicU64::new(0));
    {
        let c = sleeper.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(30));
            c.fetch_add(1, Ordering::SeqCst);
        });
    }
    let waiter = Arc::new(AtomicU64::new(0));
    let bell = Arc::new((Mutex::new(0u64), Condvar::new()));
    {
        let c = waiter.clone();
        let bell = bell.clone();
        std::thread::spawn(move || {
            let (m, cv) = &*bell;
            let mut seen = 0;
            let mut g = m.lock().unwrap();
            loop {
                while *g == seen {
                    g = cv.wait(g).unwrap();
                }
                seen = *g;
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let spinners: Vec<Arc<AtomicU64>> = (0..extra)
        .map(|i| {
            let c = Arc::new(AtomicU64::new(0));
            let c2 = c.clone();
            std::thread::spawn(move || {
                let mut x = 0x1234_5678u64 + i as u64;
                loop {
                    let mut acc = 0u64;
                    for k in 0..10_000u64 {
                        acc = acc.wrapping_add(k * k);
                    }
                    // Sum of k^2 for k < 10000, a fixed value: checks the FPU/ALU state.
                    assert_eq!(acc, 333_283_335_000);
                    x = xorshift(&mut x);
                    c2.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            c
        })
        .collect();

    let mut memory = Pattern::new(mib);
    let progress =
        |s: &[Arc<AtomicU64>]| -> Vec<u64> { s.iter().map(|c| c.load(Ordering::SeqCst)).collect() };
    let mut last_check = (0u64, 0u64, progress(&spinners), 0u64, 0u64);
    for n in 1u64.. {
        let (got, want) = memory.step(n);
        {
            let (m, cv) = &*bell;
            *m.lock().unwrap() += 1;
            cv.notify_one();
        }
        let _ = feed_w.write_all(b"x");
        let _ = devnull.write_all(b"tick");
        let (s, w) = (
            sleeper.load(Ordering::SeqCst),
            waiter.load(Ordering::SeqCst),
        );
        let line = if got == want {
            format!("tick {n} ok {got:x} sleeper={s} waiter={w}\n")
        } else {
            format!("tick {n} MISMATCH got {got:x} want {want:x}\n")
        };
        append(&file, &line);
        if USR1.swap(false, Ordering::SeqCst) {
            let now = (
                s,
                w,
                progress(&spinners),
                reader.load(Ordering::SeqCst),
                ALARMS.load(Ordering::SeqCst),
            );
            let moved = now.0 > last_check.0
                && now.1 > last_check.1
                && now.2.iter().zip(&last_check.2).all(|(a, b)| a > b)
                && now.3 > last_check.3
                && now.4 > last_check.4;
            // The data file goes on from where it was.
            let mut next = [0u8; 10];
            let file_ok =
                data.read_exact(&mut next).is_ok() && next[..] == pattern[data_pos..data_pos + 10];
            data_pos += 10;
            // The pipe still holds its unread bytes (read them, put them back).
            let mut unread = vec![0u8; UNREAD.len()];
            // SAFETY: fcntl on our own descriptor.
            unsafe { libc::fcntl(held_r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            let pipe_ok = held_r.read_exact(&mut unread).is_ok() && unread == UNREAD;
            let _ = held_w.write_all(&unread);
            // The queued SIGUSR2 is still pending with its value (take it,
            // queue it again), and the alternate stack is in place.
            // SAFETY: plain signal-state calls on this process.
            let (signal_ok, stack_ok) = unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR2);
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let got_sig = libc::sigtimedwait(&set, &mut info, &zero);
                let value = info.si_value().sival_ptr as usize;
                libc::sigqueue(
                    libc::getpid(),
                    libc::SIGUSR2,
                    libc::sigval {
                        sival_ptr: 42 as *mut libc::c_void,
                    },
                );
                let mut old: libc::stack_t = std::mem::zeroed();
                libc::sigaltstack(std::ptr::null(), &mut old);
                (
                    got_sig == libc::SIGUSR2 && value == 42,
                    old.ss_sp as usize == altstack_at && old.ss_size == 64 * 1024,
                )
            };
            append(
                &file,
                &if moved && got == want && file_ok && pipe_ok && signal_ok && stack_ok {
                    "usr1 ok\n".to_string()
                } else {
                    format!(
                        "usr1 FAILED progress {moved} memory {} file {file_ok} pipe {pipe_ok} signal {signal_ok} altstack {stack_ok}: before {last_check:?} now {now:?}\n",
                        got == want
                    )
                },
            );
            last_check = now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
