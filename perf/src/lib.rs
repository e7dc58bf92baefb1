//! Workload programs (`src/bin/`) and regression benches of cr-ebpf, plus
//! small helpers their tests and benches share.

/// Whether a privileged test may run here. Outside CI a missing privilege
/// skips the test with a printed reason; with `CI=true` it is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let why = format!("{test} needs root (eBPF, ptrace)");
    if in_ci() {
        panic!("{why}, and CI=true: a missing capability is a failure in CI");
    }
    eprintln!("SKIPPED {test}: {why}; run the tests as root (`cargo xtask test`)");
    false
}

/// Whether we run under CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The xorshift64 step the workloads use for their seeded patterns.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Median of samples (the benches report medians).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p` quantile (0 to 1) of samples, nearest rank.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A scratch directory of a test, emptied at creation and removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// `$TMPDIR/cr-ebpf-NAME-PID`, empty.
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("cr-ebpf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a scratch directory");
        Self(d)
    }

    /// Like [`Scratch::new`], for a test that writes about `gib` GiB of
    /// images: fails at once, saying so, when the file system has less free,
    /// rather than half-way through with `ENOSPC`.
    pub fn needing(name: &str, gib: u64) -> Self {
        let s = Self::new(name);
        let free = free_bytes(&s.0);
        assert!(
            free >= gib << 30,
            "{name} writes about {gib} GiB of images in {}, which has {} MiB free: free some space",
            s.0.display(),
            free >> 20
        );
        s
    }
}

/// Bytes free to an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return u64::MAX;
    };
    // SAFETY: a zeroed statvfs is a valid value of this plain C struct.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `v` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut v) } != 0 {
        return u64::MAX;
    }
    v.f_bavail * v.f_frsize
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Registers `fd` for `EPOLLIN` in the epoll set `ep` with `data`; panics
/// on failure (workloads).
pub fn epoll_add(ep: i32, fd: i32, data: u64) {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: data,
    };
    // SAFETY: registering a descriptor of ours with our own event.
    let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

/// A periodic `CLOCK_MONOTONIC` timerfd firing every `ms` milliseconds.
pub fn periodic_timerfd(ms: i64) -> i32 {
    // SAFETY: plain syscalls on our own descriptor.
    unsafe {
        let fd = libc::timerfd_create(libc::CLOCK_MONOTONIC, 0);
        assert!(
            fd >= 0,
            "timerfd_create: {}",
            std::io::Error::last_os_error()
        );
        let t = libc::timespec {
            tv_sec: ms / 1000,
            tv_nsec: (ms % 1000) * 1_000_000,
        };
        let spec = libc::itimerspec {
            it_interval: t,
            it_value: t,
        };
        let r = libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut());
        assert_eq!(r, 0, "timerfd_settime: {}", std::io::Error::last_os_error());
        fd
    }
}

/// A seeded pattern the workloads keep in memory and check themselves: each
/// step changes a few words on pages spread over the area and compares a
/// checksum of the whole area with the one tracked along the way, so any
/// page lost or corrupted by a checkpoint or restore shows.
pub struct Pattern {
    mem: Vec<u64>,
    seed: u64,
    want: u64,
}

impl Pattern {
    /// `mib` MiB of pseudo-random words.
    pub fn new(mib: usize) -> Self {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mem: Vec<u64> = (0..mib << 17).map(|_| xorshift(&mut seed)).collect();
        let want = mem.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        Self { mem, seed, want }
    }

    /// `mib` MiB of low-entropy words (small counters): what lz4 compresses
    /// well, like most real heaps.
    pub fn compressible(mib: usize) -> Self {
        let mem: Vec<u64> = (0..mib << 17).map(|i| (i as u64 / 64) & 0xff).collect();
        let want = mem.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        Self {
            mem,
            seed: 0x9e37_79b9_7f4a_7c15,
            want,
        }
    }

    /// Step `n`: changes 8 words, returns (checksum found, checksum expected).
    pub fn step(&mut self, n: u64) -> (u64, u64) {
        let words = self.mem.len();
        for k in 0..8u64 {
            let i = (xorshift(&mut self.seed) as usize) % words;
            let v = xorshift(&mut self.seed) ^ n ^ k;
            self.want = self.want.wrapping_sub(self.mem[i]).wrapping_add(v);
            self.mem[i] = v;
        }
        let got = self.mem.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        (got, self.want)
    }
}

