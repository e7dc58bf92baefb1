//! Section FD (one per open descriptor, by increasing number).

mod socket;
mod state;

pub use socket::{SockOpt, SocketInfo, TcpRepair, SOCKET_QUEUE_CAP};
pub use state::{EpollItem, FdState, InotifyWatch};

use super::PATH_CAP;
use crate::codec::{Dec, DecErr, Enc};

/// Largest pipe contents stored.
const PIPE_DATA_CAP: usize = 16 << 20;

/// What an open file descriptor refers to. On disk as a `u16`; `0` is invalid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FdKind {
    /// Not a kind; decoding it is an error.
    #[default]
    Invalid = 0,
    /// A regular file or directory, reopened by path and checked by identity.
    File = 1,
    /// A character device (`/dev/null`, a terminal), reopened by path.
    CharDevice = 2,
    /// One end of a pipe whose both ends the process holds; recreated with
    /// its buffered bytes.
    Pipe = 3,
    /// Connected to the outside (a pipe end whose other end is elsewhere):
    /// the restorer passes its own descriptor of the same number.
    Inherited = 4,
    /// An epoll set (format 1.2; state [`FdState::Epoll`]).
    Epoll = 5,
    /// An eventfd (format 1.2; state [`FdState::EventFd`]).
    EventFd = 6,
    /// A timerfd (format 1.2; state [`FdState::TimerFd`]).
    TimerFd = 7,
    /// A signalfd (format 1.2; state [`FdState::SignalFd`]).
    SignalFd = 8,
    /// A socket (format 1.2; state [`FdState::Socket`]).
    Socket = 9,
    /// An inotify instance (format 1.2; state [`FdState::Inotify`]).
    Inotify = 10,
    /// A memfd (format 1.2; state [`FdState::Memfd`], contents in
    /// [`Manifest::shmem`](super::Manifest::shmem)).
    Memfd = 11,
    /// A pidfd (format 1.2; state [`FdState::Pidfd`]).
    Pidfd = 12,
}

impl TryFrom<u16> for FdKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            1 => Self::File,
            2 => Self::CharDevice,
            3 => Self::Pipe,
            4 => Self::Inherited,
            5 => Self::Epoll,
            6 => Self::EventFd,
            7 => Self::TimerFd,
            8 => Self::SignalFd,
            9 => Self::Socket,
            10 => Self::Inotify,
            11 => Self::Memfd,
            12 => Self::Pidfd,
            other => return Err(other),
        })
    }
}

/// One open file descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// Descriptor number.
    pub fd: i32,
    /// What it refers to.
    pub kind: FdKind,
    /// `O_*` status flags and access mode, as in `/proc/PID/fdinfo`.
    pub flags: u32,
    /// Close-on-exec.
    pub cloexec: bool,
    /// File position.
    pub pos: u64,
    /// Path (files, devices).
    pub path: String,
    /// Inode (files: checked at restore; pipes: identifies the pipe).
    pub inode: u64,
    /// Device of the file.
    pub dev: u64,
    /// Size of the file at checkpoint time.
    pub size: u64,
    /// Modification time of the file, nanoseconds since the epoch.
    pub mtime_ns: u64,
    /// Pipe buffer size (`F_GETPIPE_SZ`).
    pub pipe_size: u32,
    /// Bytes buffered in the pipe (stored once, on its read end).
    pub data: Vec<u8>,
    /// What the kinds added in format 1.2 hold.
    pub state: FdState,
}

impl FdInfo {
    /// The FD section's body.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.i32(self.fd);
        b.u16(self.kind as u16);
        b.u16(self.cloexec as u16);
        b.u32(self.flags);
        b.u64(self.pos);
        b.str(&self.path);
        b.u64(self.inode);
        b.u64(self.dev);
        b.u64(self.size);
        b.u64(self.mtime_ns);
        b.u32(self.pipe_size);
        b.bytes(&self.data);
        self.state.encode(b);
    }

    /// Reads an FD section's body, which starts at `at`.
    pub(super) fn decode(b: &mut Dec<'_>, at: u64) -> Result<Self, DecErr> {
        let fd = b.i32()?;
        let kind_at = b.offset();
        let kind = FdKind::try_from(b.u16()?).map_err(|k| DecErr {
            offset: kind_at,
            what: format!("unknown descriptor kind {k}"),
        })?;
        let cloexec = b.u16()? != 0;
        let f = Self {
            fd,
            kind,
            cloexec,
            flags: b.u32()?,
            pos: b.u64()?,
            path: b.str(PATH_CAP, "descriptor path")?,
            inode: b.u64()?,
            dev: b.u64()?,
            size: b.u64()?,
            mtime_ns: b.u64()?,
            pipe_size: b.u32()?,
            data: b.bytes(PIPE_DATA_CAP, "pipe contents")?.to_vec(),
            state: FdState::decode(b)?,
        };
        let fits = matches!(
            (f.kind, &f.state),
            (FdKind::Epoll, FdState::Epoll(_))
                | (FdKind::EventFd, FdState::EventFd { .. })
                | (FdKind::TimerFd, FdState::TimerFd { .. })
                | (FdKind::SignalFd, FdState::SignalFd { .. })
                | (FdKind::Socket, FdState::Socket(_))
                | (FdKind::Inotify, FdState::Inotify(_))
                | (FdKind::Memfd, FdState::Memfd { .. })
                | (FdKind::Pidfd, FdState::Pidfd { .. })
                | (
                    FdKind::File | FdKind::CharDevice | FdKind::Pipe | FdKind::Inherited,
                    FdState::None
                )
        );
        if !fits {
            return Err(DecErr {
                offset: at,
                what: format!(
                    "descriptor {} of kind {:?} with the state of another kind",
                    f.fd, f.kind
                ),
            });
        }
        Ok(f)
    }
}
