//! Terminals. A pseudo-terminal pair whose master is checkpointed comes
//! back as a new pair (`/dev/ptmx`, unlocked; each open file description of
//! the old slave becomes one of the new slave, from `TIOCGPTPEER`: a
//! `/dev/pts/N` is never reopened by path) with the old pair's termios,
//! window size, packet and exclusive modes and the slave's owner and mode.
//! `/dev/tty` is opened again once the process has its controlling
//! terminal back (`process/terminal.rs`). The controlling terminal of a
//! shell job (a terminal outside the checkpoint, taken only with
//! `--shell-job`) becomes the restorer's own terminal.
//!
//! Bytes waiting in either direction are read and written back at once
//! (`queues.rs`), and written into the new pair.
//!
//! Refused at checkpoint time: bytes waiting in a pair whose master is in
//! packet mode (a change of settings would show), or when cr-ebpf lacks
//! `CAP_SYS_ADMIN` (`TIOCSTI`), a master whose slave is closed everywhere, a pair also
//! held or controlling a process outside the checkpoint, a slave whose
//! master is outside it (unless it is a shell job's terminal), and any
//! other terminal (virtual consoles, serial lines, `/dev/console`).

use std::{
    collections::{HashMap, HashSet},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, PtyPair, TtyInfo, TtyRole, TERMIOS_LEN};

use super::{Descriptor, Prepare, RestoreCx, SaveCx, Seen, Shared};
use crate::{RestoreError, SaveError};

/// Terminal descriptors.
pub struct Tty;

/// The id under which a shell job's terminal is kept in [`Shared`].
const OUTSIDE: u64 = u64::MAX;
/// Open files of terminal devices are numbered under this key plus the
/// device number.
const DEVICE: u64 = 1 << 40;
/// `CAP_SYS_ADMIN`, which handing bytes to a terminal's input (`TIOCSTI`)
/// takes.
const CAP_SYS_ADMIN: u32 = 21;
/// `KCMP_FILE`: whether two descriptors are one open file description.
const KCMP_FILE: i32 = 0;

/// Whether character devices of `major` are terminals: virtual consoles and
/// serial lines (4), `/dev/tty`, `/dev/console`, `/dev/ptmx` (5), pseudo
/// terminals (136-143).
pub fn is_terminal(major: u32) -> bool {
    matches!(major, 4 | 5 | 136..=143)
}

/// The pair index of a pseudo-terminal slave device.
fn pts_index(major: u32, minor: u32) -> Option<u32> {
    (136..=143)
        .contains(&major)
        .then(|| (major - 136) * 256 + minor)
}

/// `(major, minor)` of a device number in the kernel's 32-bit encoding
/// (`tty_nr` of `/proc/PID/stat`, `TIOCGDEV`).
pub fn decode_dev(v: u32) -> (u32, u32) {
    ((v >> 8) & 0xfff, (v & 0xff) | ((v >> 12) & 0xfff00))
}

/// A device number in the kernel's 32-bit encoding ([`decode_dev`]).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The pair index of a controlling terminal (`tty_nr`), if it is a
/// pseudo-terminal slave.
pub fn ctty_index(tty_nr: i32) -> Option<u32> {
    let (major, minor) = decode_dev(tty_nr as u32);
    (tty_nr != 0).then_some(()).and(pts_index(major, minor))
}

/// What the processes saved together hold of terminals, listed before any
/// of them is saved, and the open files seen while saving.
#[derive(Default)]
pub struct Scope {
    /// Pairs whose master a process of the checkpoint holds.
    pub masters: HashSet<u32>,
    /// Pairs whose slave a process of the checkpoint holds open.
    pub slaves: HashSet<u32>,
    /// The controlling terminal (`tty_nr`) of each process.
    pub ctty: HashMap<i32, i32>,
    /// Open file descriptions seen: (pair or [`OUTSIDE`], number, ours).
    opens: Vec<(u64, u16, OwnedFd)>,
    /// `/dev/tty` descriptions seen.
    aliases: Vec<OwnedFd>,
}

/// The pair index of a master descriptor from its fdinfo.
fn fdinfo_index(pid: i32, fd: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    super::fdinfo_field(&text, "tty-index:")?.parse().ok()
}

