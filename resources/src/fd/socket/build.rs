//! Making the sockets of a restore, once each, in the restorer: the
//! sockets others reach by address first (listeners, bound sockets), then
//! connections: unix ones accepted through their restored listener or made
//! as pairs, TCP ones rebuilt in repair mode; then every TCP connection is
//! let go at once, the directions shut down are shut down again, and the
//! files of sockets whose file had been removed are removed again.

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use cr_ebpf_image::{SocketFile, SocketInfo};

use super::{
    apply_options, bind, check, connect, connecting, fail,
    fin::half_close,
    option_int, patiently, send_all, send_to, setsockopt_int,
    tcp::{closed_connection, refills, release, send_unsent, tcp_connection, Refill, TCP_SYN_SENT},
    unix::{listener_of, mirrored, orphan, socketpair, unix_path},
    unlock::unlock_network,
};
use crate::RestoreError;

/// Every socket of `sockets` (descriptor number, socket) once, by inode (a
/// socket open under several numbers, or in several processes, is one
/// socket). With `close_connections`, established TCP connections are
/// closed instead of re-established.
/// A relative unix name is bound or connected to in the directory of
/// `cwds` (by socket inode): the working directory of its process.
/// Messages that carry files in flight are left to `in_flight::send`; so
/// are the other ends of pairs whose peer had closed that must send them
/// (returned by the inode of the socket they send to).
pub(super) fn build(
    sockets: &[(i32, &SocketInfo)],
    opts: &crate::fd::Prepare,
) -> Result<Built, RestoreError> {
    let (close_connections, cwds) = (opts.close_connections, &opts.cwds);
    if close_connections {
        // The peers are to get a reset: let their packets through.
        unlock_network(&opts.network_locks)?;
    }
    let by_inode: HashMap<u64, &SocketInfo> = sockets.iter().map(|(_, s)| (s.inode, *s)).collect();
    let mut order: Vec<&SocketInfo> = Vec::new();
    for (_, s) in sockets {
        if !order.iter().any(|o| o.inode == s.inode) {
            order.push(s);
        }
    }
    // What others connect to exists before they connect (a stable sort:
    // otherwise in descriptor order); pairs accepted through a listener
    // come before the connections still waiting in its queue.
    order.sort_by_key(|s| match () {
        _ if s.listening || (s.peer.is_empty() && s.tcp.is_none()) => 0,
        _ if pair_peer(s, &by_inode).is_some() => 1,
        _ => 2,
    });
    let plans = refills(&by_inode);
    let sharing = sharing_a_port(&by_inode);
    let mut made: HashMap<u64, OwnedFd> = HashMap::new();
    let mut senders = Vec::new();
    let mut removed = Names::default();
    removed.cwds = cwds.clone();
    // Shut down before connecting: the shutdown did not reach the peer.
    let mut shut: Vec<u64> = Vec::new();
    for s in order {
        if made.contains_key(&s.inode) {
            continue;
        }
        if orphan(s) {
            let (a, sender) = orphaned(s, &mut removed)?;
            made.insert(s.inode, a);
            senders.extend(sender.map(|b| (s.inode, b)));
        } else if let Some(peer) = pair_peer(s, &by_inode) {
            let (a, b, early) = pair(s, peer, &by_inode, &made, &mut removed)?;
            made.insert(s.inode, a);
            made.insert(peer.inode, b);
            shut.extend(early);
        } else {
            made.insert(
                s.inode,
                single(s, close_connections, &plans, &sharing, &mut removed)?,
            );
            // Sockets connected to this one by name connect now, before
            // another socket may be bound at the same name.
            let named = s.family == libc::AF_UNIX as u16 && !s.local.is_empty() && !s.listening;
            let clients = sockets
                .iter()
                .map(|(_, c)| *c)
                .filter(|c| named && c.peer_inode == s.inode && pair_peer(c, &by_inode).is_none());
            for c in clients {
                if let std::collections::hash_map::Entry::Vacant(e) = made.entry(c.inode) {
                    e.insert(single(
                        c,
                        close_connections,
                        &plans,
                        &sharing,
                        &mut removed,
                    )?);
                }
            }
        }
    }
    for (_, s) in sockets {
        if let Some(fd) = made.get(&s.inode).filter(|_| rebound(s)) {
            for &(level, name) in BIND_OPTIONS {
                let saved = option_int(s, level, name).unwrap_or(0);
                setsockopt_int(fd, level, name, saved).map_err(fail("setsockopt after bind"))?;
            }
        }
    }
    resend(&by_inode, &made, &removed)?;
    let connections: Vec<(&OwnedFd, &SocketInfo, &cr_ebpf_image::TcpRepair)> = by_inode
        .values()
        .filter_map(|s| Some((made.get(&s.inode)?, *s, s.tcp.as_ref()?)))
        .filter(|_| !close_connections)
        .collect();
    // Every connection exists (in repair mode): the peers may reach them
    // again before they leave it, so that what they send out of repair
    // mode (a window probe), and the FINs made again below, are not dropped.
    unlock_network(&opts.network_locks)?;
    // Half-closed connections get their FINs while every connection is
    // still in repair mode.
    for &(fd, s, t) in &connections {
        half_close(fd, s, t)?;
    }
    for &(fd, s, t) in &connections {
        release(fd, s)?;
        if t.state == TCP_SYN_SENT {
            connecting::connect_now(fd, s)?;
        }
    }
    for &(fd, s, t) in &connections {
        let plan = plans.get(&s.inode).copied();
        send_unsent(fd, s, t, plan.unwrap_or_else(|| Refill::new(t, None)))?;
    }
    for s in by_inode.values().filter(|s| s.in_flight.is_empty()) {
        if s.shutdown != 0 && !shut.contains(&s.inode) {
            if let Some(fd) = made.get(&s.inode) {
                shutdown(fd, s.shutdown).map_err(fail("shutdown (restored socket)"))?;
            }
        }
    }
    removed
        .finish()
        .map_err(fail("removing a unix socket's file again"))?;
    Ok((made, senders))
}

