//! Kind-specific state of a descriptor (format 1.2): epoll sets, eventfd
//! counters, timerfd timers, signalfd masks and sockets.
//!
//! Encoded at the end of an FD section as `tag: u16` and a length-prefixed
//! body; an FD section without it (format 1.0/1.1) has [`FdState::None`].

use super::socket::SocketInfo;
use crate::codec::{Dec, DecErr, Enc};

/// Most registrations of one epoll set.
const EPOLL_ITEMS_CAP: usize = 1 << 20;

const STATE_EPOLL: u16 = 1;
const STATE_EVENTFD: u16 = 2;
const STATE_TIMERFD: u16 = 3;
const STATE_SIGNALFD: u16 = 4;
const STATE_SOCKET: u16 = 5;
const STATE_INOTIFY: u16 = 6;
const STATE_MEMFD: u16 = 7;
const STATE_PIDFD: u16 = 8;
/// Most watches of one inotify instance.
const WATCHES_CAP: usize = 1 << 20;
/// Longest watched path.
const WATCH_PATH_CAP: usize = 4096;

/// One watch of an inotify instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InotifyWatch {
    /// The watch descriptor the process knows it by.
    pub wd: i32,
    /// `IN_*` events and flags watched.
    pub mask: u32,
    /// The watched file's path (found from the kernel's file handle).
    pub path: String,
    /// Its inode and device (checked at restore).
    pub ino: u64,
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
}

/// What a descriptor holds beyond the common fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum FdState {
    /// Nothing more (files, devices, pipes).
    #[default]
    None,
    /// An epoll set and its registrations.
    Epoll(Vec<EpollItem>),
    /// An eventfd counter.
    EventFd { count: u64, semaphore: bool },
    /// A timerfd: clock, remaining time and interval (ns), expirations not read yet.
    TimerFd {
        clockid: i32,
        /// Set with `TFD_TIMER_ABSTIME` (restored relative to the remaining time).
        abstime: bool,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
    },
    /// A signalfd and its mask (bit n-1 for signal n).
    SignalFd { mask: u64 },
    /// A socket.
    Socket(Box<SocketInfo>),
    /// An inotify instance and its watches, by watch descriptor.
    Inotify(Vec<InotifyWatch>),
    /// A memfd: the shared memory object (`Manifest::shmem`) it opens.
    Memfd { id: u64 },
    /// A pidfd of process `pid`.
    Pidfd { pid: i32 },
}

impl FdState {
    /// Appends the state to an FD section (nothing for [`FdState::None`]).
    pub(crate) fn encode(&self, out: &mut Enc) {
        let mut b = Enc::default();
        let tag = match self {
            Self::None => return,
            Self::Epoll(items) => {
                b.u32(items.len() as u32);
                for i in items {
                    b.i32(i.fd);
                    b.u32(i.events);
                    b.u64(i.data);
                }
                STATE_EPOLL
            }
            Self::EventFd { count, semaphore } => {
                b.u64(*count);
                b.u32(*semaphore as u32);
                STATE_EVENTFD
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
                STATE_TIMERFD
            }
            Self::SignalFd { mask } => {
                b.u64(*mask);
                STATE_SIGNALFD
            }
            Self::Socket(s) => {
                s.encode(&mut b);
                STATE_SOCKET
            }
            Self::Inotify(watches) => {
                b.u32(watches.len() as u32);
                for w in watches {
                    b.i32(w.wd);
                    b.u32(w.mask);
                    b.str(&w.path);
                    b.u64(w.ino);
                    b.u64(w.dev);
                }
                STATE_INOTIFY
            }
            Self::Memfd { id } => {
                b.u64(*id);
                STATE_MEMFD
            }
            Self::Pidfd { pid } => {
                b.i32(*pid);
                STATE_PIDFD
            }
        };
        out.u16(tag);
        out.bytes(&b.buf);
    }