impl Scope {
    /// What the processes `pids` hold.
    pub fn scan(pids: &[i32]) -> Self {
        let mut s = Self::default();
        for &pid in pids {
            if let Ok(st) = crate::proc::stat(pid) {
                s.ctty.insert(pid, st.tty_nr);
            }
            let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(link) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let link = link.display().to_string();
                if link == "/dev/ptmx" || link == "/dev/pts/ptmx" {
                    if let Some(i) = e.file_name().to_str().and_then(|n| fdinfo_index(pid, n)) {
                        s.masters.insert(i);
                    }
                } else if let Some(n) = link.strip_prefix("/dev/pts/") {
                    if let Ok(i) = n.parse() {
                        s.slaves.insert(i);
                    }
                }
            }
        }
        s
    }

    /// The number of the open file description `dup` is among those of
    /// `key` seen so far (a new one if none).
    fn open_of(&mut self, key: u64, dup: OwnedFd) -> Option<u16> {
        let same = |o: &OwnedFd| same_file(&dup, o);
        if let Some((_, n, _)) = self.opens.iter().find(|(k, _, o)| *k == key && same(o)) {
            return Some(*n);
        }
        let n = self.opens.iter().filter(|(k, _, _)| *k == key).count();
        let n = u16::try_from(n).ok().filter(|&n| n < 254)?;
        self.opens.push((key, n, dup));
        Some(n)
    }
}

/// Whether two descriptors of ours are one open file description.
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let me = std::process::id() as i32;
    // SAFETY: kcmp with integer arguments only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            me,
            me,
            KCMP_FILE,
            a.as_raw_fd(),
            b.as_raw_fd(),
        )
    };
    r == 0
}

/// `ioctl(fd, req, &mut int)`.
fn ioctl_int(fd: &OwnedFd, req: libc::Ioctl) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into `v`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// A new open file of the slave of master `master` (`TIOCGPTPEER`).
pub fn open_peer(master: &OwnedFd, flags: i32) -> std::io::Result<OwnedFd> {
    let flags = flags | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as its argument.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The index of the pair of master `master` (`TIOCGPTN`).
pub fn pair_index(master: &OwnedFd) -> std::io::Result<u32> {
    ioctl_int(master, libc::TIOCGPTN).map(|v| v as u32)
}

/// A process outside `pids` (and other than cr-ebpf) that holds the slave
/// of pair `index` open or has it as its controlling terminal.
fn outside_holder(index: u32, pids: &[i32]) -> Option<i32> {
    let me = std::process::id() as i32;
    let path = format!("/dev/pts/{index}");
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me && !pids.contains(p))
        .find(|&pid| {
            let ctty = crate::proc::stat(pid).is_ok_and(|st| ctty_index(st.tty_nr) == Some(index));
            ctty || std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten().any(|f| {
                    std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == path.as_str())
                })
            })
        })
}

