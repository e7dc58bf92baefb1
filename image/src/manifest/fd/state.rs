//! The kinds of descriptor ([`FdKind`]) and the state of each (kinds 5
//! to 12, format 1.2): epoll
//! sets, eventfd counters, timerfd timers, signalfd masks, sockets
//! ([`socket`](super::socket)), inotify watches, memfds and pidfds.
//!
//! Each kind's state has one body encoding, the same in every version.
//! Format 1.4 writes it straight after an FD section's common fields and
//! reads it by the section's kind; 1.2 and 1.3 wrapped it in a tag and a
//! length ([`legacy`](super::legacy)).

use super::{fanotify::Fanotify, socket::SocketInfo, tty::TtyInfo};
use crate::codec::{Dec, DecErr, Enc};

/// Most registrations of one epoll set.
const EPOLL_ITEMS_CAP: usize = 1 << 20;
/// Most watches of one inotify instance.
const WATCHES_CAP: usize = 1 << 20;
/// Longest watched path.
const WATCH_PATH_CAP: usize = 4096;
/// Most elements reserved ahead of reading them (a count is only trusted as
/// far as the bytes that follow it go).
const RESERVE_CAP: usize = 4096;

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
    /// [`Manifest::shmem`](crate::Manifest::shmem)).
    Memfd = 11,
    /// A pidfd (format 1.2; state [`FdState::Pidfd`]).
    Pidfd = 12,
    /// A terminal: an end of a pseudo-terminal pair, `/dev/tty`, or a
    /// shell job's terminal (format 1.8; state [`FdState::Tty`]).
    Tty = 13,
    /// A deleted file or directory, or shared anonymous memory, held open
    /// (format 1.8; state [`FdState::Deleted`], the file in
    /// [`Manifest::shmem`](crate::Manifest::shmem)).
    Deleted = 14,
    /// A named FIFO (format 1.8; state [`FdState::Fifo`]; its buffered
    /// bytes in the common fields, as a pipe's).
    Fifo = 15,
    /// A fanotify group (format 1.9; state [`FdState::Fanotify`]).
    Fanotify = 16,
}

impl FdKind {
    /// The first format minor that defines the kind.
    pub(super) fn since(self) -> u16 {
        match self {
            Self::Tty | Self::Deleted | Self::Fifo => 8,
            Self::Fanotify => 9,
            Self::Invalid | Self::File | Self::CharDevice | Self::Pipe | Self::Inherited => 0,
            _ => 2,
        }
    }
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
            13 => Self::Tty,
            14 => Self::Deleted,
            15 => Self::Fifo,
            16 => Self::Fanotify,
            other => return Err(other),
        })
    }
}

/// One watch of an inotify instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InotifyWatch {
    /// The watch descriptor the process knows it by.
    pub wd: i32,
    /// `IN_*` events and flags watched.
    pub mask: u32,
    /// The watched file's path (found from the kernel's file handle).
    pub path: String,
    /// Its inode (checked at restore).
    pub ino: u64,
    /// Its device (checked at restore).
    pub dev: u64,
}

/// One registration of an epoll set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpollItem {
    /// The descriptor number it was registered with (the process's own).
    pub fd: i32,
    /// `EPOLL*` event bits, including `EPOLLET`/`EPOLLONESHOT`.
    pub events: u32,
    /// The user data word, all 64 bits.
    pub data: u64,
    /// Format 1.9: the descriptor its file is open under at checkpoint
    /// time when that number is closed or holds another file now (the
    /// registration lives on while its file does); `None`: `fd` itself.
    pub source: Option<i32>,
}

/// First minor whose epoll registrations name where their file is open.
const EPOLL_SOURCE_SINCE: u16 = 9;