    /// Reads the state at the end of an FD section, if there is one.
    pub(crate) fn decode(d: &mut Dec<'_>) -> Result<Self, DecErr> {
        if d.done() {
            return Ok(Self::None);
        }
        let at = d.offset();
        let tag = d.u16()?;
        let body = d.bytes(usize::MAX >> 1, "descriptor state")?;
        let mut b = Dec::new(body, at + 6);
        let state = match tag {
            STATE_EPOLL => {
                let n = b.u32()? as usize;
                if n > EPOLL_ITEMS_CAP {
                    return Err(b.err(format!(
                        "{n} epoll registrations (at most {EPOLL_ITEMS_CAP})"
                    )));
                }
                let mut items = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    items.push(EpollItem {
                        fd: b.i32()?,
                        events: b.u32()?,
                        data: b.u64()?,
                    });
                }
                Self::Epoll(items)
            }
            STATE_EVENTFD => Self::EventFd {
                count: b.u64()?,
                semaphore: b.u32()? != 0,
            },
            STATE_TIMERFD => Self::TimerFd {
                clockid: b.i32()?,
                abstime: b.u32()? != 0,
                value_ns: b.u64()?,
                interval_ns: b.u64()?,
                ticks: b.u64()?,
            },
            STATE_SIGNALFD => Self::SignalFd { mask: b.u64()? },
            STATE_SOCKET => Self::Socket(Box::new(SocketInfo::decode(&mut b)?)),
            STATE_INOTIFY => {
                let n = b.u32()? as usize;
                if n > WATCHES_CAP {
                    return Err(b.err(format!("{n} inotify watches (at most {WATCHES_CAP})")));
                }
                let mut watches: Vec<InotifyWatch> = Vec::with_capacity(n.min(4096));
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
                Self::Inotify(watches)
            }
            STATE_MEMFD => Self::Memfd { id: b.u64()? },
            STATE_PIDFD => Self::Pidfd { pid: b.i32()? },
            other => {
                return Err(DecErr {
                    offset: at,
                    what: format!("unknown descriptor state {other} (from a newer cr-ebpf?)"),
                })
            }
        };
        if !b.done() {
            return Err(b.err("unexpected bytes at the end of a descriptor state"));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SockOpt, TcpRepair};

    fn round_trip(s: &FdState) -> FdState {
        let mut e = Enc::default();
        s.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        let back = FdState::decode(&mut d).expect("decodes");
        assert!(d.done());
        back
    }

    #[test]
    fn every_state_survives_encoding() {
        let states = [
            FdState::None,
            FdState::Epoll(vec![
                EpollItem {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 0x1122_3344_5566_7788,
                },
                EpollItem {
                    fd: 9,
                    events: 1,
                    data: 9,
                },
            ]),
            FdState::EventFd {
                count: 5,
                semaphore: true,
            },
            FdState::TimerFd {
                clockid: 1,
                abstime: false,
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
                }),
                ..SocketInfo::default()
            })),
        ];
        for s in &states {
            assert_eq!(&round_trip(s), s);
        }
    }

    #[test]
    fn damaged_states_are_refused() {
        let mut e = Enc::default();
        FdState::SignalFd { mask: 1 }.encode(&mut e);
        // Unknown state tag.
        let mut bad = e.buf.clone();
        bad[0] = 99;
        assert!(FdState::decode(&mut Dec::new(&bad, 0))
            .unwrap_err()
            .what
            .contains("unknown descriptor state 99"));
        // Truncated body.
        let short = &e.buf[..e.buf.len() - 1];
        assert!(FdState::decode(&mut Dec::new(short, 0)).is_err());
        // More unsent bytes than the queue holds.
        let mut e = Enc::default();
        FdState::Socket(Box::new(SocketInfo {
            tcp: Some(TcpRepair {
                send_queue: vec![1, 2],
                unsent: 3,
                ..TcpRepair::default()
            }),
            ..SocketInfo::default()
        }))
        .encode(&mut e);
        assert!(FdState::decode(&mut Dec::new(&e.buf, 0))
            .unwrap_err()
            .what
            .contains("unsent"));
    }
}