/// The sockets made, by inode, and the senders of files in flight kept
/// (by the inode of the socket they send to).
pub(super) type Built = (HashMap<u64, OwnedFd>, Vec<(u64, OwnedFd)>);

/// The messages queued on datagram sockets without a peer of their own,
/// each sent again to the socket's name by its sender: the restored socket
/// of that name, or an unnamed one for an unnamed sender.
fn resend(
    by_inode: &HashMap<u64, &SocketInfo>,
    made: &HashMap<u64, OwnedFd>,
    names: &Names,
) -> Result<(), RestoreError> {
    let mut unnamed: Option<OwnedFd> = None;
    for s in by_inode
        .values()
        .filter(|s| !s.senders.is_empty() && !orphan(s))
    {
        let dir = unix_path(&s.local).and_then(|p| names.dir_of(s, &p).map(Path::to_path_buf));
        for (m, from) in s.queue.iter().zip(&s.senders) {
            let sender = if from.is_empty() {
                if unnamed.is_none() {
                    unnamed = Some(super::socket(s).map_err(fail("socket (a message's sender)"))?);
                }
                unnamed.as_ref().expect("made")
            } else {
                by_inode
                    .values()
                    .find(|o| o.family == libc::AF_UNIX as u16 && o.local == *from)
                    .and_then(|o| made.get(&o.inode))
                    .ok_or_else(|| {
                        RestoreError::NotSupported("a queued message's sender was not made".into())
                    })?
            };
            in_dir(dir.as_deref(), || send_to(sender, m, &s.local))
                .map_err(fail("sending a queued message again"))?;
        }
    }
    Ok(())
}

/// The other end of a unix connection both of whose ends are restored (a
/// datagram socket connected to itself is no pair).
fn pair_peer<'a>(
    s: &SocketInfo,
    by_inode: &HashMap<u64, &'a SocketInfo>,
) -> Option<&'a SocketInfo> {
    let peer = *by_inode.get(&s.peer_inode)?;
    (s.family == libc::AF_UNIX as u16
        && s.peer_inode != 0
        && s.peer_inode != s.inode
        && peer.peer_inode == s.inode)
        .then_some(peer)
}