/// The settings of the pair of master `dup` (a duplicate of ours), after
/// checking it can be made again as it is.
fn save_pair(
    cx: &SaveCx<'_>,
    seen: &Seen,
    dup: &OwnedFd,
    index: u32,
) -> Result<PtyPair, SaveError> {
    let refuse = |what: String| cx.refuse(seen.fd, what);
    let io = |what: &str| {
        let what = format!("pseudo-terminal pair {index}: {what}");
        move |e: std::io::Error| cx.refuse(seen.fd, format!("{what}: {e}"))
    };
    let t = &cx.scope.ttys;
    let controls = t.ctty.values().any(|&n| ctty_index(n) == Some(index));
    if !t.slaves.contains(&index) && !controls {
        return Err(refuse(format!(
            "a pseudo-terminal master (pair {index}) whose slave is closed everywhere: a \
             new pair would not be hung up as this one is"
        )));
    }
    let mut pids = cx.scope.pids.clone();
    pids.push(cx.pid);
    if let Some(other) = outside_holder(index, &pids) {
        return Err(refuse(format!(
            "a pseudo-terminal pair ({index}) whose slave process {other}, not checkpointed \
             with it, holds or has as its controlling terminal"
        )));
    }
    let peer = open_peer(dup, libc::O_RDWR | libc::O_NONBLOCK).map_err(io("opening the slave"))?;
    // Bytes still in the kernel's flip buffers are invisible to FIONREAD:
    // a poll makes the line discipline take them (the slave's first, as
    // their echo goes to the master).
    for fd in [&peer, dup] {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll of one descriptor of ours, without waiting.
        unsafe { libc::poll(&mut p, 1, 0) };
    }
    let packet = ioctl_int(dup, libc::TIOCGPKT).map_err(io("TIOCGPKT"))? != 0;
    let takes = !packet && crate::proc::have_cap(CAP_SYS_ADMIN);
    for (fd, end) in [(dup, "master"), (&peer, "slave")] {
        let unread = ioctl_int(fd, libc::FIONREAD).map_err(io("FIONREAD"))?;
        let unsent = ioctl_int(fd, libc::TIOCOUTQ).map_err(io("TIOCOUTQ"))?;
        // In packet mode a change of settings would show the master a
        // status byte, and without CAP_SYS_ADMIN the slave's queue could
        // not be handed back (TIOCSTI): the queues are not taken.
        if unsent > 0 || (!takes && unread > 0) {
            return Err(refuse(format!(
                "a pseudo-terminal pair ({index}) with {unread} byte(s) waiting to be read and \
                 {unsent} to be sent on its {end} side{}: a terminal's queues cannot be read \
                 without consuming them (try again once its reader has caught up)",
                if packet {
                    " in packet mode"
                } else if takes {
                    ""
                } else {
                    " (taking them needs CAP_SYS_ADMIN)"
                }
            )));
        }
    }
    let (master_queue, slave_queue) = if !takes {
        (Vec::new(), Vec::new())
    } else {
        queues::take(dup, &peer).map_err(io("reading its queues"))?
    };
    let mut termios = [0u8; TERMIOS_LEN];
    // SAFETY: TCGETS2 writes a struct termios2 (TERMIOS_LEN bytes).
    if unsafe { libc::ioctl(peer.as_raw_fd(), libc::TCGETS2, termios.as_mut_ptr()) } < 0 {
        return Err(io("TCGETS2")(std::io::Error::last_os_error()));
    }
    let mut ws = [0u16; 4];
    // SAFETY: TIOCGWINSZ writes a struct winsize (four u16).
    if unsafe { libc::ioctl(peer.as_raw_fd(), libc::TIOCGWINSZ, ws.as_mut_ptr()) } < 0 {
        return Err(io("TIOCGWINSZ")(std::io::Error::last_os_error()));
    }
    let meta = std::fs::File::from(peer.try_clone().map_err(io("dup"))?)
        .metadata()
        .map_err(io("fstat"))?;
    Ok(PtyPair {
        termios: termios.to_vec(),
        winsize: ws,
        packet,
        exclusive: ioctl_int(&peer, libc::TIOCGEXCL).map_err(io("TIOCGEXCL"))? != 0,
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
        master_queue,
        slave_queue,
    })
}

/// "... `dump --shell-job` ..." for a terminal outside the checkpoint that
/// is the process's controlling terminal.
fn shell_job_hint(seen: &Seen) -> String {
    format!(
        "the terminal {} of a shell job (its controlling terminal, outside the checkpoint): \
         `cr-ebpf dump --shell-job` checkpoints it, and `restore --shell-job` gives it \
         cr-ebpf's own terminal",
        seen.link
    )
}

fn save_tty(cx: &mut SaveCx<'_>, seen: &Seen, major: u32, minor: u32) -> Result<FdInfo, SaveError> {
    let dup = cx.dup(seen.fd)?;
    let ctty = crate::proc::stat(cx.pid).map_or(0, |s| s.tty_nr);
    let shell_job = cx.scope.shell_job;
    let tty = |role, open, index, pair| TtyInfo {
        role,
        open,
        index,
        pair,
    };
    let (pid, fd) = (cx.pid, seen.fd);
    let too_many = || SaveError::NotSupportedFd {
        pid,
        fd,
        what: "more than 254 open files of one terminal".into(),
    };
    let state = match (major, minor) {
        (5, 2) => {
            let index = pair_index(&dup)
                .map_err(|e| cx.refuse(seen.fd, format!("a /dev/ptmx without its index: {e}")))?;
            let pair = save_pair(cx, seen, &dup, index)?;
            tty(TtyRole::Master, 0, index, Some(pair))
        }
        (5, 0) => {
            let real = ioctl_int(&dup, libc::TIOCGDEV).unwrap_or(0);
            if ctty == 0 || real != ctty {
                return Err(cx.refuse(
                    seen.fd,
                    "/dev/tty open on a terminal that is no longer the process's \
                     controlling terminal",
                ));
            }
            let shared = cx.scope.ttys.aliases.iter().any(|o| same_file(&dup, o));
            if shared {
                return Err(cx.refuse(
                    seen.fd,
                    "a /dev/tty open file held by several descriptors: each would be \
                     opened on its own",
                ));
            }
            let inside = ctty_index(ctty).is_some_and(|i| cx.scope.ttys.masters.contains(&i));
            if !inside && !shell_job {
                return Err(cx.refuse(seen.fd, shell_job_hint(seen)));
            }
            cx.scope.ttys.aliases.push(dup);
            tty(TtyRole::Controlling, 0, 0, None)
        }
        _ => {
            let index = pts_index(major, minor);
            if let Some(i) = index.filter(|i| cx.scope.ttys.masters.contains(i)) {
                let open = cx.scope.ttys.open_of(i as u64, dup).ok_or_else(too_many)?;
                tty(TtyRole::Slave, open, i, None)
            } else {
                let real = ioctl_int(&dup, libc::TIOCGDEV).unwrap_or(-1);
                // A device (not a pseudo-terminal, whose number a new pair
                // could take) is opened again by its path.
                let by_path = index.is_none()
                    && seen.link.starts_with('/')
                    && !seen.link.ends_with(" (deleted)");
                if real != ctty && !by_path {
                    return Err(cx.refuse(
                        seen.fd,
                        format!(
                            "a terminal ({}, device {major}:{minor}) that is neither a \
                             pseudo-terminal pair checkpointed with it nor its controlling \
                             terminal: it cannot be restored",
                            seen.link
                        ),
                    ));
                }
                if real != ctty {
                    let dev = encode_dev(major, minor);
                    let open = cx.scope.ttys.open_of(DEVICE | u64::from(dev), dup);
                    tty(TtyRole::Device, open.ok_or_else(too_many)?, dev, None)
                } else {
                    if !shell_job {
                        return Err(cx.refuse(seen.fd, shell_job_hint(seen)));
                    }
                    let open = cx.scope.ttys.open_of(OUTSIDE, dup).ok_or_else(too_many)?;
                    tty(TtyRole::Outside, open, 0, None)
                }
            }
        }
    };
    let mut info = seen.info(FdKind::Tty);
    info.state = FdState::Tty(state);
    Ok(info)
}

