//! Descriptors: one file per kind, each holding its save side, its restore
//! side and a round-trip test, behind the [`Descriptor`] trait; [`KINDS`]
//! is the registry the checkpoint and restore engines loop over.
//!
//! Saving: `/proc/PID/fd/N`, its fdinfo and a `stat` through the link are
//! read for every descriptor of the frozen process ([`Seen`]); the first
//! kind in [`KINDS`] whose [`Descriptor::save`] claims it saves it.
//! Nothing claims it: the checkpoint is refused, naming it.
//!
//! Restoring, per process ([`restore`]): every descriptor is made at a free
//! number in the process ([`Descriptor::open`]: opened there, or made in the
//! restorer and handed over), then moved to its own number with `dup3`;
//! last, [`Descriptor::finish`] (epoll sets register the process's own
//! numbers). Objects several processes share (pipes, sockets) are made once
//! per restore by [`Descriptor::prepare`] into [`Shared`].

pub mod async_io;
pub mod deleted;
pub mod description;
pub mod epoll;
pub mod eventfd;
pub mod fanotify;
pub mod fifo;
pub mod file;
pub mod inherited;
pub mod inotify;
pub mod locks;
pub mod memfd;
pub mod outside;
pub mod pidfd;
pub mod pipe;
mod shared;
pub mod signalfd;
pub mod socket;
pub mod timerfd;
pub mod tty;

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd, FromRawFd, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, Manifest};

pub use shared::Shared;

use crate::{
    error::proc_err,
    sys::{Sys, SETTABLE_FLAGS},
    RestoreError, SaveError,
};

/// From this many descriptors on, `/proc` is read on all cores.
const PARALLEL_FDS: usize = 256;

/// Every descriptor kind, in the order they are asked to claim a
/// descriptor (a memfd or a deleted file is a regular file too: they come
/// first).
pub static KINDS: &[&dyn Descriptor] = &[
    &memfd::Memfd,
    &tty::Tty,
    &deleted::Deleted,
    &file::File,
    &pipe::Pipe,
    &fifo::Fifo,
    &inherited::Inherited,
    &socket::Socket,
    &epoll::Epoll,
    &eventfd::EventFd,
    &timerfd::TimerFd,
    &signalfd::SignalFd,
    &inotify::Inotify,
    &fanotify::Fanotify,
    &pidfd::Pidfd,
];

/// The kind that saves and restores `kind`.
pub fn handler(kind: FdKind) -> Result<&'static dyn Descriptor, RestoreError> {
    KINDS
        .iter()
        .copied()
        .find(|d| d.kinds().contains(&kind))
        .ok_or_else(|| RestoreError::NotSupported(format!("descriptor kind {kind:?}")))
}

/// One kind of descriptor (or a few that share their code).
pub trait Descriptor: Sync {
    /// The image kinds it saves and restores.
    fn kinds(&self) -> &'static [FdKind];

    /// Saves `seen` if it is of this kind; `None` when it is not.
    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>>;

    /// Checks what only the descriptors of every process saved together
    /// show (both ends of a socket pair), after all were saved.
    fn check_tree(&self, _procs: &[(i32, &[FdInfo])], _scope: &TreeScope) -> Result<(), SaveError> {
        Ok(())
    }

    /// Checks what can be checked before anything of the restore starts.
    fn preflight(&self, _m: &Manifest, _f: &FdInfo) -> Result<(), RestoreError> {
        Ok(())
    }

    /// Makes, in the restorer, the objects of this kind that the
    /// descriptors `fds` of every process restored together share.
    fn prepare(
        &self,
        _fds: &[&FdInfo],
        _opts: &Prepare,
        _shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        Ok(())
    }

    /// The descriptor `f` in the process being built, at any free number
    /// (it is moved to its own afterwards); `None` when it is made by
    /// [`Descriptor::finish`] or not at all.
    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError>;

    /// Runs once every descriptor of the process has its own number.
    fn finish(&self, _cx: &RestoreCx<'_>, _f: &FdInfo) -> Result<(), RestoreError> {
        Ok(())
    }
}

