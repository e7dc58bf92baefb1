//! Pipes whose both ends the process (or its tree) holds: recreated with
//! their buffer size and the bytes buffered in them, which are read at
//! checkpoint time without being consumed (`tee` into a scratch pipe).
//!
//! A pipe whose other end no process holds any more (closed) is restored
//! with that end closed again: a reader reads the buffered bytes, then end
//! of file; a writer gets `EPIPE`. One whose other end a process outside
//! the checkpoint holds is refused (stdio excepted: the restorer passes its
//! own, [`super::inherited`]).

use std::{
    fs,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
};

use cr_ebpf_image::{FdInfo, FdKind};

use super::{Descriptor, Prepare, RestoreCx, SaveCx, Seen, Shared};
use crate::{error::proc_err, RestoreError, SaveError};

/// One end of a pipe held inside what is checkpointed.
pub struct Pipe;

/// The bytes buffered in pipe `read_end` (a descriptor of ours on it), left
/// in place: `tee` duplicates them into a scratch pipe, which we drain.
pub(super) fn peek_pipe(read_end: &OwnedFd, size: usize) -> io::Result<Vec<u8>> {
    let (r, w) = pipe2(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
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
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    drop(w);
    let mut data = Vec::with_capacity(n as usize);
    fs::File::from(r).read_to_end(&mut data)?;
    Ok(data)
}

fn pipe2(flags: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new pipe of `size` bytes holding `data`: (read end, write end).
fn refilled(size: u32, data: &[u8]) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let fail = |call: &str| {
        let call = call.to_string();
        move |err| RestoreError::Syscall { call, err }
    };
    let (r, w) = pipe2(libc::O_CLOEXEC).map_err(fail("pipe2"))?;
    if size > 0 {
        // SAFETY: fcntl on our pipe.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    }
    write_all(&w, data)?;
    Ok((r, w))
}

/// Writes `data` into the pipe or FIFO `w`, which has room for it.
pub(super) fn write_all(w: &OwnedFd, data: &[u8]) -> Result<(), RestoreError> {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: writing our own buffer into our pipe.
        let n =
            unsafe { libc::write(w.as_raw_fd(), data[off..].as_ptr().cast(), data.len() - off) };
        if n <= 0 {
            return Err(RestoreError::Syscall {
                call: "refilling a pipe".into(),
                err: io::Error::last_os_error(),
            });
        }
        off += n as usize;
    }
    Ok(())
}

/// Whether `f` is a write end.
fn write_end(f: &FdInfo) -> bool {
    f.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY
}

/// The part of [`Shared`] under a description id: an end opened again.
const AGAIN: u8 = 2;

/// Another open file description of the pipe end `ours` (as opening
/// `/proc/PID/fd/N` gives).
fn reopened(ours: &OwnedFd, write: bool) -> Result<OwnedFd, RestoreError> {
    let path = format!("/proc/self/fd/{}", ours.as_raw_fd());
    fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|err| RestoreError::Syscall {
            call: "opening a pipe end again".into(),
            err,
        })
}