fn state(f: &FdInfo) -> Result<&TtyInfo, RestoreError> {
    match &f.state {
        FdState::Tty(t) => Ok(t),
        _ => Err(RestoreError::NotSupported(format!(
            "descriptor {} is a terminal without its state",
            f.fd
        ))),
    }
}

fn fail(call: &'static str) -> impl Fn(std::io::Error) -> RestoreError {
    move |err| RestoreError::Syscall {
        call: call.into(),
        err,
    }
}

/// A new pseudo-terminal pair with the settings `p`: its master.
pub fn make_pair(p: &PtyPair) -> Result<OwnedFd, RestoreError> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_noctty()
        .open("/dev/ptmx")
        .map_err(fail("open(/dev/ptmx)"))?;
    let master = OwnedFd::from(master);
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(fail("unlockpt")(std::io::Error::last_os_error()));
    }
    let peer = open_peer(&master, libc::O_RDWR).map_err(fail("TIOCGPTPEER"))?;
    let raw = peer.as_raw_fd();
    // SAFETY: TCSETS2 reads a struct termios2 (TERMIOS_LEN bytes, checked
    // when the image was read).
    if unsafe { libc::ioctl(raw, libc::TCSETS2, p.termios.as_ptr()) } < 0 {
        return Err(fail("TCSETS2")(std::io::Error::last_os_error()));
    }
    // SAFETY: TIOCSWINSZ reads a struct winsize.
    if unsafe { libc::ioctl(raw, libc::TIOCSWINSZ, p.winsize.as_ptr()) } < 0 {
        return Err(fail("TIOCSWINSZ")(std::io::Error::last_os_error()));
    }
    let packet: libc::c_int = p.packet.into();
    // SAFETY: TIOCPKT reads one int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCPKT, &packet) } < 0 {
        return Err(fail("TIOCPKT")(std::io::Error::last_os_error()));
    }
    if p.exclusive {
        // SAFETY: TIOCEXCL takes no argument.
        if unsafe { libc::ioctl(raw, libc::TIOCEXCL) } < 0 {
            return Err(fail("TIOCEXCL")(std::io::Error::last_os_error()));
        }
    }
    // SAFETY: fchown and fchmod of our own descriptor.
    let failed = unsafe { libc::fchown(raw, p.uid, p.gid) < 0 || libc::fchmod(raw, p.mode) < 0 };
    if failed {
        return Err(fail("fchown/fchmod of the slave")(
            std::io::Error::last_os_error(),
        ));
    }
    queues::put(&peer, &p.termios, &p.master_queue, &p.slave_queue)
        .map_err(fail("refilling the terminal's queues"))?;
    Ok(master)
}

trait NoCtty {
    fn custom_flags_noctty(&mut self) -> &mut Self;
}

impl NoCtty for std::fs::OpenOptions {
    fn custom_flags_noctty(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.custom_flags(libc::O_NOCTTY)
    }
}

