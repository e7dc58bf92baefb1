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

fn not_supported(pid: i32, what: String) -> DumpError {
    DumpError::NotSupported { pid, what }
}

/// `pos` and `flags` from `/proc/PID/fdinfo/N`.
fn fdinfo(pid: i32, fd: i32) -> std::io::Result<(u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    let pos = field("pos:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let flags = field("flags:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    Ok((pos, flags))
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

/// Every open descriptor of the (frozen) process `pid`.
pub fn collect(pid: i32) -> Result<Vec<FdInfo>, DumpError> {
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

    let mut links = Vec::new();
    // Which ends of each pipe the process holds: (read, write).
    let mut pipe_ends: HashMap<String, (bool, bool)> = HashMap::new();
    for &fd in &numbers {
        let link = std::fs::read_link(format!("{dir}/{fd}"))
            .map_err(proc_err(format!("{dir}/{fd}")))?
            .display()
            .to_string();
        let (pos, flags) = fdinfo(pid, fd).map_err(proc_err(format!("/proc/{pid}/fdinfo/{fd}")))?;
        if link.starts_with("pipe:") {
            let e = pipe_ends.entry(link.clone()).or_default();
            match flags as i32 & libc::O_ACCMODE {
                libc::O_RDONLY => e.0 = true,
                libc::O_WRONLY => e.1 = true,
                _ => *e = (true, true),
            }
        }
        links.push((fd, link, pos, flags));
    }

    let mut out = Vec::new();
    let mut data_taken: HashMap<String, ()> = HashMap::new();
    for (fd, link, pos, flags) in links {
        if let Some(what) = link.strip_prefix("anon_inode:") {
            return Err(not_supported(pid, format!("{what} on fd {fd}")));
        }
        let dup = fetch(&pidfd, fd).map_err(proc_err(format!("descriptor {fd} (pidfd_getfd)")))?;
        let meta = File::from(
            dup.try_clone()
                .map_err(proc_err(format!("descriptor {fd}")))?,
        )
        .metadata()
        .map_err(proc_err(format!("descriptor {fd}")))?;
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
            libc::S_IFREG | libc::S_IFDIR => {
                if link.ends_with(" (deleted)") {
                    return Err(not_supported(
                        pid,
                        format!("deleted file {link} on fd {fd}"),
                    ));
                }
                info.size = meta.size();
                info.mtime_ns = meta.mtime() as u64 * 1_000_000_000 + meta.mtime_nsec() as u64;
                FdKind::File
            }
            libc::S_IFCHR => FdKind::CharDevice,
            libc::S_IFIFO if link.starts_with("pipe:") => {
                let (r, w) = pipe_ends[&link];
                if r && w {
                    // SAFETY: fcntl query on our duplicate.
                    let size = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETPIPE_SZ) };
                    info.pipe_size = size.max(0) as u32;
                    if data_taken.insert(link.clone(), ()).is_none() {
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
                        format!("a pipe whose other end is outside the process, on fd {fd}"),
                    ));
                }
            }
            libc::S_IFIFO if fd <= 2 => FdKind::Inherited,
            _ => {
                let what = match ftype {
                    libc::S_IFSOCK => "socket",
                    libc::S_IFIFO => "named FIFO",
                    _ => "descriptor",
                };
                return Err(not_supported(pid, format!("{what} {link} on fd {fd}")));
            }
        };
        out.push(info);
    }
    Ok(out)
}