impl Descriptor for Pipe {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Pipe]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.file_type() != libc::S_IFIFO || !seen.link.starts_with("pipe:") {
            return None;
        }
        let (r, w) = cx
            .scope
            .pipe_ends
            .get(&seen.link)
            .copied()
            .unwrap_or_default();
        if !(r && w) {
            // Stdio to the outside is inherited; a pipe whose other end is
            // closed is restored so; anything else is refused.
            if seen.fd <= 2 {
                return None;
            }
            if let Some(holder) = cx.scope.outside(cx.pid).pipe(&seen.link) {
                return Some(Err(cx.refuse(
                    seen.fd,
                    format!(
                        "a pipe ({}) whose other end is outside the process ({holder}); only \
                         standard input, output and error may be (the restorer's are given \
                         instead)",
                        seen.link
                    ),
                )));
            }
        }
        // Bytes only a reader can see: none when the read end is closed.
        let keep_data = r;
        Some((|| {
            let (pid, fd) = (cx.pid, seen.fd);
            let mut info = seen.info(FdKind::Pipe);
            let dup = cx.dup(fd)?;
            // SAFETY: fcntl query on our duplicate.
            let size = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETPIPE_SZ) };
            info.pipe_size = size.max(0) as u32;
            if keep_data && cx.scope.data_taken.insert(seen.link.clone()) {
                // A read end of our own on the same pipe, for tee.
                let path = cx.proc_fd(fd);
                let reader = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                    .map_err(proc_err(pid, path))?;
                info.data = peek_pipe(&OwnedFd::from(reader), info.pipe_size as usize)
                    .map_err(proc_err(pid, format!("contents of the pipe on fd {fd}")))?;
            }
            Ok(info)
        })())
    }

    fn prepare(
        &self,
        fds: &[&FdInfo],
        _opts: &Prepare,
        shared: &mut Shared,
    ) -> Result<(), RestoreError> {
        for f in fds {
            if shared.contains(FdKind::Pipe, f.inode)
                || shared.contains_part(FdKind::Pipe, f.inode, 1)
            {
                continue;
            }
            let same = fds.iter().filter(|g| g.inode == f.inode);
            let size = same.clone().map(|g| g.pipe_size).max().unwrap_or(0);
            let data = same
                .map(|g| &g.data[..])
                .find(|d| !d.is_empty())
                .unwrap_or(&[]);
            let (r, w) = refilled(size, data)?;
            // An end no descriptor holds is closed now, before any process
            // runs.
            let held = |end: bool| {
                fds.iter()
                    .any(|g| g.inode == f.inode && write_end(g) == end)
            };
            // An end opened a second time (through /proc/PID/fd/N) is
            // another open file description of it, with flags of its own:
            // each description after an end's first is opened again so.
            for (end, ours) in [(false, &r), (true, &w)] {
                let mut descs: Vec<u64> = fds
                    .iter()
                    .filter(|g| g.inode == f.inode && write_end(g) == end)
                    .map(|g| g.desc)
                    .collect();
                descs.sort_unstable();
                descs.dedup();
                for &d in descs.iter().skip(1).filter(|&&d| d != 0) {
                    shared.insert(FdKind::Pipe, d, AGAIN, reopened(ours, end)?);
                }
            }
            if held(false) {
                shared.insert(FdKind::Pipe, f.inode, 0, r);
            }
            if held(true) {
                shared.insert(FdKind::Pipe, f.inode, 1, w);
            }
        }
        Ok(())
    }

    fn open(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        if f.desc != 0 && cx.shared.contains_part(FdKind::Pipe, f.desc, AGAIN) {
            let again = cx.shared.get(FdKind::Pipe, f.desc, AGAIN, f.fd)?;
            return cx.adopt(again).map(Some);
        }
        let end = u8::from(write_end(f));
        let ours = cx.shared.get(FdKind::Pipe, f.inode, end, f.fd)?;
        cx.adopt(ours).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::fd::AsRawFd as _};

    use super::*;
    use crate::{fd::testing, sys::fake::Event};

    #[test]
    fn a_pipe_with_buffered_bytes_round_trips() {
        let (r, w) = pipe2(libc::O_CLOEXEC).unwrap();
        fs::File::from(w.try_clone().unwrap())
            .write_all(b"unread bytes")
            .unwrap();
        let saved = testing::save_own_many(&[r.as_raw_fd(), w.as_raw_fd()]);
        assert!(saved.iter().all(|f| f.kind == FdKind::Pipe));
        assert_eq!(saved[0].data, b"unread bytes");
        assert!(saved[1].data.is_empty(), "the contents are stored once");
        // The bytes are still there for the process.
        let mut buf = [0u8; 64];
        // SAFETY: reading our own pipe into our buffer.
        let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(&buf[..n as usize], b"unread bytes");

        let m = testing::manifest(saved.clone());
        let (rec, shared) = testing::restore_keeping(&m);
        let adopted: Vec<i32> = rec
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Adopt { ours, .. } => Some(*ours),
                _ => None,
            })
            .collect();
        let read_end = shared.get(FdKind::Pipe, saved[0].inode, 0, 0).unwrap();
        let write_end = shared.get(FdKind::Pipe, saved[0].inode, 1, 0).unwrap();
        assert_eq!(adopted, [read_end.as_raw_fd(), write_end.as_raw_fd()]);
        // SAFETY: as above, on the rebuilt pipe.
        let n = unsafe { libc::read(read_end.as_raw_fd(), buf.as_mut_ptr().cast(), 64) };
        assert_eq!(&buf[..n as usize], b"unread bytes");
        let targets: Vec<i32> = rec.calls("dup3").iter().map(|a| a[1] as i32).collect();
        assert_eq!(targets, [saved[0].fd, saved[1].fd]);
    }

    #[test]
    fn an_end_opened_twice_comes_back_as_two_open_files_of_one_pipe() {
        let (r, w) = pipe2(libc::O_CLOEXEC).unwrap();
        let again = fs::File::open(format!("/proc/self/fd/{}", r.as_raw_fd())).unwrap();
        let dup = r.try_clone().unwrap();
        let me = std::process::id() as i32;
        let raw = [
            r.as_raw_fd(),
            w.as_raw_fd(),
            again.as_raw_fd(),
            dup.as_raw_fd(),
        ];
        let mut saved = testing::save_own_many(&raw);
        crate::fd::description::share(&mut [(me, &mut saved[..])], &Default::default());
        assert_eq!(saved[0].desc, saved[3].desc, "a dup is the same open file");
        assert_ne!(saved[0].desc, saved[2].desc, "opened again: another");
        let mut shared = Shared::default();
        let all: Vec<&FdInfo> = saved.iter().collect();
        Pipe.prepare(&all, &Prepare::default(), &mut shared)
            .unwrap();
        let main = shared.get(FdKind::Pipe, saved[0].inode, 0, 0).unwrap();
        let other = [saved[0].desc, saved[2].desc]
            .into_iter()
            .find(|d| shared.contains_part(FdKind::Pipe, *d, AGAIN))
            .expect("one read end opened again");
        let other = shared.get(FdKind::Pipe, other, AGAIN, 0).unwrap();
        // SAFETY: kcmp with integer arguments only (KCMP_FILE = 0).
        let same = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                me,
                me,
                0,
                main.as_raw_fd(),
                other.as_raw_fd(),
            )
        };
        assert_ne!(same, 0, "two open files");
        let ino = |fd: &OwnedFd| fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(ino(main).ino(), ino(other).ino(), "of one pipe");
    }

    #[test]
    fn a_pipe_to_the_outside_is_refused_above_stdio() {
        let (r, w) = pipe2(libc::O_CLOEXEC).unwrap();
        let seen = testing::seen(r.as_raw_fd());
        // Another process holds the write end.
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .stdout(std::process::Stdio::from(w))
            .spawn()
            .unwrap();
        let mut owner = testing::SaveOwner::new();
        owner
            .scope
            .add_pipe_end(seen.link.clone(), libc::O_RDONLY as u32);
        let mut cx = owner.cx();
        let got = Pipe.save(&mut cx, &seen).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let err = got.unwrap_err();
        assert!(err.to_string().contains("other end is outside"), "{err}");
        assert!(
            err.to_string().contains(&child.id().to_string()),
            "names the holder: {err}"
        );
        let stdio = Seen { fd: 1, ..seen };
        assert!(Pipe.save(&mut cx, &stdio).is_none(), "stdio is inherited");
    }

    #[test]
    fn a_pipe_whose_writer_closed_comes_back_with_its_bytes_then_end_of_file() {
        let (r, w) = pipe2(libc::O_CLOEXEC).unwrap();
        fs::File::from(w).write_all(b"last words").unwrap();
        let saved = testing::save_own_many(&[r.as_raw_fd()]);
        assert_eq!(saved[0].kind, FdKind::Pipe);
        assert_eq!(saved[0].data, b"last words");
        let m = testing::manifest(saved.clone());
        let (_rec, shared) = testing::restore_keeping(&m);
        assert!(
            shared.get(FdKind::Pipe, saved[0].inode, 1, 0).is_err(),
            "no write end is kept"
        );
        let read_end = shared.get(FdKind::Pipe, saved[0].inode, 0, 0).unwrap();
        let mut got = Vec::new();
        fs::File::from(read_end.try_clone().unwrap())
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b"last words", "then end of file");
    }

    #[test]
    fn a_pipe_whose_reader_closed_comes_back_broken() {
        let (r, w) = pipe2(libc::O_CLOEXEC).unwrap();
        drop(r);
        let saved = testing::save_own_many(&[w.as_raw_fd()]);
        assert!(saved[0].data.is_empty());
        let m = testing::manifest(saved.clone());
        let (_rec, shared) = testing::restore_keeping(&m);
        let write_end = shared.get(FdKind::Pipe, saved[0].inode, 1, 0).unwrap();
        // SAFETY: ignoring SIGPIPE in this test process: the write fails instead.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // SAFETY: writing our buffer into our pipe end.
        let n = unsafe { libc::write(write_end.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(n, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPIPE));
    }
}
