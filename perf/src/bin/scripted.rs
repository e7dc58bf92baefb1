//! A workload that performs a fixed, known sequence of resource changes and
//! page writes, so tests can compare the eBPF log against exactly what it did.
//!
//! Protocol on stdin/stdout (one line each):
//!   workload: `ready PID`; then waits for a line on stdin (the go signal).
//!   `script PAGES`: performs the script below, prints
//!     `result base=.. pages=.. fd1=.. fd2=.. pipe=..,.. child=.. childfd=..`
//!     and exits 0.
//!   `thread`: starts one thread that opens and closes /dev/null, joins it,
//!     prints `result tid=..` and exits 0.
//!   `burst COUNT`: calls umask COUNT times, prints `done`, waits for a
//!     second line on stdin, exits 0.
//!
//! The script (main thread), between two `umask` markers:
//!   umask(0o077); mmap(PAGES pages); write one byte in each page, in order;
//!   mprotect(first page, PROT_READ); openat("/dev/null") = fd1; dup(fd1) = fd2;
//!   close(fd2); pipe2(O_CLOEXEC); close both ends; close(fd1);
//!   clone(CLONE_VM|CLONE_VFORK|SIGCHLD) a child that opens and closes
//!   /dev/null and exits with status 7; wait for it; munmap(all pages);
//!   umask(0o077).
//! The whole script runs once before the go signal as a warm-up, so code,
//! stack and libc pages are already present and the marked run faults only
//! on its own fresh pages. The child shares memory (vfork), so the parent
//! takes no copy-on-write faults.

const DEV_NULL: &[u8] = b"/dev/null\0";
const CHILD_STACK: usize = 64 * 1024;

/// Writes a line with one raw `write` (no allocation, no libc buffering).
fn say(line: &str) {
    let mut buf = [0u8; 512];
    let n = line.len().min(buf.len() - 1);
    buf[..n].copy_from_slice(&line.as_bytes()[..n]);
    buf[n] = b'\n';
    // SAFETY: writing a valid buffer to stdout.
    unsafe { libc::write(1, buf.as_ptr().cast(), n + 1) };
}

/// Reads stdin up to a newline with raw `read`s: no allocation, no buffer
/// set-up, so waiting adds nothing to the log.
fn wait_line() {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reading into a valid one-byte buffer.
        let n = unsafe { libc::read(0, b.as_mut_ptr().cast(), 1) };
        if n <= 0 || b[0] == b'\n' {
            return;
        }
    }
}

extern "C" fn vfork_child(_arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: raw syscalls only; this child shares the parent's memory and
    // must not touch libc state.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD as libc::c_long,
            DEV_NULL.as_ptr(),
            (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_long,
        );
        CHILD_FD = fd;
        libc::syscall(libc::SYS_close, fd);
        libc::syscall(libc::SYS_exit_group, 7 as libc::c_long);
    }
    7
}

static mut CHILD_FD: libc::c_long = -1;

#[derive(Default, Clone, Copy)]
struct Outcome {
    base: u64,
    fd1: i64,
    fd2: i64,
    pipe: [i32; 2],
    child: i64,
    child_fd: i64,
}

/// One run of the script. Raw syscalls only, no allocation.
fn script(pages: usize, stack: &mut [u8]) -> Outcome {
    let len = pages * 4096;
    let mut o = Outcome::default();
    // SAFETY: raw syscalls on memory this function owns; see the module doc.
    unsafe {
        libc::syscall(libc::SYS_umask, 0o077 as libc::c_long);
        // Every argument as a full register: a variadic `int` leaves the
        // upper half of the register undefined.
        let base = libc::syscall(
            libc::SYS_mmap,
            0 as libc::c_long,
            len as libc::c_long,
            (libc::PROT_READ | libc::PROT_WRITE) as libc::c_long,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as libc::c_long,
            -1 as libc::c_long,
            0 as libc::c_long,
        ) as u64;
        o.base = base;
        for i in 0..pages {
            ((base + (i * 4096 + 16) as u64) as *mut u8).write_volatile(i as u8);
        }
        libc::syscall(
            libc::SYS_mprotect,
            base,
            4096 as libc::c_long,
            libc::PROT_READ as libc::c_long,
        );
        o.fd1 = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD as libc::c_long,
            DEV_NULL.as_ptr(),
            (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_long,
        );
        o.fd2 = libc::syscall(libc::SYS_dup, o.fd1);
        libc::syscall(libc::SYS_close, o.fd2);
        libc::syscall(
            libc::SYS_pipe2,
            o.pipe.as_mut_ptr(),
            libc::O_CLOEXEC as libc::c_long,
        );
        libc::syscall(libc::SYS_close, o.pipe[0]);
        libc::syscall(libc::SYS_close, o.pipe[1]);
        libc::syscall(libc::SYS_close, o.fd1);
        let top = stack.as_mut_ptr().add(stack.len()) as *mut libc::c_void;
        o.child = libc::clone(
            vfork_child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::null_mut(),
        ) as i64;
        o.child_fd = CHILD_FD;
        let mut status = 0;
        libc::wait4(o.child as i32, &mut status, 0, std::ptr::null_mut());
        libc::syscall(libc::SYS_munmap, base, len as libc::c_long);
        libc::syscall(libc::SYS_umask, 0o077 as libc::c_long);
    }
    o
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("script");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let mut stack = vec![0u8; CHILD_STACK];
    if mode == "script" {
        script(n, &mut stack);
    }
    // "touch": the pages are mapped before `ready`, written after `go`.
    let touch = if mode == "touch" {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        p.cast::<u8>()
    } else {
        std::ptr::null_mut()
    };
    say(&format!("ready {}", std::process::id()));
    wait_line();
    match mode {
        "script" => {
            let o = script(n, &mut stack);
            say(&format!(
                "result base={:#x} pages={n} fd1={} fd2={} pipe={},{} child={} childfd={}",
                o.base, o.fd1, o.fd2, o.pipe[0], o.pipe[1], o.child, o.child_fd
            ));
        }
        "thread" => {
            let t = std::thread::spawn(|| {
                // SAFETY: plain syscalls.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid);
                    let fd = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD as libc::c_long,
                        DEV_NULL.as_ptr(),
                        (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_long,
                    );
                    libc::syscall(libc::SYS_close, fd);
                    (tid, fd)
                }
            });
            let (tid, fd) = t.join().unwrap_or((-1, -1));
            say(&format!("result tid={tid} fd={fd}"));
        }
        "burst" => {
            for _ in 0..n {
                // SAFETY: plain syscall.
                unsafe { libc::syscall(libc::SYS_umask, 0o022 as libc::c_long) };
            }
            say("done");
            wait_line();
        }
        "touch" => {
            for i in 0..n {
                // SAFETY: inside the mapping made above; volatile so each
                // page really is written (one write fault each).
                unsafe { touch.add(i * 4096).write_volatile(1) };
            }
            say("done");
            wait_line();
        }
        other => {
            eprintln!("scripted: unknown mode {other:?} (script, thread, burst, touch)");
            std::process::exit(2);
        }
    }
}