/// What a descriptor holds beyond the common fields: the state of its
/// [`FdKind`]. Kinds 1 to 4 (files, devices, pipes, inherited) have
/// [`FdState::None`]; every other kind has the variant of the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FdState {
    /// Nothing more (files, devices, pipes).
    #[default]
    None,
    /// An epoll set and its registrations.
    Epoll(Vec<EpollItem>),
    /// An eventfd counter.
    EventFd {
        /// The counter.
        count: u64,
        /// Made with `EFD_SEMAPHORE`.
        semaphore: bool,
    },
    /// A timerfd: clock, remaining time and interval (ns), expirations not read yet.
    TimerFd {
        /// Its clock.
        clockid: i32,
        /// Set with `TFD_TIMER_ABSTIME` (restored relative to the remaining time).
        abstime: bool,
        /// Time until it fires (0: disarmed).
        value_ns: u64,
        /// Its interval (0: fires once).
        interval_ns: u64,
        /// Expirations not read yet.
        ticks: u64,
    },
    /// A signalfd and its mask (bit n-1 for signal n).
    SignalFd {
        /// The signals it reads.
        mask: u64,
    },
    /// A socket.
    Socket(Box<SocketInfo>),
    /// An inotify instance and its watches, by watch descriptor.
    Inotify(Vec<InotifyWatch>),
    /// A memfd: the shared memory object (`Manifest::shmem`) it opens.
    Memfd {
        /// The object's id.
        id: u64,
    },
    /// A pidfd of process `pid`.
    Pidfd {
        /// The process it refers to.
        pid: i32,
    },
    /// A terminal (format 1.8).
    Tty(TtyInfo),
    /// A deleted file (format 1.8): the object (`Manifest::shmem`, a
    /// deleted file or shared anonymous memory) it opens.
    Deleted {
        /// The object's id.
        id: u64,
    },
    /// A named FIFO (format 1.8).
    Fifo {
        /// It was removed from its directory: made again at its path with
        /// `mode`, `uid` and `gid`, opened, and removed.
        deleted: bool,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
    },
    /// A fanotify group (format 1.9).
    Fanotify(Box<Fanotify>),
}

impl FdKind {
    /// Whether descriptors of this kind have a state (kinds 5 to 12).
    pub(super) fn has_state(self) -> bool {
        !matches!(
            self,
            Self::Invalid | Self::File | Self::CharDevice | Self::Pipe | Self::Inherited
        )
    }
}

impl FdState {
    /// The kind this is the state of; `None` for [`FdState::None`], the
    /// state of every kind without one.
    pub(super) fn kind(&self) -> Option<FdKind> {
        Some(match self {
            Self::None => return None,
            Self::Epoll(_) => FdKind::Epoll,
            Self::EventFd { .. } => FdKind::EventFd,
            Self::TimerFd { .. } => FdKind::TimerFd,
            Self::SignalFd { .. } => FdKind::SignalFd,
            Self::Socket(_) => FdKind::Socket,
            Self::Inotify(_) => FdKind::Inotify,
            Self::Memfd { .. } => FdKind::Memfd,
            Self::Pidfd { .. } => FdKind::Pidfd,
            Self::Tty(_) => FdKind::Tty,
            Self::Deleted { .. } => FdKind::Deleted,
            Self::Fifo { .. } => FdKind::Fifo,
            Self::Fanotify(_) => FdKind::Fanotify,
        })
    }

    /// Whether this is the state a descriptor of `kind` has.
    pub(super) fn fits(&self, kind: FdKind) -> bool {
        match self.kind() {
            Some(k) => k == kind,
            None => !kind.has_state(),
        }
    }

    /// Appends the state's body (nothing for [`FdState::None`]).
    pub(super) fn encode_body(&self, b: &mut Enc) {
        self.encode_body_version(b, crate::FORMAT_MINOR);
    }

    /// Appends the state's body as format 1.`minor` has it (older ones
    /// for tests of older readers: the crate writes the newest).
    pub(super) fn encode_body_version(&self, b: &mut Enc, minor: u16) {
        match self {
            Self::None => {}
            Self::Epoll(items) => encode_epoll(b, items, minor),
            Self::EventFd { count, semaphore } => {
                b.u64(*count);
                b.u32(*semaphore as u32);
            }
            Self::TimerFd {
                clockid,
                abstime,
                value_ns,
                interval_ns,
                ticks,
            } => {
                b.i32(*clockid);
                b.u32(*abstime as u32);
                b.u64(*value_ns);
                b.u64(*interval_ns);
                b.u64(*ticks);
            }
            Self::SignalFd { mask } => b.u64(*mask),
            Self::Socket(s) => s.encode(b),
            Self::Inotify(watches) => encode_inotify(b, watches),
            Self::Memfd { id } => b.u64(*id),
            Self::Pidfd { pid } => b.i32(*pid),
            Self::Tty(t) => t.encode(b),
            Self::Deleted { id } => b.u64(*id),
            Self::Fifo {
                deleted,
                mode,
                uid,
                gid,
            } => {
                b.u32(*deleted as u32);
                b.u32(*mode);
                b.u32(*uid);
                b.u32(*gid);
            }
            Self::Fanotify(g) => g.encode(b),
        }
    }