/// `shutdown` with the kernel's `sk_shutdown` bits (1 receiving, 2
/// sending). On a socket that is not connected the kernel answers
/// `ENOTCONN` but shuts it down all the same.
pub(super) fn shutdown(fd: &OwnedFd, bits: u8) -> io::Result<()> {
    let how = match bits & 3 {
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on our socket.
    match check(unsafe { libc::shutdown(fd.as_raw_fd(), how) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        r => r,
    }
}

/// Both ends of a unix connection, with their options and the messages
/// queued on each, and the inode of an end already shut down. A stream one
/// accepted by a listener that is restored too is connected through that
/// listener, as it was: the accepted end is named after the listener and
/// the other end's shutdown from before it connected does not reach its
/// peer.
fn pair(
    s: &SocketInfo,
    peer: &SocketInfo,
    by_inode: &HashMap<u64, &SocketInfo>,
    made: &HashMap<u64, OwnedFd>,
    removed: &mut Names,
) -> Result<(OwnedFd, OwnedFd, Option<u64>), RestoreError> {
    let listener = |accepted: &SocketInfo, other: &SocketInfo| {
        listener_of(accepted, other, by_inode.values().copied()).and_then(|l| made.get(&l.inode))
    };
    let (a, b, early) = if let Some(l) = listener(peer, s) {
        let (a, b) = accept_through(l, s, peer.shutdown, removed)?;
        (a, b, Some(s.inode))
    } else if let Some(l) = listener(s, peer) {
        let (b, a) = accept_through(l, peer, s.shutdown, removed)?;
        (a, b, Some(peer.inode))
    } else {
        let (a, b) = socketpair(s).map_err(fail("socketpair"))?;
        (a, b, None)
    };
    for (fd, of) in [(&a, s), (&b, peer)] {
        if early != Some(of.inode) {
            apply_options(fd, of, false)?;
        }
    }
    // Each end's queue was written by the other end (files in flight
    // later, once they exist).
    for (to, from) in [(s, &b), (peer, &a)] {
        if !to.in_flight.is_empty() {
            continue;
        }
        for m in &to.queue {
            send_all(from, m, libc::MSG_DONTWAIT)
                .map_err(fail("refilling a unix socket's queue"))?;
        }
    }
    Ok((a, b, early))
}

/// An end whose peer had closed ([`orphan`]): one end of a new pair,
/// named as it was, holding what the other end (named as the peer was, for
/// a moment) sent before it is closed; when they carry files in flight, it
/// is kept to send them later.
fn orphaned(
    s: &SocketInfo,
    removed: &mut Names,
) -> Result<(OwnedFd, Option<OwnedFd>), RestoreError> {
    let (a, b) = socketpair(s).map_err(fail("socketpair (unix connection)"))?;
    apply_options(&a, s, false)?;
    let gone = SocketInfo {
        local: s.peer.clone(),
        file: Some(SocketFile::Removed),
        ..s.clone()
    };
    for (fd, of) in [(&a, s), (&b, &gone)] {
        match unix_path(&of.local) {
            Some(p) => bind_unix(fd, of, &p, removed)?,
            None if !of.local.is_empty() => {
                bind(fd, &of.local).map_err(fail("bind (unix connection)"))?
            }
            None => {}
        }
    }
    if !s.in_flight.is_empty() {
        return Ok((a, Some(b)));
    }
    for m in &s.queue {
        send_all(&b, m, libc::MSG_DONTWAIT).map_err(fail("refilling a unix socket's queue"))?;
    }
    drop(b);
    Ok((a, None))
}

/// `s` connected to the restored listener `l` and accepted there at once:
/// (`s`, the accepted end, whose shutdown bits are `accepted`). What of
/// `s`'s shutdown the accepted end's does not account for (`shutdown` on
/// one end shuts its peer the other way) was done before connecting, and
/// is done so again; the rest comes from the accepted end's own shutdown,
/// made after the queues are refilled (shut for sending before, `s` could
/// not refill the accepted end's queue).
fn accept_through(
    l: &OwnedFd,
    s: &SocketInfo,
    accepted: u8,
    removed: &mut Names,
) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let a = super::socket(s).map_err(fail("socket (unix connection)"))?;
    apply_options(&a, s, false)?;
    match unix_path(&s.local) {
        Some(p) => bind_unix(&a, s, &p, removed)?,
        None if !s.local.is_empty() => {
            bind(&a, &s.local).map_err(fail("bind (unix connection)"))?
        }
        None => {}
    }
    let early = s.shutdown & !mirrored(accepted) & 3;
    if early != 0 {
        shutdown(&a, early).map_err(fail("shutdown (unix connection)"))?;
    }
    removed
        .connect(&a, s)
        .map_err(fail("connect (unix connection)"))?;
    // SAFETY: accepting on our listener; no address wanted.
    let b = unsafe {
        libc::accept4(
            l.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if b < 0 {
        return Err(fail("accept4 (unix connection)")(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor we own.
    let b = unsafe { OwnedFd::from_raw_fd(b) };
    // The process sets its own O_NONBLOCK on its descriptor.
    // SAFETY: plain fcntl on our descriptor.
    check(unsafe { libc::fcntl(b.as_raw_fd(), libc::F_SETFL, 0) })
        .map_err(fail("fcntl (accepted unix connection)"))?;
    Ok((a, b))
}

/// Any socket but the ends of a unix connection restored together.
fn single(
    s: &SocketInfo,
    close_connections: bool,
    plans: &HashMap<u64, Refill>,
    sharing: &HashSet<u64>,
    removed: &mut Names,
) -> Result<OwnedFd, RestoreError> {
    if let Some(t) = &s.tcp {
        if close_connections {
            return closed_connection(s, t);
        }
        if t.state == TCP_SYN_SENT {
            return connecting::rebuild(s, t);
        }
        let plan = plans.get(&s.inode).copied();
        let plan = plan.unwrap_or_else(|| Refill::new(t, None));
        return tcp_connection(s, t, plan);
    }
    let fd = super::socket(s).map_err(fail(format!("socket({}, {})", s.family, s.sock_type)))?;
    apply_options(&fd, s, false)?;
    if !s.local.is_empty() {
        match (s.family == libc::AF_UNIX as u16)
            .then(|| unix_path(&s.local))
            .flatten()
        {
            Some(p) => bind_unix(&fd, s, &p, removed)?,
            None => bind_as_before(&fd, s, sharing.contains(&s.inode))?,
        }
    }
    if s.family == libc::AF_PACKET as u16 {
        super::packet::join_fanout(&fd, s)?;
    }
    if s.listening {
        // SAFETY: plain syscall on our socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), s.backlog.max(1) as i32) })
            .map_err(fail("listen (restored socket)"))?;
    } else if !s.peer.is_empty() {
        removed
            .connect(&fd, s)
            .map_err(fail("connect (restored socket)"))?;
    }
    Ok(fd)
}

/// Options a bind may have needed that the socket cleared afterwards:
/// they are on for the bind and set as saved once all are bound.
const BIND_OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
];

/// Binds a TCP or UDP socket at its address as it was bound: with the
/// options that let it bind next to what its connections left on its port
/// or bind an address not (yet) on this host, which it may have turned off
/// after binding, and with `SO_REUSEPORT` when it has it or when another
/// socket of the restore is bound to its port (`sharing`). Never otherwise:
/// the port would stay open to any later `SO_REUSEPORT` bind of the same
/// user even once the option is cleared again.
fn bind_as_before(fd: &OwnedFd, s: &SocketInfo, sharing: bool) -> Result<(), RestoreError> {
    let inet = [libc::AF_INET as u16, libc::AF_INET6 as u16].contains(&s.family);
    if !inet {
        return bind(fd, &s.local).map_err(fail("bind (restored socket)"));
    }
    for &(level, name) in BIND_OPTIONS {
        let had = option_int(s, level, name).unwrap_or(0) != 0;
        if (level, name) != (libc::SOL_SOCKET, libc::SO_REUSEPORT) || had || sharing {
            setsockopt_int(fd, level, name, 1).map_err(fail("setsockopt before bind"))?;
        }
    }
    // The checkpointed socket may hold the address for a moment more.
    patiently(libc::EADDRINUSE, || bind(fd, &s.local)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            RestoreError::AddressInUse {
                address: SocketInfo::address_text(&s.local),
            }
        } else {
            fail("bind (restored socket)")(e)
        }
    })
}

/// The sockets bound by [`bind_as_before`] whose port another of them is
/// bound to as well (the same protocol; either address family).
fn sharing_a_port(by_inode: &HashMap<u64, &SocketInfo>) -> HashSet<u64> {
    let port = |s: &SocketInfo| {
        (
            s.protocol,
            s.sock_type,
            s.local.get(2..4).map(<[u8]>::to_vec),
        )
    };
    let mut count: HashMap<_, u32> = HashMap::new();
    for s in by_inode.values().filter(|s| rebound(s)) {
        *count.entry(port(s)).or_default() += 1;
    }
    by_inode
        .values()
        .filter(|s| rebound(s) && count[&port(s)] > 1)
        .map(|s| s.inode)
        .collect()
}

/// Whether `s` is bound by [`bind_as_before`], whose options are set as
/// saved once every socket is bound (two sockets sharing a port both
/// have `SO_REUSEPORT` until then).
fn rebound(s: &SocketInfo) -> bool {
    [libc::AF_INET as u16, libc::AF_INET6 as u16].contains(&s.family)
        && !s.local.is_empty()
        && s.tcp.is_none()
}

/// Binds a unix socket at its path (a relative one in its process's
/// working directory): a socket file left there by the dead process is
/// replaced; the new file gets the permissions and owner the old one had.
/// A socket whose file had been removed is bound with any file at its path
/// moved aside for a moment (and its directory made for a moment when that
/// was removed too), and its own file is removed again once everything
/// has connected ([`Names::finish`]).
fn bind_unix(
    fd: &OwnedFd,
    s: &SocketInfo,
    p: &Path,
    removed: &mut Names,
) -> Result<(), RestoreError> {
    use std::os::unix::fs::FileTypeExt as _;
    let dir = removed.dir_of(s, p).map(Path::to_path_buf);
    let dir = dir.as_deref();
    let p = &dir.map(|d| d.join(p)).unwrap_or_else(|| p.to_path_buf());
    let at = std::fs::symlink_metadata(p);
    let bind_here = || in_dir(dir, || bind(fd, &s.local));
    if s.file == Some(SocketFile::Removed) {
        if at.is_ok() && removed.paths.contains(p) {
            // Another socket of the restore was bound at this name and
            // its file is to go anyway.
            std::fs::remove_file(p).map_err(fail(format!("removing {}", p.display())))?;
            return bind_here().map_err(fail("bind (restored socket)"));
        }
        if at.is_ok() {
            let aside = aside_name(p);
            std::fs::rename(p, &aside).map_err(fail(format!(
                "moving {} aside to bind a removed socket's name",
                p.display()
            )))?;
            removed.aside.push((p.to_path_buf(), aside));
        } else if let Some(parent) = p.parent() {
            removed.make_dir(parent)?;
        }
        removed.paths.push(p.to_path_buf());
        return bind_here().map_err(fail("bind (restored socket)"));
    }
    if at.is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(p);
    }
    bind_here().map_err(fail("bind (restored socket)"))?;
    if let Some(SocketFile::Kept { mode, uid, gid }) = s.file {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .map_err(fail(format!("chown of {}", p.display())))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(fail(format!("chmod of {}", p.display())))?;
    }
    Ok(())
}

/// Runs `f` with `dir` as the working directory of the calling thread
/// only (a thread of its own with its own filesystem context), so that a
/// relative unix name means what it meant to the restored process.
fn in_dir<T: Send>(dir: Option<&Path>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(dir) = dir else { return f() };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare of this thread's filesystem context only.
                check(unsafe { libc::unshare(libc::CLONE_FS) })?;
                std::env::set_current_dir(dir)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a socket thread panicked")))
    })
}

