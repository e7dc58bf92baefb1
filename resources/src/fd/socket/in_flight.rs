//! Files in flight: descriptors sent over a unix socket (`SCM_RIGHTS`)
//! and not received yet. At checkpoint time each is received here with a
//! peek of the queue (left in place) and saved like any descriptor of the
//! process that holds the socket, under a number of its own above the
//! process's (the socket's state names those numbers, message by
//! message). At restore time those descriptors are made like the others;
//! then each message is sent again on the socket's peer with its files,
//! in order, and the numbers are closed, before the process runs.
//!
//! Refused: a file kind whose save reads the holding process's own
//! `/proc` (those are regular files, pipes, sockets, eventfds and epoll
//! sets, whose registrations name the process's descriptors, only), a
//! socket in flight that carries files in flight itself, a socket whose
//! queue is held by several processes or is not refilled by one peer.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

use cr_ebpf_image::{FdInfo, FdKind, FdState, Manifest};

use super::super::{see, RestoreCx, SaveCx, Seen, KINDS};
use super::{check, fail};
use crate::{error::proc_err, RestoreError, SaveError};

/// The part of [`super::super::Shared`] under a socket's inode where the
/// other end of a restored socket pair whose peer had closed waits, to
/// send its files in flight (then it closes).
pub(super) const ORPHAN_SENDER: u8 = 1;

/// A file in flight, received here: what `/proc` shows of it (under the
/// number it is saved as), and the number of the socket it waits on.
pub struct Carried {
    seen: Seen,
    socket: i32,
}

/// The kinds a file in flight may be.
const KINDS_IN_FLIGHT: &[FdKind] = &[
    FdKind::File,
    FdKind::Pipe,
    FdKind::Socket,
    FdKind::EventFd,
    FdKind::Epoll,
];

/// Receives the files in flight on the queues of the sockets of `seen` (a
/// process's descriptors), numbers them after the process's own, and
/// records those numbers for the sockets' saves. A pipe end is counted as
/// held.
pub fn gather(cx: &mut SaveCx<'_>, seen: &[Seen]) -> Result<Vec<Carried>, SaveError> {
    let mut next = seen.iter().map(|s| s.fd).max().unwrap_or(2).max(2) + 1;
    let mut done = HashSet::new();
    let mut out = Vec::new();
    for s in seen.iter().filter(|s| s.file_type() == libc::S_IFSOCK) {
        let inode = s.info(FdKind::Socket).inode;
        if !done.insert(inode) {
            continue;
        }
        let dup = cx.dup(s.fd)?;
        let messages = cx
            .sockets
            .peek_in_flight(&dup, inode)
            .map_err(|(what, e)| {
                proc_err(
                    cx.pid,
                    format!("the socket on descriptor {} ({what})", s.fd),
                )(e)
            })?;
        if messages.is_empty() {
            continue;
        }
        if !cx.scope.in_flight_taken.insert(inode) {
            return Err(cx.refuse(
                s.fd,
                "descriptors in flight (SCM_RIGHTS) queued on a unix socket several processes \
                 hold",
            ));
        }
        let me = std::process::id() as i32;
        let mut numbers = Vec::with_capacity(messages.len());
        for fds in messages {
            let mut these = Vec::with_capacity(fds.len());
            for own in fds {
                let mut file = see(me, own.as_raw_fd())?;
                file.fd = next;
                if file.link.starts_with("pipe:") {
                    cx.scope.add_pipe_end(file.link.clone(), file.flags);
                }
                cx.moved.insert(next, own);
                these.push(next);
                out.push(Carried {
                    seen: file,
                    socket: s.fd,
                });
                next += 1;
            }
            numbers.push(these);
        }
        cx.sockets.carry(inode, numbers);
    }
    Ok(out)
}

/// Saves the file in flight `c` as a descriptor of the process.
pub fn save(cx: &mut SaveCx<'_>, c: &Carried) -> Result<FdInfo, SaveError> {
    let saved = KINDS.iter().find_map(|k| k.save(cx, &c.seen));
    let info = match saved {
        Some(r) => r.map_err(|e| match e {
            SaveError::NotSupportedFd { what, .. } => cx.refuse(
                c.socket,
                format!("{what} (a file in flight on this unix socket)"),
            ),
            other => other,
        })?,
        None => return Err(cx.refuse(c.socket, format!("{} in flight (SCM_RIGHTS)", c.seen.link))),
    };
    if !KINDS_IN_FLIGHT.contains(&info.kind) || info.flags as i32 & libc::O_ASYNC != 0 {
        return Err(cx.refuse(
            c.socket,
            format!(
                "a {:?} descriptor ({}) in flight (SCM_RIGHTS)",
                info.kind, c.seen.link
            ),
        ));
    }
    Ok(info)
}