/// The terminal device of `f` opened again by its path (never becoming a
/// controlling terminal), which must still be device `dev` (the kernel's
/// encoding).
fn open_device(f: &FdInfo, dev: u32) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let acc = f.flags as i32 & libc::O_ACCMODE;
    let file = std::fs::OpenOptions::new()
        .read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&f.path)
        .map_err(|e| RestoreError::File {
            path: f.path.clone(),
            what: format!("a terminal device the process had open, cannot be opened: {e}"),
        })?;
    let meta = file.metadata().map_err(fail("fstat (terminal device)"))?;
    let (major, minor) = decode_dev(dev);
    let now = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    if !meta.file_type().is_char_device() || now != (major, minor) {
        return Err(RestoreError::File {
            path: f.path.clone(),
            what: format!(
                "the process had open as terminal device {major}:{minor}, is now {}",
                if meta.file_type().is_char_device() {
                    format!("device {}:{}", now.0, now.1)
                } else {
                    "not a character device".into()
                }
            ),
        });
    }
    Ok(file.into())
}

/// A new open file of cr-ebpf's own terminal (its standard input), for a
/// shell job's terminal descriptors.
fn our_terminal(flags: i32) -> Result<OwnedFd, RestoreError> {
    // SAFETY: isatty on our standard input.
    if unsafe { libc::isatty(0) } != 1 {
        return Err(RestoreError::NotSupported(
            "a shell job's terminal: cr-ebpf's standard input is not a terminal to give it".into(),
        ));
    }
    let path = c"/proc/self/fd/0";
    let acc = flags & libc::O_ACCMODE;
    // SAFETY: open of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), acc | libc::O_NOCTTY | libc::O_CLOEXEC) };
    super::owned(fd, "open(cr-ebpf's terminal)")
}

impl Descriptor for Tty {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Tty]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.file_type() != libc::S_IFCHR {
            return None;
        }
        let rdev = seen.meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        is_terminal(major).then(|| save_tty(cx, seen, major, minor))
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        opts: &Prepare,
        shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        for f in fds {
            let t = state(f)?;
            if let (TtyRole::Master, Some(p)) = (t.role, &t.pair) {
                if !shared.contains(FdKind::Tty, t.index as u64) {
                    shared.insert(FdKind::Tty, t.index as u64, 0, make_pair(p)?);
                }
            }
        }
        for f in fds {
            let t = state(f)?;
            let (id, part) = match t.role {
                TtyRole::Slave => (t.index as u64, t.open as u8 + 1),
                TtyRole::Outside => (OUTSIDE, t.open as u8 + 1),
                TtyRole::Device => (DEVICE | u64::from(t.index), t.open as u8 + 1),
                _ => continue,
            };
            if shared.get(FdKind::Tty, id, part, f.fd).is_ok() {
                continue;
            }
            let made = if t.role == TtyRole::Device {
                open_device(f, t.index)?
            } else if t.role == TtyRole::Outside {
                if !opts.shell_job {
                    return Err(RestoreError::NotSupported(
                        "a shell job's terminal: restore it with --shell-job".into(),
                    ));
                }
                our_terminal(f.flags as i32)?
            } else {
                let master = shared.get(FdKind::Tty, id, 0, f.fd).map_err(|_| {
                    RestoreError::NotSupported(format!(
                        "the slave of pseudo-terminal pair {} without its master",
                        t.index
                    ))
                })?;
                open_peer(master, f.flags as i32 & libc::O_ACCMODE).map_err(fail("TIOCGPTPEER"))?
            };
            shared.insert(FdKind::Tty, id, part, made);
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        let t = state(f)?;
        let (id, part) = match t.role {
            TtyRole::Master => (t.index as u64, 0),
            TtyRole::Slave => (t.index as u64, t.open as u8 + 1),
            TtyRole::Outside => (OUTSIDE, t.open as u8 + 1),
            TtyRole::Device => (DEVICE | u64::from(t.index), t.open as u8 + 1),
            TtyRole::Controlling => {
                let flags = f.flags as i32 & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL)
                    | libc::O_NOCTTY;
                return cx
                    .sys
                    .openat("/dev/tty", flags & !libc::O_CLOEXEC)
                    .map(Some);
            }
            TtyRole::Invalid => {
                return Err(RestoreError::NotSupported("terminal role 0".into()));
            }
        };
        let ours = cx.shared.get(FdKind::Tty, id, part, f.fd)?;
        cx.adopt(ours).map(Some)
    }
}

mod queues;
#[cfg(test)]
mod tests;