/// In a child between fork and exec (async-signal-safe calls only): a
/// session of its own, so no controlling terminal, and any of stdin,
/// stdout and stderr that is a terminal pointed at `/dev/null` instead. A
/// checkpoint refuses a terminal (it is not restored): a workload started
/// from an interactive shell must not hold one.
pub fn leave_terminal() -> std::io::Result<()> {
    // SAFETY: setsid, isatty, open and dup2 are async-signal-safe.
    unsafe {
        libc::setsid();
        for fd in 0..=2 {
            if libc::isatty(fd) == 1 {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null < 0 || libc::dup2(null, fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(null);
            }
        }
    }
    Ok(())
}

/// `cmd` made a checkpointable workload: off the terminal
/// ([`leave_terminal`]) and with no descriptors but 0, 1, 2 (shells and
/// harnesses leak their own, pipes to the outside a checkpoint rightly
/// refuses).
pub fn workload(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: close_range and leave_terminal are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Closed by the exec, not before: a failed exec reports
            // through one of them (CLOSE_RANGE_CLOEXEC).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 1u32 << 2);
            leave_terminal()
        })
    }
}

/// Starts `cmd` as a checkpointable [`workload`].
pub fn spawn_clean(cmd: &mut std::process::Command) -> std::process::Child {
    workload(cmd).spawn().expect("start the workload")
}

/// Waits up to 20 s for `path` to exist (a workload's control file);
/// panics naming it otherwise.
pub fn wait_for_file(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits up to 20 s for a line of `log` (a file a workload appends to)
/// after its first `skip` lines that starts with `prefix`; returns it, or
/// panics with the log.
pub fn wait_line(log: &std::path::Path, skip: usize, prefix: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().skip(skip).find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {prefix:?} in {} after 20 s:\n{text}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills `pid` and reaps it if it is our child.
pub fn stop(pid: i32) {
    // SAFETY: plain syscalls on a pid.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Kills a workload when a test fails half-way.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// The value after `--name` on a command line, if given.
pub fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// memcpy GB/s over `bytes` (buffers faulted in first), the machine's copy
/// limit that benches compare themselves with in the same run.
pub fn memcpy_rate(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let t = std::time::Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&dst);
    bytes as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// `process_vm_readv` GB/s over `bytes` (what a checkpoint copies with),
/// read from this process into an already-faulted buffer, in 1 MiB pieces.
pub fn process_vm_readv_rate(bytes: usize) -> f64 {
    let src = vec![3u8; bytes];
    let mut dst = vec![0u8; bytes];
    let pid = std::process::id() as i32;
    let copy = |dst: &mut [u8]| {
        for (i, chunk) in dst.chunks_mut(1 << 20).enumerate() {
            let local = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
            let remote = libc::iovec {
                iov_base: src[i << 20..].as_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            };
            // SAFETY: both iovecs describe live buffers of the given lengths.
            unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        }
    };
    copy(&mut dst);
    let t = std::time::Instant::now();
    copy(&mut dst);
    std::hint::black_box(&dst);
    bytes as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The eBPF network lock, as `cr-ebpf dump` uses it by default: the
/// connections of the process are held while it is checkpointed.
#[derive(Debug)]
pub struct BpfLock;

impl cr_ebpf_checkpoint::ConnectionLock for BpfLock {
    fn lock(
        &self,
        name: &str,
        connections: &[cr_ebpf_checkpoint::NetLockKey],
    ) -> Result<(), String> {
        cr_ebpf_loader::netlock::lock(name, connections)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn unlock(&self, name: &str) {
        cr_ebpf_loader::netlock::unlock(name).expect("remove the lock");
    }
}

/// A python workload (`python3 -c PARENT_AND_CHILD CTL`): a parent and its child, each with a MiB of its own; the parent writes
/// both pids to `ctl/pids`.
pub const PARENT_AND_CHILD: &str = r#"
import os, sys, time
ctl = sys.argv[1]
data = bytearray(os.urandom(1 << 20))
kid = os.fork()
if kid == 0:
    mine = bytearray(os.urandom(1 << 20))
    while True:
        time.sleep(0.05)
with open(os.path.join(ctl, "pids.tmp"), "w") as f:
    f.write("%d %d" % (os.getpid(), kid))
os.rename(os.path.join(ctl, "pids.tmp"), os.path.join(ctl, "pids"))
while True:
    time.sleep(0.05)
"#;