    /// Reads the body of the state of `kind` (nothing for a kind without
    /// state), of format 1.`minor`.
    pub(super) fn decode_body(kind: FdKind, b: &mut Dec<'_>, minor: u16) -> Result<Self, DecErr> {
        Ok(match kind {
            FdKind::Invalid
            | FdKind::File
            | FdKind::CharDevice
            | FdKind::Pipe
            | FdKind::Inherited => Self::None,
            FdKind::Epoll => Self::Epoll(decode_epoll(b, minor)?),
            FdKind::EventFd => Self::EventFd {
                count: b.u64()?,
                semaphore: b.u32()? != 0,
            },
            FdKind::TimerFd => Self::TimerFd {
                clockid: b.i32()?,
                abstime: b.u32()? != 0,
                value_ns: b.u64()?,
                interval_ns: b.u64()?,
                ticks: b.u64()?,
            },
            FdKind::SignalFd => Self::SignalFd { mask: b.u64()? },
            FdKind::Socket => Self::Socket(Box::new(SocketInfo::decode(b)?)),
            FdKind::Inotify => Self::Inotify(decode_inotify(b)?),
            FdKind::Memfd => Self::Memfd { id: b.u64()? },
            FdKind::Pidfd => Self::Pidfd { pid: b.i32()? },
            FdKind::Tty => Self::Tty(TtyInfo::decode(b, minor)?),
            FdKind::Deleted => Self::Deleted { id: b.u64()? },
            FdKind::Fifo => {
                let at = b.offset();
                let deleted = match b.u32()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecErr {
                            offset: at,
                            what: format!("FIFO deleted flag {other} (0 or 1)"),
                        })
                    }
                };
                Self::Fifo {
                    deleted,
                    mode: b.u32()?,
                    uid: b.u32()?,
                    gid: b.u32()?,
                }
            }
            FdKind::Fanotify => Self::Fanotify(Box::new(Fanotify::decode(b)?)),
        })
    }
}

fn encode_epoll(b: &mut Enc, items: &[EpollItem], minor: u16) {
    b.u32(items.len() as u32);
    for i in items {
        b.i32(i.fd);
        b.u32(i.events);
        b.u64(i.data);
    }
    if minor >= EPOLL_SOURCE_SINCE {
        for i in items {
            b.i32(i.source.unwrap_or(-1));
        }
    }
}

fn decode_epoll(b: &mut Dec<'_>, minor: u16) -> Result<Vec<EpollItem>, DecErr> {
    let n = b.u32()? as usize;
    if n > EPOLL_ITEMS_CAP {
        return Err(b.err(format!(
            "{n} epoll registrations (at most {EPOLL_ITEMS_CAP})"
        )));
    }
    let mut items = Vec::with_capacity(n.min(RESERVE_CAP));
    for _ in 0..n {
        items.push(EpollItem {
            fd: b.i32()?,
            events: b.u32()?,
            data: b.u64()?,
            source: None,
        });
    }
    if minor >= EPOLL_SOURCE_SINCE {
        for i in &mut items {
            i.source = match b.i32()? {
                -1 => None,
                n if n >= 0 && n != i.fd => Some(n),
                n => return Err(b.err(format!("epoll registration of {} open under {n}", i.fd))),
            };
        }
    }
    Ok(items)
}

fn encode_inotify(b: &mut Enc, watches: &[InotifyWatch]) {
    b.u32(watches.len() as u32);
    for w in watches {
        b.i32(w.wd);
        b.u32(w.mask);
        b.str(&w.path);
        b.u64(w.ino);
        b.u64(w.dev);
    }
}