/// How the objects of a restore are made.
#[derive(Debug, Clone, Default)]
pub struct Prepare {
    /// Close established TCP connections instead of re-establishing them.
    pub close_connections: bool,
    /// The working directory of the process holding each socket (by
    /// inode), where a relative unix name is bound or connected to; filled
    /// by [`prepare`].
    pub cwds: HashMap<u64, std::path::PathBuf>,
    /// Give a shell job's terminal descriptors cr-ebpf's own terminal.
    pub shell_job: bool,
    /// The restorer's descriptors of the shared memory objects and deleted
    /// files made for the restore, by id (alive while the objects are made).
    pub shmem: HashMap<u64, std::os::fd::RawFd>,
    /// The network locks the images name (filled by [`prepare`]): removed
    /// once the TCP connections exist again, before they leave repair mode.
    pub network_locks: Vec<String>,
    /// Outside objects the restorer hands over (`restore --inherit-fd`):
    /// its descriptor for each, by the name the image gives the object
    /// (`pipe:[INODE]`, `socket:[INODE]`), given to every descriptor of
    /// the restored processes that held it.
    pub inherit: Vec<(String, std::os::fd::RawFd)>,
}

/// What `/proc` shows of one descriptor of a frozen process.
#[derive(Debug)]
pub struct Seen {
    /// Its number.
    pub fd: i32,
    /// The `/proc/PID/fd/N` link (`pipe:[123]`, `anon_inode:[eventfd]`, a path).
    pub link: String,
    /// `pos:` of its fdinfo.
    pub pos: u64,
    /// `flags:` of its fdinfo (access mode and status flags).
    pub flags: u32,
    /// The whole fdinfo text.
    pub fdinfo: String,
    /// `stat` through the link.
    pub meta: std::fs::Metadata,
}

impl Seen {
    /// The fields every kind records: number, flags, close-on-exec,
    /// position, link, inode and device.
    pub fn info(&self, kind: FdKind) -> FdInfo {
        use std::os::unix::fs::MetadataExt as _;
        FdInfo {
            fd: self.fd,
            kind,
            flags: self.flags,
            cloexec: self.flags as i32 & libc::O_CLOEXEC != 0,
            pos: self.pos,
            path: self.link.clone(),
            inode: self.meta.ino(),
            dev: self.meta.dev(),
            ..FdInfo::default()
        }
    }

    /// A field of the fdinfo text (`eventfd-count:`), trimmed.
    pub fn field(&self, key: &str) -> Option<&str> {
        fdinfo_field(&self.fdinfo, key)
    }

    /// `NAME` of an `anon_inode:NAME` link.
    pub fn anon_name(&self) -> Option<&str> {
        self.link.strip_prefix("anon_inode:")
    }

    /// The file type bits of its mode (`S_IFREG`, ...).
    pub fn file_type(&self) -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        self.meta.mode() & libc::S_IFMT
    }
}

fn fdinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// What saving the descriptors of one process needs.
pub struct SaveCx<'a> {
    /// The process.
    pub pid: i32,
    pidfd: &'a OwnedFd,
    /// What the processes saved together share.
    pub scope: &'a mut TreeScope,
    /// Socket facts asked once per checkpoint.
    pub sockets: &'a mut socket::Context,
    /// Duplicates of established TCP connections (descriptor number, ours).
    pub tcp: &'a mut Vec<(i32, OwnedFd)>,
    /// The files in flight on the process's unix sockets, received here,
    /// by the number they are saved under (see `socket::in_flight`).
    moved: HashMap<i32, OwnedFd>,
}

impl SaveCx<'_> {
    /// `/proc/.../fd/N` of the process's descriptor `fd` (for a file in
    /// flight, our own descriptor of it).
    pub fn proc_fd(&self, fd: i32) -> String {
        match self.moved.get(&fd) {
            Some(own) => format!("/proc/self/fd/{}", own.as_raw_fd()),
            None => format!("/proc/{}/fd/{fd}", self.pid),
        }
    }

    /// Where the process's descriptor `fd` is: (the process, `fd`), or for
    /// a file in flight (cr-ebpf, our descriptor of it).
    pub fn holder(&self, fd: i32) -> (i32, i32) {
        match self.moved.get(&fd) {
            Some(own) => (std::process::id() as i32, own.as_raw_fd()),
            None => (self.pid, fd),
        }
    }

    /// A duplicate, in this process, of the process's descriptor `fd` (the
    /// same open file description), for what only the file itself tells.
    pub fn dup(&self, fd: i32) -> Result<OwnedFd, SaveError> {
        if let Some(own) = self.moved.get(&fd) {
            return own.try_clone().map_err(proc_err(
                self.pid,
                format!("descriptor {fd} in flight (dup)"),
            ));
        }
        // SAFETY: plain syscall with integer arguments.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), fd, 0) };
        if r < 0 {
            return Err(
                proc_err(self.pid, format!("descriptor {fd} (pidfd_getfd)"))(
                    std::io::Error::last_os_error(),
                ),
            );
        }
        // SAFETY: a new descriptor the kernel just returned.
        Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
    }

    /// "not supported: WHAT on fd N of pid P".
    pub fn refuse(&self, fd: i32, what: impl Into<String>) -> SaveError {
        SaveError::NotSupportedFd {
            pid: self.pid,
            fd,
            what: what.into(),
        }
    }
}

