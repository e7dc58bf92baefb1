//! Open file descriptors: what each refers to, and pipe contents read
//! without consuming them.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::{MetadataExt, OpenOptionsExt as _},
    },
};

use cr_ebpf_image::{FdInfo, FdKind};

use crate::DumpError;

/// From this many descriptors on, `/proc` is read on all cores.
const PARALLEL_FDS: usize = 256;

fn not_supported(pid: i32, fd: i32, what: String) -> DumpError {
    DumpError::NotSupportedFd { pid, fd, what }
}

/// `pos` and `flags` from `/proc/PID/fdinfo/N`, and the whole text.
fn fdinfo(pid: i32, fd: i32) -> std::io::Result<(u64, u32, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    let pos = field("pos:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let flags = field("flags:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    Ok((pos, flags, text))
}

/// Every open descriptor of a frozen process, and duplicates of its
/// established TCP connections (a full dump puts them back in repair mode
/// before killing the process, so that its end of each connection closes
/// silently and the restored process can take over).
pub(crate) struct Fds {
    pub fds: Vec<FdInfo>,
    /// (descriptor number in the process, our duplicate).
    pub tcp: Vec<(i32, OwnedFd)>,
}

/// A duplicate, in this process, of descriptor `fd` of process `pidfd`'s
/// owner (same open file description).
fn fetch(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// The bytes buffered in pipe `read_end` (a descriptor of ours on it), left
/// in place: `tee` duplicates them into a scratch pipe, which we drain.
fn peek_pipe(read_end: &OwnedFd, size: usize) -> std::io::Result<Vec<u8>> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own pipe.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    // SAFETY: tee between two pipes; nonblocking, so an empty pipe returns EAGAIN.
    let n = unsafe {
        libc::tee(
            read_end.as_raw_fd(),
            w.as_raw_fd(),
            size,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    drop(w);
    let mut data = Vec::with_capacity(n as usize);
    File::from(r).read_to_end(&mut data)?;
    Ok(data)
}

/// What descriptors of a process tree share: which pipe ends are held
/// anywhere in the tree, and which pipes' contents were already stored.
#[derive(Default)]
pub(crate) struct TreeScope {
    pub pipe_ends: HashMap<String, (bool, bool)>,
    pub data_taken: std::collections::HashSet<String>,
    /// Shared memory objects whose contents a process of the tree stored.
    pub shmem_taken: std::collections::HashSet<u64>,
}

impl TreeScope {
    /// The pipe ends held by the processes `pids`.
    pub fn new(pids: &[i32]) -> Self {
        let mut scope = Self::default();
        for &pid in pids {
            let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(link) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let link = link.display().to_string();
                if !link.starts_with("pipe:") {
                    continue;
                }
                let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                let flags = fdinfo(pid, fd).map(|f| f.1).unwrap_or(libc::O_RDWR as u32);
                let end = scope.pipe_ends.entry(link).or_default();
                match flags as i32 & libc::O_ACCMODE {
                    libc::O_RDONLY => end.0 = true,
                    libc::O_WRONLY => end.1 = true,
                    _ => *end = (true, true),
                }
            }
        }
        scope
    }
}

/// Every open descriptor of the (frozen) process `pid`. In a tree, `scope`
/// says which pipe ends the other processes hold (and the caller checks
/// unix socket pairs across the tree).
pub(crate) fn collect(pid: i32, scope: Option<&mut TreeScope>) -> Result<Fds, DumpError> {
    let dir = format!("/proc/{pid}/fd");
    let proc_err = |path: String| move |source| DumpError::Proc { pid, path, source };
    let mut numbers: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(proc_err(dir.clone()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    // SAFETY: plain syscall with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(proc_err(format!("pidfd of {pid}"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor the kernel just returned.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };

    // What /proc says of each descriptor (its link, fdinfo, and a stat
    // through the link), read on all cores: with thousands of descriptors
    // this is most of a checkpoint's freeze.
    use rayon::prelude::*;
    type Seen = (i32, String, u64, u32, String, std::fs::Metadata);
    let see = |&fd: &i32| -> Result<Seen, DumpError> {
        let proc_err = |path: String| move |source| DumpError::Proc { pid, path, source };
        let path = format!("{dir}/{fd}");
        let link = std::fs::read_link(&path)
            .map_err(proc_err(path.clone()))?
            .display()
            .to_string();
        let (pos, flags, text) =
            fdinfo(pid, fd).map_err(proc_err(format!("/proc/{pid}/fdinfo/{fd}")))?;
        let meta = std::fs::metadata(&path).map_err(proc_err(path))?;
        Ok((fd, link, pos, flags, text, meta))
    };
    // Waking the other cores costs more than a few dozen descriptors take.
    let links: Vec<Seen> = if numbers.len() >= PARALLEL_FDS {
        numbers.par_iter().map(see).collect::<Result<_, _>>()?
    } else {
        numbers.iter().map(see).collect::<Result<_, _>>()?
    };
    // Which ends of each pipe the process (or its tree) holds: (read, write).
    let in_tree = scope.is_some();
    let mut own = TreeScope::default();
    let scope = scope.unwrap_or(&mut own);
    for (_, link, _, flags, _, _) in links.iter().filter(|_| !in_tree) {
        if link.starts_with("pipe:") {
            let e = scope.pipe_ends.entry(link.clone()).or_default();
            match *flags as i32 & libc::O_ACCMODE {
                libc::O_RDONLY => e.0 = true,
                libc::O_WRONLY => e.1 = true,
                _ => *e = (true, true),
            }
        }
    }

    let mut out = Vec::new();
    let mut tcp = Vec::new();
    let mut sockets = crate::sockets::Context::default();
    for (fd, link, pos, flags, text, meta) in links {
        if let Some(name) = link.strip_prefix("anon_inode:") {
            let (kind, state) = match crate::anon_fds::parse(name, &text) {
                None => return Err(not_supported(pid, fd, name.to_string())),
                Some(Err(e)) => return Err(not_supported(pid, fd, e)),
                Some(Ok(ks)) => ks,
            };
            if let cr_ebpf_image::FdState::Epoll(items) = &state {
                crate::anon_fds::check_epoll(pid, fd, items)
                    .map_err(|e| not_supported(pid, fd, e))?;
            }
            out.push(FdInfo {
                fd,
                kind,
                flags,
                cloexec: flags as i32 & libc::O_CLOEXEC != 0,
                path: link,
                state,
                ..FdInfo::default()
            });
            continue;
        }
        // Our own duplicate, for what only the file itself can tell (pipe
        // sizes and contents, sockets).
        let dup = || fetch(&pidfd, fd).map_err(proc_err(format!("descriptor {fd} (pidfd_getfd)")));
        let ftype = meta.mode() & libc::S_IFMT;
        let mut info = FdInfo {
            fd,
            flags,
            cloexec: flags as i32 & libc::O_CLOEXEC != 0,
            pos,
            path: link.clone(),
            inode: meta.ino(),
            dev: meta.dev(),
            ..FdInfo::default()
        };
        info.kind = match ftype {
            libc::S_IFREG if crate::shmem::memfd_name(&link).is_some() => {
                info.size = meta.size();
                info.state = cr_ebpf_image::FdState::Memfd { id: meta.ino() };
                FdKind::Memfd
            }
            libc::S_IFREG | libc::S_IFDIR => {
                if link.ends_with(" (deleted)") {
                    return Err(not_supported(pid, fd, format!("deleted file {link}")));
                }
                info.size = meta.size();
                info.mtime_ns = meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64;
                FdKind::File
            }
            libc::S_IFCHR => FdKind::CharDevice,
            libc::S_IFIFO if link.starts_with("pipe:") => {
                let (r, w) = scope.pipe_ends.get(&link).copied().unwrap_or_default();
                if r && w {
                    let dup = dup()?;
                    // SAFETY: fcntl query on our duplicate.
                    let size = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETPIPE_SZ) };
                    info.pipe_size = size.max(0) as u32;
                    if scope.data_taken.insert(link.clone()) {
                        // A read end of our own on the same pipe, for tee.
                        let reader = std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_NONBLOCK)
                            .open(format!("{dir}/{fd}"))
                            .map_err(proc_err(format!("{dir}/{fd}")))?;
                        info.data = peek_pipe(&OwnedFd::from(reader), info.pipe_size as usize)
                            .map_err(proc_err(format!("contents of the pipe on fd {fd}")))?;
                    }
                    FdKind::Pipe
                } else if fd <= 2 {
                    FdKind::Inherited
                } else {
                    return Err(not_supported(
                        pid,
                        fd,
                        "a pipe whose other end is outside the process".into(),
                    ));
                }
            }
            libc::S_IFIFO if fd <= 2 => FdKind::Inherited,
            libc::S_IFSOCK => {
                let dup = dup()?;
                let inode = meta.ino();
                let sock =
                    crate::sockets::save(&dup, inode, &mut sockets).map_err(|e| match e {
                        crate::sockets::SocketError::NotSupported(what) => {
                            not_supported(pid, fd, what)
                        }
                        crate::sockets::SocketError::Io(what, source) => DumpError::Proc {
                            pid,
                            path: format!("the socket on descriptor {fd} ({what})"),
                            source,
                        },
                    })?;
                if sock.tcp.is_some() {
                    tcp.push((fd, dup));
                }
                info.state = cr_ebpf_image::FdState::Socket(Box::new(sock));
                FdKind::Socket
            }
            _ => {
                let what = match ftype {
                    libc::S_IFIFO => "named FIFO",
                    _ => "descriptor",
                };
                return Err(not_supported(pid, fd, format!("{what} {link}")));
            }
        };
        out.push(info);
    }
    if !in_tree {
        check_unix_pairs(&[(pid, &out[..])])?;
    }
    Ok(Fds { fds: out, tcp })
}

/// Connected unix sockets are restored as pairs: both ends must be here,
/// and queued datagrams need their sender.
pub(crate) fn check_unix_pairs(procs: &[(i32, &[FdInfo])]) -> Result<(), DumpError> {
    let unix = |f: &FdInfo| match &f.state {
        cr_ebpf_image::FdState::Socket(s) if s.family == libc::AF_UNIX as u16 => Some(s.clone()),
        _ => None,
    };
    let inodes: std::collections::HashSet<u64> = procs
        .iter()
        .flat_map(|(_, fds)| fds.iter())
        .filter_map(unix)
        .map(|s| s.inode)
        .collect();
    let outside = if procs.len() > 1 {
        "a unix socket connected to a socket outside the process tree"
    } else {
        "a unix socket connected to a socket outside the process"
    };
    for &(pid, fds) in procs {
        for f in fds {
            let Some(s) = unix(f) else { continue };
            if s.peer_inode != 0 && !inodes.contains(&s.peer_inode) {
                return Err(not_supported(pid, f.fd, outside.into()));
            }
            if s.peer_inode == 0 && !s.queue.is_empty() {
                return Err(not_supported(
                    pid,
                    f.fd,
                    "queued messages on an unconnected unix socket (their senders are unknown)"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}
