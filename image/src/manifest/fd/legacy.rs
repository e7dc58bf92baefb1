//! Descriptor states of formats 1.2 and 1.3, still read (never written).
//!
//! There, an FD section of a kind with state ended with a state tag
//! (`u16`) and the state's body as `bytes`; sections of kinds without state
//! (and every FD section of 1.0 and 1.1) ended before. The tag was a
//! numbering of its own, which happens to be the kind's number minus 4:
//!
//! | tag | kind |
//! |---|---|
//! | 1 | 5 epoll |
//! | 2 | 6 eventfd |
//! | 3 | 7 timerfd |
//! | 4 | 8 signalfd |
//! | 5 | 9 socket |
//! | 6 | 10 inotify |
//! | 7 | 11 memfd |
//! | 8 | 12 pidfd |
//!
//! The bodies are those of format 1.4 ([`FdState::decode_body`]). Since
//! the tag could name another kind than the section's, a reader checks
//! that they agree ([`FdState::fits`]); format 1.4 has no such tag.

use super::{FdKind, FdState};
#[cfg(test)]
use crate::codec::Enc;
use crate::codec::{Dec, DecErr};

/// The kind whose state a format 1.2/1.3 state tag is.
fn kind_of_tag(tag: u16) -> Option<FdKind> {
    Some(match tag {
        1 => FdKind::Epoll,
        2 => FdKind::EventFd,
        3 => FdKind::TimerFd,
        4 => FdKind::SignalFd,
        5 => FdKind::Socket,
        6 => FdKind::Inotify,
        7 => FdKind::Memfd,
        8 => FdKind::Pidfd,
        _ => return None,
    })
}

/// The state tag of format 1.2/1.3 for `kind`; `None` for kinds without state.
#[cfg(test)]
fn tag_of_kind(kind: FdKind) -> Option<u16> {
    (1..=8).find(|&t| kind_of_tag(t) == Some(kind))
}

/// Reads what follows the common fields of a format 1.0 to 1.3 FD section:
/// nothing ([`FdState::None`]), or a state tag and its body.
pub(super) fn decode(d: &mut Dec<'_>, minor: u16) -> Result<FdState, DecErr> {
    if d.done() {
        return Ok(FdState::None);
    }
    let at = d.offset();
    let tag = d.u16()?;
    let body = d.bytes(usize::MAX >> 1, "descriptor state")?;
    let mut b = Dec::new(body, at + 6);
    let kind = kind_of_tag(tag).ok_or_else(|| DecErr {
        offset: at,
        what: format!(
            "unknown descriptor state {tag} (image format {}.{minor} has states 1 to 8)",
            crate::FORMAT_MAJOR
        ),
    })?;
    let state = FdState::decode_body(kind, &mut b, 4)?;
    if !b.done() {
        return Err(b.err("unexpected bytes at the end of a descriptor state"));
    }
    Ok(state)
}

/// Appends `state` as format 1.2/1.3 wrote it (for tests: the crate
/// writes only the current format).
#[cfg(test)]
pub(super) fn encode(state: &FdState, out: &mut Enc) {
    let Some(tag) = state.kind().and_then(tag_of_kind) else {
        return;
    };
    let mut b = Enc::default();
    state.encode_body_version(&mut b, 3);
    out.u16(tag);
    out.bytes(&b.buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EpollItem, SockOpt, SocketInfo, TcpRepair};

    /// The state encoding of formats 1.2 and 1.3 under the names these
    /// tests were written with.
    trait Tagged: Sized {
        fn encode(&self, out: &mut Enc);
        fn decode(d: &mut Dec<'_>) -> Result<Self, DecErr>;
    }

    impl Tagged for FdState {
        fn encode(&self, out: &mut Enc) {
            encode(self, out);
        }
        fn decode(d: &mut Dec<'_>) -> Result<Self, DecErr> {
            decode(d, 3)
        }
    }

    #[test]
    fn tags_are_the_kinds_less_4() {
        for k in 0..=15 {
            let kind = FdKind::try_from(k).unwrap_or_default();
            let expected = (5..=12).contains(&k).then(|| k - 4);
            assert_eq!(tag_of_kind(kind), expected, "{kind:?}");
        }
        assert_eq!(kind_of_tag(0), None);
        assert_eq!(kind_of_tag(9), None);
    }

    #[test]
    fn every_state_of_the_new_kinds_reads_as_written_then() {
        for s in super::super::state::tests::every_state()
            .into_iter()
            .filter(|s| s.kind().is_none_or(|k| k.since() < 8))
        {
            let mut e = Enc::default();
            encode(&s, &mut e);
            assert_eq!(e.buf.is_empty(), s == FdState::None);
            let mut d = Dec::new(&e.buf, 0);
            assert_eq!(decode(&mut d, 2).unwrap(), s);
            assert!(d.done());
        }
    }

    #[test]
    fn a_state_with_extra_bytes_is_refused() {
        let mut e = Enc::default();
        e.u16(8);
        e.bytes(&[1, 0, 0, 0, 9]);
        let err = decode(&mut Dec::new(&e.buf, 0), 3).unwrap_err();
        assert!(err.what.contains("unexpected bytes"), "{}", err.what);
    }

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
                    state: 0,
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