/// A name next to `p` that nothing uses.
fn aside_name(p: &std::path::Path) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut n = 0;
    loop {
        let c = p.with_file_name(format!(
            ".{}.cr-ebpf-aside.{}.{n}",
            name.as_deref().unwrap_or("socket"),
            std::process::id()
        ));
        if std::fs::symlink_metadata(&c).is_err() {
            return c;
        }
        n += 1;
    }
}

/// How unix names are made: the working directory of each socket's
/// process (by inode), and the socket files to remove again, directories
/// made for them to remove again and files moved aside to put back, when
/// the sockets are made (or their making failed).
#[derive(Default)]
struct Names {
    cwds: HashMap<u64, PathBuf>,
    paths: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    aside: Vec<(PathBuf, PathBuf)>,
}

impl Names {
    /// The directory a relative name `p` of `s` is in (`None`: absolute).
    fn dir_of(&self, s: &SocketInfo, p: &Path) -> Option<&Path> {
        p.is_relative()
            .then(|| self.cwds.get(&s.inode).map(PathBuf::as_path))
            .flatten()
    }

    /// `s` connected to its peer's name.
    fn connect(&self, fd: &OwnedFd, s: &SocketInfo) -> io::Result<()> {
        let dir = (s.family == libc::AF_UNIX as u16)
            .then(|| unix_path(&s.peer))
            .flatten()
            .and_then(|p| self.dir_of(s, &p).map(Path::to_path_buf));
        in_dir(dir.as_deref(), || connect(fd, &s.peer))
    }

