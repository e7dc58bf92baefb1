//! The guardian of a lazy restore: a small process of its own, forked by
//! the restorer, that holds a duplicate of every userfaultfd of the fill.
//!
//! Without it, a restorer killed before the last page is in closes the
//! only userfaultfd descriptors: the kernel drops the registrations and
//! every page still due reads as zeroes — a process running on with memory
//! it never had. While the guardian holds duplicates, a fault on a page
//! still due waits instead; and when the restorer ends without saying the
//! fill is done (the end of a pipe only it holds), the guardian stops the
//! restored process and every process it forked, then kills them: the
//! process is lost, never corrupted. When the fill is done the restorer
//! says so, the guardian exits, and only then are the descriptors closed
//! (a duplicate left open would keep the mappings registered with nobody
//! to answer).
//!
//! The guardian is in a session of its own and ignores SIGINT, SIGTERM and
//! SIGHUP, as the restorer does while it fills; SIGKILL of both at once
//! still leaves the zeroes.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use crate::RestoreError;

/// What the restorer writes to the guardian when the fill is done.
const DONE: u8 = b'd';

/// The restorer's side of a running guardian.
pub(super) struct Guard {
    /// Write end of the pipe whose end the guardian waits for.
    alive: Option<OwnedFd>,
    /// Where further userfaultfds are passed (`SCM_RIGHTS`).
    pass: OwnedFd,
    pid: i32,
}

fn err(call: &str) -> RestoreError {
    RestoreError::Syscall {
        call: format!("{call} (lazy restore guardian)"),
        err: std::io::Error::last_os_error(),
    }
}

impl Guard {
    /// Forks the guardian of process `root`, holding a duplicate of `uffd`.
    pub(super) fn start(root: i32, uffd: &OwnedFd) -> Result<Self, RestoreError> {
        // SAFETY: plain syscalls; every descriptor returned is owned below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, root, 0) } as RawFd;
        if pidfd < 0 {
            return Err(err("pidfd_open"));
        }
        // SAFETY: as above.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let mut p = [0 as RawFd; 2];
        // SAFETY: `p` has room for the two descriptors.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(err("pipe2"));
        }
        // SAFETY: just made, ours.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let mut s = [0 as RawFd; 2];
        // SAFETY: `s` has room for the two descriptors.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                s.as_mut_ptr(),
            )
        } != 0
        {
            return Err(err("socketpair"));
        }
        // SAFETY: just made, ours.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(s[0]), OwnedFd::from_raw_fd(s[1])) };
        // SAFETY: fork; the child runs `guardian` only and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(err("fork")),
            0 => guardian(
                root,
                [
                    r.as_raw_fd(),
                    theirs.as_raw_fd(),
                    uffd.as_raw_fd(),
                    pidfd.as_raw_fd(),
                ],
            ),
            pid => {
                // Its ends only: a guardian gone reads as the end here.
                drop((r, theirs));
                Ok(Self {
                    alive: Some(w),
                    pass: ours,
                    pid,
                })
            }
        }
    }

    /// Waits until the guardian closed what else it inherited (the ends of
    /// the process's pipes the restorer holds while it builds it among
    /// them): the process must not run before.
    pub(super) fn ready(&self) -> Result<(), RestoreError> {
        let mut b = [0u8; 1];
        // SAFETY: one byte into a live buffer.
        let n = unsafe { libc::read(self.pass.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            return Err(err("waiting for the guardian to start"));
        }
        Ok(())
    }

    /// Gives the guardian a duplicate of `uffd` (a process forked during
    /// the fill). Without it that process's pages still due would read as
    /// zeroes if the restorer died: an error.
    pub(super) fn hold(&self, uffd: &OwnedFd) -> Result<(), RestoreError> {
        let fd = uffd.as_raw_fd();
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // u64 words: aligned for `cmsghdr`.
        let mut space = [0u64; 4];
        // SAFETY: a zeroed msghdr is valid; the fields set point at live
        // buffers of the sizes given, and CMSG_* stay within `space` (room
        // for one descriptor: CMSG_SPACE(4) = 24 bytes here).
        let sent = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = space.as_mut_ptr().cast();
            m.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
            libc::sendmsg(self.pass.as_raw_fd(), &m, libc::MSG_NOSIGNAL)
        };
        if sent != 1 {
            return Err(err("sendmsg of a userfaultfd to the guardian"));
        }
        Ok(())
    }

    /// The fill is done: the guardian exits (closing its duplicates), and
    /// is waited for.
    pub(super) fn release(mut self) {
        if let Some(w) = self.alive.take() {
            // SAFETY: one byte from a live buffer to our pipe.
            unsafe { libc::write(w.as_raw_fd(), [DONE].as_ptr().cast(), 1) };
        }
    }
}

impl Drop for Guard {
    /// Without [`Guard::release`], the end of the pipe tells the guardian
    /// to kill the restored processes. Either way it is waited for.
    fn drop(&mut self) {
        drop(self.alive.take());
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The guardian: keeps `keep` (the pipe's read end, its socket, the first
/// userfaultfd and the root's pidfd), closes every other descriptor, and
/// waits. Never returns.
fn guardian(root: i32, keep: [RawFd; 4]) -> ! {
    let [alive, pass, _, pidfd] = keep;
    // SAFETY: calls on this new process itself; none can harm the parent.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_NAME, c"cr-ebpf-guard".as_ptr());
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(s, libc::SIG_IGN);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
        }
    }
    // Every other descriptor of the restorer goes: an image, a socket or a
    // pipe held here would outlive the restorer.
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor of this process.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: one byte from a live buffer to our socket.
    unsafe { libc::write(pass, [DONE].as_ptr().cast(), 1) };
    let mut watch_pass = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: alive,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if watch_pass { pass } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd records.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[1].revents != 0 && !receive(pass) {
            watch_pass = false;
        }
        if fds[0].revents != 0 {
            let mut b = [0u8; 1];
            // SAFETY: one byte into a live buffer.
            let n = unsafe { libc::read(alive, b.as_mut_ptr().cast(), 1) };
            if n == 1 && b[0] == DONE {
                // SAFETY: ends this process; its descriptors close.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: signals through the pidfd of the process restored.
            let killed = super::uffd::kill_tree(root, |sig| unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, pidfd, sig, 0, 0);
            });
            let msg = format!(
                "cr-ebpf: the restorer ended before all memory of process {root} was in: \
                 killed it and {} process(es) it forked, rather than let them read zeroes\n",
                killed.saturating_sub(1)
            );
            // SAFETY: a write of a live buffer to our stderr, then the end.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(0);
            }
        }
    }
}

/// Takes one userfaultfd sent by the restorer and keeps it open; false
/// when the restorer's end is gone.
fn receive(pass: RawFd) -> bool {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut space = [0u64; 4];
    // SAFETY: a zeroed msghdr pointing at live buffers; the descriptor
    // received, if any, is left open on purpose (it is what we hold).
    let n = unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = space.as_mut_ptr().cast();
        m.msg_controllen = std::mem::size_of_val(&space) as _;
        libc::recvmsg(pass, &mut m, libc::MSG_CMSG_CLOEXEC)
    };
    n > 0
}
