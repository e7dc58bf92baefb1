//! Starting a service so that it is tracked from its first instruction:
//! the child is forked and waits, before its `execve`, until `track` has
//! the eBPF programs loaded and its pid in their map; then it execs, and
//! the log has everything the program does from its first instruction.
//!
//! The child only makes async-signal-safe calls between the fork and the
//! exec (what it needs is prepared before the fork): it leaves cr-ebpf's
//! descriptors to the exec (close-on-exec), takes a session of its own,
//! waits for one byte on a pipe (the end of the pipe, cr-ebpf gone, ends
//! it instead), then execs. A failed exec sends its errno back through a
//! close-on-exec pipe, which an exec that succeeds closes: [`Gate::open`]
//! reads it, so that a command that cannot be started is reported as such.

use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};

/// A service forked and waiting at its exec.
pub(crate) struct Gate {
    /// Its pid.
    pub(crate) pid: i32,
    /// Written to let it exec.
    go: OwnedFd,
    /// Where a failed exec says its errno; closed by a successful one.
    failed: OwnedFd,
    command: String,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut p = [0 as RawFd; 2];
    // SAFETY: `p` has room for the two descriptors.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: just made, ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// The service's exec failed (it never ran).
#[derive(Debug)]
pub(crate) struct StartFailed {
    command: String,
    source: std::io::Error,
}

impl std::fmt::Display for StartFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "starting {:?}: {}", self.command, self.source)
    }
}

impl std::error::Error for StartFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// `program` as `execvp` would find it: a path with a `/` as it is (when
/// it exists), else the first executable file of that name along `PATH`.
fn resolve(program: &str) -> Result<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        if let Err(source) = p.metadata() {
            return Err(StartFailed {
                command: program.into(),
                source,
            }
            .into());
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .with_context(|| format!("starting {program:?}: not found in PATH"))
}

impl Gate {
    /// Forks `command`, which waits at its exec until [`Gate::open`].
    pub(crate) fn fork(command: &[String]) -> Result<Self> {
        let program = resolve(&command[0])?;
        let cstr = |s: &str| CString::new(s).with_context(|| format!("{s:?} holds a NUL byte"));
        let path = cstr(&program.to_string_lossy())?;
        let argv: Vec<CString> = command.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let env: Vec<CString> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.into_encoded_bytes();
                kv.push(b'=');
                kv.extend(v.into_encoded_bytes());
                CString::new(kv).ok()
            })
            .collect();
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        let (wait_r, go) = pipe()?;
        let (failed, failed_w) = pipe()?;
        let (r, gw, fw) = (wait_r.as_raw_fd(), go.as_raw_fd(), failed_w.as_raw_fd());
        // SAFETY: the child calls only async-signal-safe functions on
        // memory prepared above, and ends in execve or _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            // SAFETY: see above.
            unsafe { child(r, gw, fw, &path, &argv_ptrs, &env_ptrs) }
        }
        Ok(Self {
            pid,
            go,
            failed,
            command: command.join(" "),
        })
    }

    /// Lets the service exec, and says whether the exec failed.
    pub(crate) fn open(self) -> Result<()> {
        // SAFETY: one byte from a live buffer to our pipe.
        let wrote = unsafe { libc::write(self.go.as_raw_fd(), [b'g'].as_ptr().cast(), 1) };
        if wrote != 1 {
            bail!(
                "letting the service start: {}",
                std::io::Error::last_os_error()
            );
        }
        drop(self.go);
        let mut errno = [0u8; 4];
        // SAFETY: reads into a live buffer; 0 (the end) once the exec
        // closed the child's end.
        let n = unsafe { libc::read(self.failed.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n == 4 {
            let mut status = 0;
            // SAFETY: reaps our child, which ends right after the write.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            return Err(StartFailed {
                command: self.command,
                source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
            }
            .into());
        }
        Ok(())
    }
}

/// The forked child: waits for the byte, then execs.
///
/// # Safety
/// To be called only in the child of a fork, with the pointers valid.
unsafe fn child(
    r: RawFd,
    go: RawFd,
    failed: RawFd,
    path: &CString,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
) -> ! {
    // SAFETY: async-signal-safe calls on this process's own descriptors.
    unsafe {
        libc::close(go);
        // None of cr-ebpf's descriptors (eBPF maps, sockets) reach the
        // service: all closed by the exec, this one's error pipe too.
        const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        libc::setsid();
        // Its standard input is nothing (what `run` reads is not its).
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null > 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        let mut b = 0u8;
        loop {
            let n = libc::read(r, (&mut b as *mut u8).cast(), 1);
            if n == 1 {
                break;
            }
            if n == 0 || *libc::__errno_location() != libc::EINTR {
                // cr-ebpf is gone before it let us start.
                libc::_exit(127);
            }
        }
        libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr());
        let e = (*libc::__errno_location()).to_ne_bytes();
        libc::write(failed, e.as_ptr().cast(), 4);
        libc::_exit(127);
    }
}