    /// Makes `dir` and its missing parents, to be removed again.
    fn make_dir(&mut self, dir: &Path) -> Result<(), RestoreError> {
        let mut missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && std::fs::symlink_metadata(d).is_err())
            .collect();
        missing.reverse();
        for d in missing {
            std::fs::create_dir(d).map_err(fail(format!(
                "making {} for a moment to bind a removed socket's name",
                d.display()
            )))?;
            self.dirs.push(d.to_path_buf());
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        for p in self.paths.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                first = first.and(Err(e));
            }
        }
        for d in self.dirs.drain(..).rev() {
            if let Err(e) = std::fs::remove_dir(&d) {
                first = first.and(Err(e));
            }
        }
        for (p, aside) in self.aside.drain(..) {
            if let Err(e) = std::fs::rename(&aside, &p) {
                first = first.and(Err(e));
            }
        }
        first
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::{
            fd::{AsRawFd as _, OwnedFd},
            unix::{
                fs::MetadataExt as _,
                net::{UnixDatagram, UnixListener, UnixStream},
            },
        },
    };

    use cr_ebpf_image::{FdInfo, FdKind, FdState, SocketFile, SocketInfo};

    use crate::fd::{socket::diag, testing, Descriptor as _};

    fn socket_of(f: &FdInfo) -> SocketInfo {
        match &f.state {
            FdState::Socket(s) => (**s).clone(),
            other => panic!("{other:?}"),
        }
    }

    /// The sockets `saved` made by a restore, in the same order.
    fn restored(saved: &[FdInfo]) -> Vec<OwnedFd> {
        let (_rec, shared) = testing::restore_keeping(&testing::manifest(saved.to_vec()));
        saved
            .iter()
            .map(|f| {
                shared
                    .get(FdKind::Socket, socket_of(f).inode, 0, f.fd)
                    .unwrap()
                    .try_clone()
                    .unwrap()
            })
            .collect()
    }

    fn inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let s = link.to_string_lossy();
        s.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    fn shutdowns(fds: &[&dyn std::os::fd::AsRawFd]) -> Vec<u8> {
        let all = diag::unix_sockets().unwrap();
        fds.iter()
            .map(|fd| all[&inode(&fd.as_raw_fd())].shutdown)
            .collect()
    }

    fn shut(fd: &impl std::os::fd::AsRawFd, how: i32) {
        // SAFETY: plain syscall on our socket.
        assert_eq!(unsafe { libc::shutdown(fd.as_raw_fd(), how) }, 0);
    }

    /// `send` without SIGPIPE: the errno when it fails.
    fn send_errno(fd: &impl std::os::fd::AsRawFd) -> Option<i32> {
        // SAFETY: sending one byte of ours.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                b"x".as_ptr().cast(),
                1,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        (r < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
    }

    #[test]
    fn shut_down_unix_pairs_come_back_shut_down() {
        let (a, b) = UnixStream::pair().unwrap();
        shut(&a, libc::SHUT_RD);
        let (c, d) = UnixDatagram::pair().unwrap();
        c.send(b"queued").unwrap();
        shut(&c, libc::SHUT_WR);
        let before = shutdowns(&[&a, &b, &c, &d]);
        assert_eq!(before, vec![1, 2, 2, 0]);
        let saved =
            testing::save_own_many(&[a.as_raw_fd(), b.as_raw_fd(), c.as_raw_fd(), d.as_raw_fd()]);
        assert_eq!(
            saved
                .iter()
                .map(|f| socket_of(f).shutdown)
                .collect::<Vec<_>>(),
            before
        );
        let fds = restored(&saved);
        assert_eq!(shutdowns(&[&fds[0], &fds[1], &fds[2], &fds[3]]), before);
        let d = UnixDatagram::from(fds[3].try_clone().unwrap());
        let mut buf = [0u8; 16];
        assert_eq!(d.recv(&mut buf).unwrap(), 6, "the queued datagram is there");
        assert_eq!(send_errno(&fds[2]), Some(libc::EPIPE));
    }

    #[test]
    fn an_accepted_connection_comes_back_through_its_listener_with_its_file() {
        let dir = testing::scratch("accepted");
        let path = dir.join("listener");
        let l = UnixListener::bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        // Shut down before connecting: the accepted end is not shut down.
        // SAFETY: plain syscall; the result is checked.
        let x = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(x >= 0);
        // SAFETY: a new descriptor we own.
        let x = UnixStream::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(x) });
        shut(&x, libc::SHUT_RD);
        let addr = super::super::unix::tests_addr(&path);
        super::super::connect(&OwnedFd::from(x.try_clone().unwrap()), &addr).unwrap();
        let (y, _) = l.accept().unwrap();
        assert_eq!(shutdowns(&[&x, &y]), vec![1, 0]);
        let saved = testing::save_own_many(&[l.as_raw_fd(), x.as_raw_fd(), y.as_raw_fd()]);
        let file = socket_of(&saved[0]).file;
        let me = std::fs::metadata(&path).unwrap();
        assert_eq!(
            file,
            Some(SocketFile::Kept {
                mode: 0o640,
                uid: me.uid(),
                gid: me.gid()
            })
        );
        drop((l, x, y)); // the process is gone; its socket file stays
        let fds = restored(&saved);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(shutdowns(&[&fds[1], &fds[2]]), vec![1, 0]);
        let (x, y) = (
            UnixStream::from(fds[1].try_clone().unwrap()),
            UnixStream::from(fds[2].try_clone().unwrap()),
        );
        assert_eq!(y.local_addr().unwrap().as_pathname(), Some(path.as_path()));
        assert_eq!(x.peer_addr().unwrap().as_pathname(), Some(path.as_path()));
        (&x).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&y).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(send_errno(&y), Some(libc::EPIPE), "x does not receive");
    }

    /// A new unix socket of type `ty`.
    fn unix_socket(ty: i32) -> OwnedFd {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor we own.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    /// An accepted connection shut down for reading with a message queued
    /// (its peer shut for sending by it): the message is sent again before
    /// the shutdown is made again (the peer shut for sending first could
    /// not send it: the restore failed with EPIPE, the process lost), then
    /// the end of the queue.
    #[test]
    fn an_accepted_end_shut_for_reading_keeps_its_queued_message() {
        for ty in [libc::SOCK_SEQPACKET, libc::SOCK_STREAM] {
            let dir = testing::scratch(&format!("accepted-shut-{ty}"));
            let addr = super::super::unix::tests_addr(&dir.join("listener"));
            let l = unix_socket(ty);
            super::super::bind(&l, &addr).unwrap();
            // SAFETY: plain syscall on our socket.
            assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 1) }, 0);
            let x = unix_socket(ty);
            super::super::connect(&x, &addr).unwrap();
            // SAFETY: accepting on our listener; no address wanted.
            let y =
                unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
            assert!(y >= 0);
            // SAFETY: a new descriptor we own.
            let y = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(y) };
            // SAFETY: sending our bytes.
            let sent = unsafe { libc::send(x.as_raw_fd(), b"queued".as_ptr().cast(), 6, 0) };
            assert_eq!(sent, 6);
            shut(&y, libc::SHUT_RD);
            assert_eq!(shutdowns(&[&x, &y]), vec![2, 1]);
            let saved = testing::save_own_many(&[l.as_raw_fd(), x.as_raw_fd(), y.as_raw_fd()]);
            drop((l, x, y));
            let fds = restored(&saved);
            assert_eq!(shutdowns(&[&fds[1], &fds[2]]), vec![2, 1], "type {ty}");
            assert_eq!(recv_now(&fds[2]), Ok(b"queued".to_vec()), "type {ty}");
            assert_eq!(recv_now(&fds[2]), Ok(Vec::new()), "type {ty}: then the end");
            assert_eq!(send_errno(&fds[1]), Some(libc::EPIPE), "type {ty}");
        }
    }

    #[test]
    fn a_socket_whose_file_was_removed_is_reached_by_its_clients_only() {
        let dir = testing::scratch("removed");
        let path = dir.join("server");
        let srv = UnixDatagram::bind(&path).unwrap();
        let cli = UnixDatagram::unbound().unwrap();
        cli.connect(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let saved = testing::save_own_many(&[srv.as_raw_fd(), cli.as_raw_fd()]);
        assert_eq!(socket_of(&saved[0]).file, Some(SocketFile::Removed));
        drop((srv, cli));
        let fds = restored(&saved);
        assert!(!path.exists(), "the file is removed again");
        let (srv, cli) = (
            UnixDatagram::from(fds[0].try_clone().unwrap()),
            UnixDatagram::from(fds[1].try_clone().unwrap()),
        );
        assert_eq!(
            srv.local_addr().unwrap().as_pathname(),
            Some(path.as_path())
        );
        cli.send(b"hello").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(srv.recv(&mut buf).unwrap(), 5);
    }

    #[test]
    fn data_sent_on_a_connection_not_accepted_yet_is_refused() {
        let dir = testing::scratch("unaccepted");
        let path = dir.join("listener");
        let _l = UnixListener::bind(&path).unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let mut owner = testing::SaveOwner::new();
        let fine = super::super::Socket.save(&mut owner.cx(), &testing::seen(c.as_raw_fd()));
        assert!(fine.unwrap().is_ok(), "nothing sent yet");
        (&c).write_all(b"waits in the listener").unwrap();
        let mut owner = testing::SaveOwner::new();
        let err = super::super::Socket
            .save(&mut owner.cx(), &testing::seen(c.as_raw_fd()))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("not accepted yet"), "{err}");
    }

    #[test]
    fn an_unbound_udp_socket_shut_down_comes_back_shut_down() {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // An unbound one: sock_diag does not list it.
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor we own.
        let v = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // ENOTCONN, but shut down.
        // SAFETY: plain syscall on our socket.
        let r = unsafe { libc::shutdown(v.as_raw_fd(), libc::SHUT_RDWR) };
        assert_eq!(r, -1);
        let saved = testing::save_own_many(&[u.as_raw_fd(), v.as_raw_fd()]);
        assert_eq!(
            (socket_of(&saved[0]).shutdown, socket_of(&saved[1]).shutdown),
            (0, 3)
        );
        drop((u, v));
        let fds = restored(&saved);
        assert_eq!(super::super::poll_shutdown(&fds[1]).unwrap(), 3);
    }

    #[test]
    fn a_udp_socket_shut_down_for_writing_cannot_send_again() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        shut(&a, libc::SHUT_WR);
        assert_eq!(send_errno(&a), Some(libc::EPIPE));
        let saved = testing::save_own_many(&[a.as_raw_fd(), b.as_raw_fd()]);
        assert_eq!(socket_of(&saved[0]).shutdown, 2);
        drop((a, b));
        let fds = restored(&saved);
        assert_eq!(send_errno(&fds[0]), Some(libc::EPIPE));
    }

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: the kernel writes two descriptors into the array.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: two new descriptors we own.
        unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
            )
        }
    }

    /// `recv` of up to 64 bytes without waiting: the bytes, or the errno.
    fn recv_now(fd: &impl std::os::fd::AsRawFd) -> Result<Vec<u8>, i32> {
        let mut buf = [0u8; 64];
        // SAFETY: into our buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
        }
        Ok(buf[..n as usize].to_vec())
    }

    #[test]
    fn a_seqpacket_end_whose_peer_closed_keeps_its_messages_then_ends() {
        let (a, b) = seqpacket_pair();
        for m in [&b"one"[..], b"", b"three"] {
            // SAFETY: sending our bytes.
            let n = unsafe { libc::send(b.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) };
            assert_eq!(n, m.len() as isize);
        }
        drop(b);
        let saved = testing::save_own_many(&[a.as_raw_fd()]);
        assert_eq!(socket_of(&saved[0]).queue.len(), 3, "an empty message too");
        drop(a);
        let fds = restored(&saved);
        assert_eq!(recv_now(&fds[0]), Ok(b"one".to_vec()));
        assert_eq!(recv_now(&fds[0]), Ok(Vec::new()));
        assert_eq!(recv_now(&fds[0]), Ok(b"three".to_vec()));
        assert_eq!(recv_now(&fds[0]), Ok(Vec::new()), "then the end");
        assert_eq!(send_errno(&fds[0]), Some(libc::EPIPE));
    }

    #[test]
    fn a_datagram_pair_end_whose_peer_closed_keeps_its_messages() {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.send(b"first").unwrap();
        b.send(b"second").unwrap();
        drop(b);
        let saved = testing::save_own_many(&[a.as_raw_fd()]);
        assert_eq!(socket_of(&saved[0]).queue.len(), 2);
        drop(a);
        let fds = restored(&saved);
        assert_eq!(recv_now(&fds[0]), Ok(b"first".to_vec()));
        assert_eq!(recv_now(&fds[0]), Ok(b"second".to_vec()));
        assert_eq!(recv_now(&fds[0]), Err(libc::EAGAIN));
    }

    #[test]
    fn datagrams_queued_on_a_named_socket_come_again_from_their_senders() {
        let dir = testing::scratch("senders");
        let (srv_path, named_path) = (dir.join("srv"), dir.join("named"));
        let srv = UnixDatagram::bind(&srv_path).unwrap();
        let anon = UnixDatagram::unbound().unwrap();
        let named = UnixDatagram::bind(&named_path).unwrap();
        anon.send_to(b"one", &srv_path).unwrap();
        named.send_to(b"two", &srv_path).unwrap();
        anon.send_to(b"three", &srv_path).unwrap();
        drop(anon);
        let saved = testing::save_own_many(&[srv.as_raw_fd(), named.as_raw_fd()]);
        assert_eq!(socket_of(&saved[0]).senders.len(), 3);
        drop((srv, named));
        let fds = restored(&saved);
        let srv = UnixDatagram::from(fds[0].try_clone().unwrap());
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..3 {
            let (n, from) = srv.recv_from(&mut buf).unwrap();
            got.push((
                buf[..n].to_vec(),
                from.as_pathname().map(|p| p.to_path_buf()),
            ));
        }
        assert_eq!(
            got,
            [
                (b"one".to_vec(), None),
                (b"two".to_vec(), Some(named_path.clone())),
                (b"three".to_vec(), None),
            ]
        );
    }

    /// `tcpi_state` of a TCP socket.
    fn tcp_state(fd: &impl std::os::fd::AsRawFd) -> u8 {
        let mut info = [0u8; 8];
        let mut len = 8u32;
        // SAFETY: the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        info[0]
    }

    #[test]
    fn a_half_closed_tcp_connection_comes_back_half_closed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI runs as root"
            );
            eprintln!("skipped: TCP_REPAIR and raw sockets need root");
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (&b).write_all(b"unread").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            (tcp_state(&a), tcp_state(&b)),
            (5, 8),
            "FIN_WAIT2, CLOSE_WAIT"
        );
        let saved = testing::save_own_many(&[a.as_raw_fd(), b.as_raw_fd()]);
        // The originals go quietly (in repair mode nothing is sent).
        for f in [&a, &b] {
            super::super::tcp::repair_mode(&OwnedFd::from(f.try_clone().unwrap()), true).unwrap();
        }
        drop((a, b, l));
        let fds = restored(&saved);
        let (mut a, mut b) = (
            std::net::TcpStream::from(fds[0].try_clone().unwrap()),
            std::net::TcpStream::from(fds[1].try_clone().unwrap()),
        );
        assert_eq!((tcp_state(&a), tcp_state(&b)), (5, 8), "half closed again");
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap(), 0, "b had read the end");
        let n = a.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"unread");
        b.write_all(b"more").unwrap();
        let n = a.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"more");
        b.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(a.read(&mut buf).unwrap(), 0, "then a sees the end");
    }

    /// Root, or skipped outside CI (TCP_REPAIR needs CAP_NET_ADMIN).
    fn root(what: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
        eprintln!("skipped {what}: TCP_REPAIR needs root");
        false
    }

    /// A connection whose checkpointed original is still closing when it
    /// is rebuilt (its last descriptor held for a moment elsewhere, as by
    /// a child forked before it exec'd) is rebuilt once the original is
    /// gone, not refused.
    #[test]
    fn a_connection_rebuilt_while_its_original_closes_waits_for_it() {
        if !root("a_connection_rebuilt_while_its_original_closes_waits_for_it") {
            return;
        }
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let saved = testing::save_own_many(&[a.as_raw_fd()]);
        super::super::tcp::repair_mode(&OwnedFd::from(a.try_clone().unwrap()), true).unwrap();
        let held = OwnedFd::from(a.try_clone().unwrap());
        drop(a);
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        let fds = restored(&saved);
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        closer.join().unwrap();
        let mut a = std::net::TcpStream::from(fds[0].try_clone().unwrap());
        a.write_all(b"again").unwrap();
        let mut buf = [0u8; 8];
        let n = (&b).read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"again");
    }

    /// A listener whose checkpointed original is still closing when it is
    /// bound again gets its port once the original is gone; one whose
    /// port stays taken is refused, naming the address.
    #[test]
    fn a_listener_waits_for_its_original_and_names_a_port_that_stays_taken() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let saved = testing::save_own_many(&[l.as_raw_fd()]);
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(l);
        });
        let fds = restored(&saved);
        closer.join().unwrap();
        let port = socket_of(&saved[0]).local;
        let back = std::net::TcpListener::from(fds[0].try_clone().unwrap());
        std::net::TcpStream::connect(back.local_addr().unwrap()).unwrap();
        assert_eq!(
            SocketInfo::address_text(&port),
            back.local_addr().unwrap().to_string()
        );
        // Its port takes no other socket, SO_REUSEPORT or not, as before.
        for reuseport in [0, 1] {
            // SAFETY: plain syscall; checked.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert!(fd >= 0);
            // SAFETY: a new descriptor we own.
            let other = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            super::setsockopt_int(&other, libc::SOL_SOCKET, libc::SO_REUSEPORT, reuseport).unwrap();
            let err = super::bind(&other, &port).expect_err("bound next to the listener");
            assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{reuseport}");
        }
        let Err(err) =
            crate::fd::prepare(&[&testing::manifest(saved)], &crate::fd::Prepare::default())
        else {
            panic!("bound next to a listener on its port");
        };
        let want = back.local_addr().unwrap().to_string();
        assert!(
            matches!(&err, crate::RestoreError::AddressInUse { address } if *address == want),
            "{err}"
        );
    }

    /// A UDP socket bound to an address not on this host (with
    /// `IP_FREEBIND`, cleared after the bind, as ZDTM's sk-freebind-false)
    /// is bound there again and has the option cleared again.
    #[test]
    fn a_socket_bound_to_a_foreign_address_is_bound_there_again() {
        // SAFETY: plain syscall; checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        super::setsockopt_int(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1).unwrap();
        let mut addr = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        addr.extend(0u16.to_be_bytes());
        addr.extend([192, 0, 2, 77, 0, 0, 0, 0, 0, 0, 0, 0]);
        super::bind(&fd, &addr).unwrap();
        super::setsockopt_int(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 0).unwrap();
        let saved = testing::save_own_many(&[fd.as_raw_fd()]);
        let was = std::net::UdpSocket::from(fd).local_addr().unwrap();
        let back = std::net::UdpSocket::from(restored(&saved).remove(0));
        assert_eq!(back.local_addr().unwrap(), was);
        let freebind = super::super::getsockopt_int(
            &OwnedFd::from(back.try_clone().unwrap()),
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
        );
        assert_eq!(freebind.unwrap(), 0);
    }

    /// Two listeners sharing a port through `SO_REUSEPORT`, one of which
    /// cleared it after `listen`, both listen on that port again, with the
    /// option as it was.
    #[test]
    fn listeners_sharing_a_port_share_it_again() {
        let listener = |port: u16, reuseport: bool| {
            // SAFETY: plain syscall; checked.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert!(fd >= 0);
            // SAFETY: a new descriptor we own.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            super::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).unwrap();
            let mut addr = (libc::AF_INET as u16).to_ne_bytes().to_vec();
            addr.extend(port.to_be_bytes());
            addr.extend([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
            super::bind(&fd, &addr).unwrap();
            // SAFETY: plain syscall on our socket.
            assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 4) }, 0);
            let on = i32::from(reuseport);
            super::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, on).unwrap();
            std::net::TcpListener::from(fd)
        };
        let a = listener(0, true);
        let port = a.local_addr().unwrap().port();
        let b = listener(port, false);
        let saved = testing::save_own_many(&[a.as_raw_fd(), b.as_raw_fd()]);
        drop((a, b));
        let got: Vec<(u16, i32)> = restored(&saved)
            .into_iter()
            .map(|fd| {
                let reuseport =
                    super::super::getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT);
                let l = std::net::TcpListener::from(fd);
                (l.local_addr().unwrap().port(), reuseport.unwrap())
            })
            .collect();
        assert_eq!(got, [(port, 1), (port, 0)]);
    }

    /// A connection still being made (`SYN-SENT`: its listener's queue is
    /// full, so its SYNs are dropped) comes back being made, from the
    /// same sequence number, and is made once the listener takes it.
    #[test]
    fn a_connection_being_made_is_made_after_restore() {
        if !root("a_connection_being_made_is_made_after_restore") {
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: plain syscall on our socket: one connection waits at most.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let first = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let b = std::net::TcpStream::connect_timeout(
            &l.local_addr().unwrap(),
            std::time::Duration::from_millis(1),
        );
        assert!(b.is_err(), "the listener's queue was full");
        // SAFETY: plain syscall; checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor we own.
        let c = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: plain fcntl on our socket.
        unsafe { libc::fcntl(c.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let addr = testing::save_own(l.as_raw_fd());
        let err = super::connect(&c, &socket_of(&addr).local).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINPROGRESS));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            tcp_state(&std::net::TcpStream::from(c.try_clone().unwrap())),
            2
        );
        let saved = testing::save_own_many(&[c.as_raw_fd()]);
        let t = socket_of(&saved[0]).tcp.expect("saved as a connection");
        assert_eq!(t.state, 2);
        super::super::tcp::repair_mode(&c, true).unwrap();
        drop(c);
        // Room in the listener's queue again.
        drop(first);
        let (_first, _) = l.accept().unwrap();
        let fds = restored(&saved);
        let mut c = std::net::TcpStream::from(fds[0].try_clone().unwrap());
        let (mut srv, _) = l.accept().unwrap();
        assert_eq!(tcp_state(&c), 1, "made");
        // Its SYN had the sequence number the first one had.
        let now = super::super::tcp::tcp_repair(&fds[0], 0).unwrap();
        assert_eq!(
            now.send_seq,
            t.send_seq.wrapping_add(1),
            "first byte after the SYN"
        );
        c.write_all(b"made").unwrap();
        let mut buf = [0u8; 8];
        let n = srv.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"made");
    }

    /// A connection whose original stays is refused after a while, with
    /// both addresses named.
    #[test]
    fn a_connection_whose_original_stays_is_refused_naming_it() {
        if !root("a_connection_whose_original_stays_is_refused_naming_it") {
            return;
        }
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let saved = testing::save_own_many(&[a.as_raw_fd()]);
        let Err(err) =
            crate::fd::prepare(&[&testing::manifest(saved)], &crate::fd::Prepare::default())
        else {
            panic!("rebuilt next to its original");
        };
        let text = err.to_string();
        let want = format!("{} -> {}", a.local_addr().unwrap(), l.local_addr().unwrap());
        assert!(
            matches!(err, crate::RestoreError::ConnectionExists { .. }) && text.contains(&want),
            "{text}"
        );
        // The original is untouched.
        (&a).write_all(b"still").unwrap();
    }

    #[test]
    fn a_datagram_socket_connected_to_itself_still_is() {
        let dir = testing::scratch("self");
        let path = dir.join("me");
        let me = UnixDatagram::bind(&path).unwrap();
        me.connect(&path).unwrap();
        let saved = testing::save_own_many(&[me.as_raw_fd()]);
        drop(me);
        let fds = restored(&saved);
        let me = UnixDatagram::from(fds[0].try_clone().unwrap());
        me.send(b"echo").unwrap();
        assert_eq!(recv_now(&me), Ok(b"echo".to_vec()));
    }

    #[test]
    fn a_port_shared_while_binding_is_shared_again_and_the_option_cleared() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Two sockets on one port: both had SO_REUSEPORT when binding...
        let port_of = |s: &OwnedFd| {
            let saved = testing::save_own_many(&[s.as_raw_fd()]);
            socket_of(&saved[0]).local
        };
        let make = || {
            // SAFETY: a new socket of ours.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            // SAFETY: we own it.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            super::super::setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).unwrap();
            fd
        };
        let (x, y) = (make(), make());
        let local = port_of(&OwnedFd::from(a.try_clone().unwrap()));
        drop(a);
        for s in [&x, &y] {
            super::super::bind(s, &local).unwrap();
        }
        // ...and the first turned it off afterwards.
        super::super::setsockopt_int(&x, libc::SOL_SOCKET, libc::SO_REUSEPORT, 0).unwrap();
        let saved = testing::save_own_many(&[x.as_raw_fd(), y.as_raw_fd()]);
        drop((x, y));
        let fds = restored(&saved);
        let reuse = |fd: &OwnedFd| {
            super::super::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT).unwrap()
        };
        assert_eq!((reuse(&fds[0]), reuse(&fds[1])), (0, 1));
        assert_eq!(port_of(&fds[0]), local);
        assert_eq!(port_of(&fds[1]), local);
    }
}