/// What the descriptors of the processes of one checkpoint share: which
/// pipe ends are held anywhere, which pipes' contents were stored, which
/// shared memory objects' contents were stored.
#[derive(Default)]
pub struct TreeScope {
    /// Pipe link -> (read end held, write end held).
    pub pipe_ends: HashMap<String, (bool, bool)>,
    /// Pipes whose contents a process stored.
    pub data_taken: HashSet<String>,
    /// Shared memory objects whose contents a process stored.
    pub shmem_taken: HashSet<u64>,
    /// Whether the scope covers a whole tree (else one process).
    in_tree: bool,
    /// The processes of the scope.
    pub pids: Vec<i32>,
    /// Terminals held by the processes of the scope.
    pub ttys: tty::Scope,
    /// Take a terminal outside the scope that is a process's controlling
    /// terminal (`dump --shell-job`).
    pub shell_job: bool,
    /// Take a unix stream connection to a named socket outside the scope
    /// (journald's stdout stream, a local daemon's): restored as a new
    /// connection to the same name (`--ext-unix-sk`). Refused without it.
    pub ext_unix_sk: bool,
    /// The pipes and FIFOs processes outside hold, read when first asked.
    outside: Option<outside::Outside>,
    /// The unix sockets whose descriptors in flight a process saved.
    pub in_flight_taken: HashSet<u64>,
}

impl TreeScope {
    /// What processes outside the scope (which holds `pid`) hold.
    pub fn outside(&mut self, pid: i32) -> &outside::Outside {
        let inside = if self.pids.is_empty() {
            vec![pid]
        } else {
            self.pids.clone()
        };
        self.outside
            .get_or_insert_with(|| outside::Outside::scan(&inside, true))
    }

    /// The pipe ends held by the processes `pids`.
    pub fn new(pids: &[i32]) -> Self {
        let mut scope = Self {
            in_tree: true,
            pids: pids.to_vec(),
            ttys: tty::Scope::scan(pids),
            ..Self::default()
        };
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
                let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                    .ok()
                    .and_then(|t| {
                        fdinfo_field(&t, "flags:").and_then(|v| u32::from_str_radix(v, 8).ok())
                    })
                    .unwrap_or(libc::O_RDWR as u32);
                scope.add_pipe_end(link, flags);
            }
        }
        scope
    }

    fn add_pipe_end(&mut self, link: String, flags: u32) {
        let end = self.pipe_ends.entry(link).or_default();
        match flags as i32 & libc::O_ACCMODE {
            libc::O_RDONLY => end.0 = true,
            libc::O_WRONLY => end.1 = true,
            _ => *end = (true, true),
        }
    }
}

/// Every open descriptor of a frozen process, and duplicates of its
/// established TCP connections (a full dump puts them back in repair mode
/// before killing the process, so that its end of each connection closes
/// silently and the restored process can take over).
pub struct Fds {
    /// The descriptors, by number.
    pub fds: Vec<FdInfo>,
    /// (descriptor number in the process, our duplicate).
    pub tcp: Vec<(i32, OwnedFd)>,
    /// The file locks held through them, each once.
    pub locks: Vec<cr_ebpf_image::FileLock>,
    /// The files in flight on its unix sockets (saved as descriptors of
    /// it that hold them only for the restore): their numbers there, and
    /// our descriptors of them, for [`description::share`].
    pub in_flight: Vec<(i32, OwnedFd)>,
}