/// Sends the messages carrying files in flight of the sockets of `m` again
/// (the peer's end, or the orphan's sender, sends them), each with its
/// files taken from the process's numbers, then closes those numbers; a
/// socket whose receiving side was shut down is shut down now.
pub fn send(cx: &RestoreCx<'_>, m: &Manifest) -> Result<(), RestoreError> {
    let mut done = HashSet::new();
    let mut numbers = Vec::new();
    for f in &m.fds {
        let FdState::Socket(s) = &f.state else {
            continue;
        };
        if s.in_flight.is_empty() || !done.insert(s.inode) {
            continue;
        }
        let sender = match cx.shared.take_once(FdKind::Socket, s.inode, ORPHAN_SENDER) {
            Some(b) => b,
            None => cx
                .shared
                .get(FdKind::Socket, s.peer_inode, 0, f.fd)?
                .try_clone()
                .map_err(fail("dup (a unix socket's peer)"))?,
        };
        for (data, fds) in s.queue.iter().zip(&s.in_flight) {
            let files = fds
                .iter()
                .map(|n| cx.sys.take(i64::from(*n)))
                .collect::<Result<Vec<_>, _>>()?;
            send_with(
                &sender,
                data,
                &files,
                s.sock_type as i32 == libc::SOCK_STREAM,
            )
            .map_err(fail("sending a message with descriptors in flight again"))?;
        }
        drop(sender);
        if s.shutdown != 0 {
            let ours = cx.shared.get(FdKind::Socket, s.inode, 0, f.fd)?;
            super::build::shutdown(ours, s.shutdown).map_err(fail("shutdown (restored socket)"))?;
        }
        numbers.extend(s.in_flight.iter().flatten().copied());
    }
    numbers.sort_unstable();
    numbers.dedup();
    for n in numbers {
        cx.sys.close(i64::from(n))?;
    }
    Ok(())
}

/// `sendmsg` of `data` with the descriptors `files` (`SCM_RIGHTS`; none:
/// a plain message); a stream's rest goes after a short write, without
/// them.
fn send_with(sock: &OwnedFd, data: &[u8], files: &[OwnedFd], stream: bool) -> io::Result<()> {
    let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(&raw[..]) as u32;
    let space = if raw.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is arithmetic.
        unsafe { libc::CMSG_SPACE(bytes) as usize }
    };
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is valid; pointers below are ours.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and the data.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                bytes as usize,
            );
        }
    }
    // SAFETY: sendmsg of our buffers.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    check(n.min(0) as i32)?;
    let n = n as usize;
    if n < data.len() {
        if !stream {
            return Err(io::Error::other("a message sent in part"));
        }
        super::send_all(sock, &data[n..], libc::MSG_DONTWAIT)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd as _, unix::net::UnixDatagram};

    use super::*;
    use crate::fd::{testing, TreeScope};

    #[test]
    fn files_in_flight_are_saved_as_descriptors_and_sent_again_in_order() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let (r, w) = testing::pipe();
        // SAFETY: writing our bytes into our pipe.
        let n = unsafe { libc::write(w.as_raw_fd(), b"piped".as_ptr().cast(), 5) };
        assert_eq!(n, 5);
        let a = OwnedFd::from(a);
        send_with(&a, b"one", &[r], false).unwrap();
        send_with(&a, b"two", &[], false).unwrap();
        let mut owner = testing::SaveOwner::new();
        owner.scope = TreeScope::new(&[std::process::id() as i32]);
        let mut cx = owner.cx();
        let seen = [a.as_raw_fd(), b.as_raw_fd(), w.as_raw_fd()].map(testing::seen);
        let carried = gather(&mut cx, &seen).unwrap();
        assert_eq!(carried.len(), 1, "the read end, held only in flight");
        let mut saved: Vec<FdInfo> = seen
            .iter()
            .map(|s| {
                KINDS
                    .iter()
                    .find_map(|k| k.save(&mut cx, s))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        saved.extend(carried.iter().map(|c| save(&mut cx, c).unwrap()));
        let number = saved[3].fd;
        assert!(number > w.as_raw_fd() && saved[3].kind == FdKind::Pipe);
        assert_eq!(
            [&saved[2].data[..], &saved[3].data[..]].concat(),
            b"piped",
            "the pipe's contents, once"
        );
        let FdState::Socket(sb) = saved[1].state.clone() else {
            panic!("{:?}", saved[1])
        };
        assert_eq!(sb.in_flight, vec![vec![number], Vec::new()]);
        drop(cx);
        drop((a, b, w, owner));

        let (rec, shared) = testing::restore_keeping(&testing::manifest(saved));
        assert_eq!(
            rec.calls("close")
                .iter()
                .filter(|c| c[0] == number as u64)
                .count(),
            1,
            "the descriptor in flight is closed once sent"
        );
        let nb = shared.get(FdKind::Socket, sb.inode, 0, 0).unwrap();
        let got = super::super::unix::peek_messages(nb, libc::SOCK_DGRAM, false).unwrap();
        let shape: Vec<(Vec<u8>, usize)> =
            got.iter().map(|m| (m.data.clone(), m.fds.len())).collect();
        assert_eq!(shape, vec![(b"one".to_vec(), 1), (b"two".to_vec(), 0)]);
        let mut buf = [0u8; 16];
        // SAFETY: reading into our buffer from the received pipe end.
        let n = unsafe { libc::read(got[0].fds[0].as_raw_fd(), buf.as_mut_ptr().cast(), 16) };
        assert_eq!(&buf[..n.max(0) as usize], b"piped");
    }
}