/// Watches by increasing watch descriptor, each at least 1.
fn decode_inotify(b: &mut Dec<'_>) -> Result<Vec<InotifyWatch>, DecErr> {
    let n = b.u32()? as usize;
    if n > WATCHES_CAP {
        return Err(b.err(format!("{n} inotify watches (at most {WATCHES_CAP})")));
    }
    let mut watches: Vec<InotifyWatch> = Vec::with_capacity(n.min(RESERVE_CAP));
    for _ in 0..n {
        let w = InotifyWatch {
            wd: b.i32()?,
            mask: b.u32()?,
            path: b.str(WATCH_PATH_CAP, "watched path")?,
            ino: b.u64()?,
            dev: b.u64()?,
        };
        if w.wd < 1 || watches.last().is_some_and(|p| p.wd >= w.wd) {
            return Err(b.err(format!("inotify watch {} out of order", w.wd)));
        }
        watches.push(w);
    }
    Ok(watches)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{SockOpt, TcpRepair};

    /// A state of every kind that has one, and `None`.
    pub(in super::super) fn every_state() -> Vec<FdState> {
        vec![
            FdState::None,
            FdState::Epoll(vec![
                EpollItem {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 0x1122_3344_5566_7788,
                    source: None,
                },
                EpollItem {
                    fd: 9,
                    events: 1,
                    data: 9,
                    source: None,
                },
            ]),
            FdState::EventFd {
                count: 5,
                semaphore: true,
            },
            FdState::TimerFd {
                clockid: 1,
                abstime: true,
                value_ns: 8_999_837_282,
                interval_ns: 2_500_000_000,
                ticks: 3,
            },
            FdState::SignalFd {
                mask: 0x2_0000_4200,
            },
            FdState::Socket(Box::new(SocketInfo {
                family: 2,
                sock_type: 1,
                protocol: 6,
                local: vec![2, 0, 0x18, 0xff, 127, 0, 0, 1],
                peer: vec![2, 0, 0xc0, 0x01, 127, 0, 0, 1],
                options: vec![SockOpt {
                    level: 6,
                    name: 1,
                    value: 1i32.to_le_bytes().to_vec(),
                }],
                queue: vec![b"one".to_vec(), b"two".to_vec()],
                tcp: Some(TcpRepair {
                    send_seq: 1,
                    recv_seq: u32::MAX,
                    send_queue: b"abcdef".to_vec(),
                    unsent: 2,
                    recv_queue: b"xyz".to_vec(),
                    mss: 65483,
                    timestamp: 3_149_598_432,
                    options: 7,
                    snd_wscale: 10,
                    rcv_wscale: 9,
                    window: [1, 2, 3, 4, 5],
                    state: 0,
                }),
                ..SocketInfo::default()
            })),
            FdState::Inotify(vec![
                InotifyWatch {
                    wd: 1,
                    mask: 0x100,
                    path: "/srv".into(),
                    ino: 54,
                    dev: 8 << 32 | 1,
                },
                InotifyWatch {
                    wd: 4,
                    mask: 0x2,
                    path: "/etc/hosts".into(),
                    ino: 12,
                    dev: 8 << 32 | 1,
                },
            ]),
            FdState::Memfd { id: 1032 },
            FdState::Pidfd { pid: 4242 },
            FdState::Deleted { id: 77 },
            FdState::Fifo {
                deleted: true,
                mode: 0o640,
                uid: 1000,
                gid: 100,
            },
        ]
    }

    /// [`every_state`] and those of the kinds added since format 1.4.
    pub(in super::super) fn every_state_now() -> Vec<FdState> {
        let mut all = every_state();
        all.push(FdState::Tty(super::super::tty::tests::master()));
        all.push(FdState::Fanotify(Box::new(Fanotify {
            flags: 0x10,
            event_flags: 0,
            marks: vec![super::super::fanotify::FanotifyMark {
                path: "/srv/f".into(),
                ino: 9,
                dev: 1,
                mask: 0x3b,
                ..Default::default()
            }],
        })));
        all
    }

    #[test]
    fn every_body_round_trips_by_its_kind() {
        for s in every_state_now() {
            let kind = s.kind().unwrap_or(FdKind::File);
            assert!(s.fits(kind));
            let mut e = Enc::default();
            s.encode_body(&mut e);
            assert_eq!(e.buf.is_empty(), s == FdState::None);
            let mut d = Dec::new(&e.buf, 0);
            assert_eq!(
                FdState::decode_body(kind, &mut d, crate::FORMAT_MINOR).unwrap(),
                s
            );
            assert!(d.done());
        }
    }

    #[test]
    fn states_fit_their_kind_only() {
        for s in every_state_now() {
            for k in 0..=13 {
                let kind = FdKind::try_from(k).unwrap_or_default();
                let expected = match s.kind() {
                    Some(own) => own == kind,
                    None => k <= 4,
                };
                assert_eq!(s.fits(kind), expected, "{s:?} {kind:?}");
                assert_eq!(kind.has_state(), k > 4);
            }
        }
    }

    #[test]
    fn counts_over_the_caps_and_disordered_watches_are_refused() {
        let mut e = Enc::default();
        e.u32(EPOLL_ITEMS_CAP as u32 + 1);
        let err =
            FdState::decode_body(FdKind::Epoll, &mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR)
                .unwrap_err();
        assert!(err.what.contains("epoll registrations"), "{}", err.what);
        // A count within the cap but past the bytes: refused, not reserved.
        let mut e = Enc::default();
        e.u32(EPOLL_ITEMS_CAP as u32);
        assert!(
            FdState::decode_body(FdKind::Epoll, &mut Dec::new(&e.buf, 0), crate::FORMAT_MINOR)
                .is_err()
        );
        let mut e = Enc::default();
        e.u32(WATCHES_CAP as u32 + 1);
        let err = FdState::decode_body(
            FdKind::Inotify,
            &mut Dec::new(&e.buf, 0),
            crate::FORMAT_MINOR,
        )
        .unwrap_err();
        assert!(err.what.contains("inotify watches"), "{}", err.what);
        let watch = |wd| InotifyWatch {
            wd,
            ..InotifyWatch::default()
        };
        for bad in [
            vec![watch(0)],
            vec![watch(3), watch(3)],
            vec![watch(5), watch(2)],
        ] {
            let mut e = Enc::default();
            FdState::Inotify(bad).encode_body(&mut e);
            let err = FdState::decode_body(
                FdKind::Inotify,
                &mut Dec::new(&e.buf, 0),
                crate::FORMAT_MINOR,
            )
            .unwrap_err();
            assert!(err.what.contains("out of order"), "{}", err.what);
        }
    }

    #[test]
    fn an_epoll_registration_names_where_its_file_is_open_from_1_9() {
        let items = vec![
            EpollItem {
                fd: 999,
                events: 1,
                data: 2,
                source: Some(5),
            },
            EpollItem {
                fd: 5,
                events: 1,
                data: 3,
                source: None,
            },
        ];
        let s = FdState::Epoll(items.clone());
        let mut e = Enc::default();
        s.encode_body(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        assert_eq!(FdState::decode_body(FdKind::Epoll, &mut d, 9).unwrap(), s);
        assert!(d.done());
        // 1.8 has no sources.
        let mut e8 = Enc::default();
        s.encode_body_version(&mut e8, 8);
        let mut d = Dec::new(&e8.buf, 0);
        let FdState::Epoll(back) = FdState::decode_body(FdKind::Epoll, &mut d, 8).unwrap() else {
            panic!()
        };
        assert!(back.iter().all(|i| i.source.is_none()));
        // A source that is its own number, or negative, is damage.
        let n = e.buf.len();
        let mut bad = e.buf.clone();
        bad[n - 8..n - 4].copy_from_slice(&999i32.to_le_bytes());
        assert!(FdState::decode_body(FdKind::Epoll, &mut Dec::new(&bad, 0), 9).is_err());
        bad[n - 8..n - 4].copy_from_slice(&(-2i32).to_le_bytes());
        assert!(FdState::decode_body(FdKind::Epoll, &mut Dec::new(&bad, 0), 9).is_err());
    }
}