/// `pos` and `flags` from `/proc/PID/fdinfo/N`, and the whole text.
fn fdinfo(pid: i32, fd: i32) -> std::io::Result<(u64, u32, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let pos = fdinfo_field(&text, "pos:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let flags = fdinfo_field(&text, "flags:")
        .and_then(|v| u32::from_str_radix(v, 8).ok())
        .unwrap_or(0);
    Ok((pos, flags, text))
}

/// What `/proc` says of descriptor `fd` of `pid`.
fn see(pid: i32, fd: i32) -> Result<Seen, SaveError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let link = std::fs::read_link(&path)
        .map_err(proc_err(pid, path.clone()))?
        .display()
        .to_string();
    let (pos, flags, fdinfo) =
        fdinfo(pid, fd).map_err(proc_err(pid, format!("/proc/{pid}/fdinfo/{fd}")))?;
    let meta = std::fs::metadata(&path).map_err(proc_err(pid, path))?;
    Ok(Seen {
        fd,
        link,
        pos,
        flags,
        fdinfo,
        meta,
    })
}

/// What `/proc` says of every descriptor of `pid`, by number (read on all
/// cores when there are many: with thousands of descriptors this is most of
/// a checkpoint's freeze).
fn see_all(pid: i32) -> Result<Vec<Seen>, SaveError> {
    use rayon::prelude::*;
    let dir = format!("/proc/{pid}/fd");
    let mut numbers: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(proc_err(pid, dir.clone()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    // Waking the other cores costs more than a few dozen descriptors take.
    if numbers.len() >= PARALLEL_FDS {
        numbers.par_iter().map(|&fd| see(pid, fd)).collect()
    } else {
        numbers.iter().map(|&fd| see(pid, fd)).collect()
    }
}

/// Every open descriptor of the (frozen) process `pid`. In a tree, `scope`
/// says which pipe ends the other processes hold (and the caller runs
/// [`check_tree`] over the whole tree). `read_before`: the unix sockets
/// (inodes) whose queue held an empty message at the checkpoint before (a
/// queue not empty since is refused: that message can no longer be read).
pub fn collect(
    pid: i32,
    scope: Option<&mut TreeScope>,
    ext_unix_sk: bool,
    read_before: HashSet<u64>,
) -> Result<Fds, SaveError> {
    // SAFETY: plain syscall with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(proc_err(pid, format!("pidfd of {pid}"))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor the kernel just returned.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let seen = see_all(pid)?;
    let mut own = TreeScope {
        ext_unix_sk,
        ..TreeScope::default()
    };
    let scope = scope.unwrap_or(&mut own);
    let alone = !scope.in_tree;
    if alone {
        for s in seen.iter().filter(|s| s.link.starts_with("pipe:")) {
            scope.add_pipe_end(s.link.clone(), s.flags);
        }
        scope.ttys = tty::Scope::scan(&[pid]);
    }
    let mut tcp = Vec::new();
    let mut sockets = socket::Context::default();
    sockets.read_before = read_before;
    let mut cx = SaveCx {
        pid,
        pidfd: &pidfd,
        scope,
        sockets: &mut sockets,
        tcp: &mut tcp,
        moved: HashMap::new(),
    };
    // Files in flight first: a pipe end held only there is held all the same.
    let carried = socket::in_flight::gather(&mut cx, &seen)?;
    let mut out = Vec::with_capacity(seen.len());
    let (mut held, mut files) = (Vec::new(), Vec::new());
    for s in &seen {
        locks::save(&cx, s, &mut held, &mut files)?;
        let saved = KINDS.iter().find_map(|k| k.save(&mut cx, s));
        let mut info = match saved {
            Some(r) => r?,
            None => return Err(cx.refuse(s.fd, unclaimed(s))),
        };
        async_io::save(&cx, s, &mut info)?;
        out.push(info);
    }
    for s in &carried {
        out.push(socket::in_flight::save(&mut cx, s)?);
    }
    let mut in_flight: Vec<(i32, OwnedFd)> = cx.moved.drain().collect();
    in_flight.sort_by_key(|(fd, _)| *fd);
    if alone {
        check_tree(&[(pid, &out[..])], scope)?;
    }
    Ok(Fds {
        fds: out,
        tcp,
        locks: held,
        in_flight,
    })
}

/// What a descriptor no kind claims is, for the refusal.
fn unclaimed(s: &Seen) -> String {
    if let Some(name) = s.anon_name() {
        return name.to_string();
    }
    let what = match s.file_type() {
        libc::S_IFIFO => "named FIFO",
        _ => "descriptor",
    };
    format!("{what} {}", s.link)
}

/// `fd` as a descriptor of ours, or the error of the call that made it.
pub(crate) fn owned(fd: libc::c_int, call: &str) -> Result<OwnedFd, RestoreError> {
    if fd < 0 {
        return Err(RestoreError::Syscall {
            call: call.into(),
            err: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// "unreadable WHAT in the fdinfo of NAME".
pub(crate) fn unreadable(cx: &SaveCx<'_>, seen: &Seen, what: &str) -> SaveError {
    cx.refuse(
        seen.fd,
        format!(
            "unreadable {what} in the fdinfo of {}",
            seen.anon_name().unwrap_or(&seen.link)
        ),
    )
}

/// Every kind's checks across the descriptors of the processes saved
/// together.
pub fn check_tree(procs: &[(i32, &[FdInfo])], scope: &TreeScope) -> Result<(), SaveError> {
    KINDS.iter().try_for_each(|k| k.check_tree(procs, scope))
}

/// Every kind's checks of the image's descriptors before a restore starts.
pub fn preflight(m: &Manifest) -> Result<(), RestoreError> {
    for f in &m.fds {
        handler(f.kind)?.preflight(m, f)?;
    }
    Ok(())
}

/// The objects the descriptors of the processes `ms` share, made once.
pub fn prepare(ms: &[&Manifest], opts: &Prepare) -> Result<Shared, RestoreError> {
    let fds: Vec<&FdInfo> = ms.iter().flat_map(|m| m.fds.iter()).collect();
    let mut opts = opts.clone();
    for m in ms {
        opts.network_locks.extend(m.network_lock.clone());
        for f in &m.fds {
            if let FdState::Socket(s) = &f.state {
                opts.cwds.insert(s.inode, m.process.cwd.clone().into());
            }
        }
    }
    let opts = &opts;
    let mut shared = Shared::default();
    inherited::hand_over(&fds, &opts.inherit, &mut shared)?;
    for k in KINDS {
        let mine: Vec<&FdInfo> = fds
            .iter()
            .copied()
            .filter(|f| k.kinds().contains(&f.kind))
            .collect();
        if !mine.is_empty() {
            k.prepare(&mine, opts, &mut shared)?;
        }
    }
    Ok(shared)
}

/// What restoring the descriptors of one process needs.
pub struct RestoreCx<'a> {
    /// Syscalls in the process being built.
    pub sys: &'a dyn Sys,
    /// What [`prepare`] made.
    pub shared: &'a Shared,
    /// Shared memory objects made for the restore, by id.
    pub shmem: &'a HashMap<u64, OwnedFd>,
}

impl RestoreCx<'_> {
    /// Hands `ours` to the process.
    pub fn adopt(&self, ours: &OwnedFd) -> Result<i64, RestoreError> {
        self.sys.adopt(ours.as_fd())
    }
}

/// Recreates the descriptors of `m` at their numbers in the process being
/// built: each made at a number above all of them, its status flags set,
/// then moved to its own number; then each kind's [`Descriptor::finish`].
pub fn restore(cx: &RestoreCx<'_>, m: &Manifest) -> Result<(), RestoreError> {
    let max_fd = m.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
    let base = (max_fd + 64) as u64;
    let mut placed: Vec<(i32, i64, bool)> = Vec::new();
    for f in &m.fds {
        let Some(got) = handler(f.kind)?.open(cx, f)? else {
            continue;
        };
        let t = cx.sys.dup_above(got, base)?;
        cx.sys.close(got)?;
        // An O_PATH descriptor has no status flags (F_SETFL: EBADF).
        if f.flags & libc::O_PATH as u32 == 0 {
            cx.sys.set_status_flags(t, f.flags & SETTABLE_FLAGS)?;
        }
        placed.push((f.fd, t, f.cloexec));
    }
    for (fd, t, cloexec) in placed {
        cx.sys.dup3(t, fd, cloexec)?;
        cx.sys.close(t)?;
    }
    for (i, f) in m.fds.iter().enumerate() {
        // A second descriptor of an epoll set the process made already.
        if let Some(first) = epoll::made_before(m, i) {
            cx.sys.dup3(i64::from(first.fd), f.fd, f.cloexec)?;
            continue;
        }
        handler(f.kind)?.finish(cx, f)?;
    }
    for f in &m.fds {
        async_io::restore(cx.sys, f)?;
    }
    // The files in flight go back on their sockets' queues (and their
    // descriptors here are closed) once every file is in place.
    socket::in_flight::send(cx, m)?;
    // Locks last: a POSIX lock goes when any descriptor of its file closes.
    let path_of = |fd: i32| {
        m.fds
            .iter()
            .find(|f| f.fd == fd)
            .map_or_else(String::new, |f| f.path.clone())
    };
    locks::restore(cx.sys, &m.locks, path_of)
}

/// Helpers of the round-trip tests: save descriptors of the test process
/// itself, restore them through the recording fake.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::sys::fake::Recording;

    /// A scratch directory, removed when dropped.
    pub struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A new scratch directory named after the test.
    pub fn scratch(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("cr-ebpf-resources-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// What saving our own descriptors needs.
    pub struct SaveOwner {
        pidfd: OwnedFd,
        /// The scope, empty at first.
        pub scope: TreeScope,
        sockets: socket::Context,
        tcp: Vec<(i32, OwnedFd)>,
    }

    impl SaveOwner {
        /// For the test process, with an empty scope.
        pub fn new() -> Self {
            let pid = std::process::id() as i32;
            // SAFETY: plain syscall with integer arguments.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            assert!(pidfd >= 0, "pidfd_open of ourselves");
            Self {
                // SAFETY: a new descriptor we own.
                pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as i32) },
                scope: TreeScope::default(),
                sockets: socket::Context::default(),
                tcp: Vec::new(),
            }
        }

        /// The save context.
        pub fn cx(&mut self) -> SaveCx<'_> {
            SaveCx {
                pid: std::process::id() as i32,
                pidfd: &self.pidfd,
                scope: &mut self.scope,
                sockets: &mut self.sockets,
                tcp: &mut self.tcp,
                moved: HashMap::new(),
            }
        }
    }

    /// What `/proc` shows of our descriptor `fd`.
    pub fn seen(fd: i32) -> Seen {
        see(std::process::id() as i32, fd).unwrap()
    }

    /// A new pipe: (read end, write end).
    pub fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are new descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Our own descriptors `fds`, saved as a checkpoint would (the pipe
    /// ends we hold known; the checks across them are the tests' to run).
    pub fn save_own_many(fds: &[i32]) -> Vec<FdInfo> {
        let pid = std::process::id() as i32;
        let mut owner = SaveOwner::new();
        owner.scope = TreeScope::new(&[pid]);
        let mut cx = owner.cx();
        let out: Vec<FdInfo> = fds
            .iter()
            .map(|&fd| {
                KINDS
                    .iter()
                    .find_map(|k| k.save(&mut cx, &seen(fd)))
                    .expect("a kind claims it")
                    .unwrap()
            })
            .collect();
        out
    }

    /// Our own descriptor `fd`, saved.
    pub fn save_own(fd: i32) -> FdInfo {
        save_own_many(&[fd]).remove(0)
    }

    /// A manifest holding `fds`.
    pub fn manifest(fds: Vec<FdInfo>) -> Manifest {
        Manifest {
            fds,
            ..Manifest::default()
        }
    }

    /// `m`'s descriptors restored through the fake (shared objects made
    /// for real in this process).
    pub fn restore(m: &Manifest) -> Recording {
        let (rec, _shared) = restore_keeping(m);
        rec
    }

    /// [`restore`], also returning the shared objects it made.
    pub fn restore_keeping(m: &Manifest) -> (Recording, Shared) {
        let shared = prepare(&[m], &Prepare::default()).unwrap();
        let rec = Recording::new();
        let shmem = HashMap::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        super::restore(&cx, m).unwrap();
        (rec, shared)
    }

    /// `info` made by `kind` through the fake.
    pub fn restore_one(kind: &dyn Descriptor, info: &FdInfo) -> Recording {
        let shared = Shared::default();
        let shmem = HashMap::new();
        let rec = Recording::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        kind.open(&cx, info).unwrap().expect("made and handed over");
        rec
    }

    /// Restores `info` with `kind` through the fake, then saves the object
    /// it made and handed over (a duplicate of it) again: its state.
    pub fn rebuilt_state(kind: &dyn Descriptor, info: &FdInfo) -> cr_ebpf_image::FdState {
        let rec = restore_one(kind, info);
        let made = rec.adopted().pop().expect("one descriptor handed over");
        let mut owner = SaveOwner::new();
        kind.save(&mut owner.cx(), &seen(made.as_raw_fd()))
            .expect("claimed")
            .unwrap()
            .state
    }
}
