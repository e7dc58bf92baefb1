//! epoll sets: their registrations (descriptor number, events, data) from
//! fdinfo, each checked with `kcmp` to still be the file open under its
//! number; rebuilt inside the process once every other descriptor has its
//! number, since registrations name the process's own numbers.

use cr_ebpf_image::{EpollItem, FdInfo, FdKind, FdState, Manifest};

use super::{unreadable, Descriptor, RestoreCx, SaveCx, Seen};
use crate::{RestoreError, SaveError};

/// `KCMP_EPOLL_TFD`: whether a registration of an epoll set is a given file.
const KCMP_EPOLL_TFD: i32 = 7;

/// An epoll set.
pub struct Epoll;

/// The registrations in an epoll set's fdinfo text.
fn parse(fdinfo: &str) -> Option<Vec<EpollItem>> {
    let mut items = Vec::new();
    for line in fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
        // tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x
        let mut it = line.split_whitespace();
        let mut next_after = |key: &str| {
            it.by_ref()
                .skip_while(|w| *w != key)
                .nth(1)
                .map(str::to_string)
        };
        let fd = next_after("tfd:")?.parse().ok()?;
        let events = u32::from_str_radix(&next_after("events:")?, 16).ok()?;
        let data = u64::from_str_radix(&next_after("data:")?, 16).ok()?;
        items.push(EpollItem { fd, events, data });
    }
    Some(items)
}

impl Descriptor for Epoll {
    fn kinds(&self) -> &'static [FdKind] {
        &[FdKind::Epoll]
    }

    fn save(&self, cx: &mut SaveCx<'_>, seen: &Seen) -> Option<Result<FdInfo, SaveError>> {
        if seen.anon_name() != Some("[eventpoll]") {
            return None;
        }
        let Some(items) = parse(&seen.fdinfo) else {
            return Some(Err(unreadable(cx, seen, "epoll registration")));
        };
        if let Err(e) = check_epoll(cx.pid, cx.holder(seen.fd), &items) {
            return Some(Err(cx.refuse(seen.fd, e)));
        }
        let mut info = seen.info(FdKind::Epoll);
        info.state = FdState::Epoll(items);
        Some(Ok(info))
    }

    fn open(&self, _cx: &RestoreCx<'_>, _f: &FdInfo) -> Result<Option<i64>, RestoreError> {
        // Made by `finish`, once every registered number is in place.
        Ok(None)
    }

    fn finish(&self, cx: &RestoreCx<'_>, f: &FdInfo) -> Result<(), RestoreError> {
        let FdState::Epoll(items) = &f.state else {
            return Err(RestoreError::NotSupported(format!(
                "epoll set {} without its registrations",
                f.fd
            )));
        };
        let e = cx.sys.epoll_create(f.cloexec)?;
        if e != f.fd as i64 {
            cx.sys.dup3(e, f.fd, f.cloexec)?;
            cx.sys.close(e)?;
        }
        for item in items {
            cx.sys
                .epoll_add(f.fd, item.fd, item.events, item.data)
                .map_err(|e| {
                    RestoreError::NotSupported(format!(
                        "registering descriptor {} in the epoll set on fd {}: {e}",
                        item.fd, f.fd
                    ))
                })?;
        }
        if f.flags as i32 & libc::O_NONBLOCK != 0 {
            cx.sys
                .set_status_flags(f.fd as i64, libc::O_NONBLOCK as u32)?;
        }
        Ok(())
    }
}

/// Checks that each registration of the epoll set on `epfd` still refers
/// to the file open on its descriptor number in `pid` (a registration
/// outlives a `close` of its number when the file stays open elsewhere).
/// The descriptor of `m` before its descriptor `i` that is the same epoll
/// set (the same open file description, [`FdInfo::desc`]), if `i` is one:
/// it is that one's duplicate, not a set of its own. (A set several
/// processes share is made by each.)
pub(super) fn made_before(m: &Manifest, i: usize) -> Option<&FdInfo> {
    let f = &m.fds[i];
    if f.kind != FdKind::Epoll || f.desc == 0 {
        return None;
    }
    m.fds[..i]
        .iter()
        .find(|g| g.kind == FdKind::Epoll && g.desc == f.desc)
}

/// The epoll set is `ep` (the process holding it and its number there:
/// another than `pid` for one in flight, which cr-ebpf holds).
pub(crate) fn check_epoll(pid: i32, ep: (i32, i32), items: &[EpollItem]) -> Result<(), String> {
    let (ep_pid, epfd) = ep;
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    for (i, item) in items.iter().enumerate() {
        // Several registrations of one number (dup'ed files) are told apart
        // by their order among that number's registrations.
        let toff = items[..i].iter().filter(|o| o.fd == item.fd).count() as u32;
        let slot = Slot {
            efd: epfd as u32,
            tfd: item.fd as u32,
            toff,
        };
        // SAFETY: kcmp reads the slot we pass; no other memory.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                pid,
                ep_pid,
                KCMP_EPOLL_TFD,
                item.fd as libc::c_ulong,
                &slot as *const Slot,
            )
        };
        if r != 0 {
            return Err(format!(
                "an epoll registration of descriptor {} whose file is no longer open under that number",
                item.fd
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::*;
    use crate::fd::testing;

    #[test]
    fn registrations_round_trip_after_every_number_is_in_place() {
        // SAFETY: plain syscall.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let (r, w) = testing::pipe();
        for (fd, events, data) in [
            (
                r.as_raw_fd(),
                libc::EPOLLIN as u32 | libc::EPOLLET as u32,
                0x1122_3344_5566_7788u64,
            ),
            (w.as_raw_fd(), libc::EPOLLOUT as u32, 9),
        ] {
            let mut ev = libc::epoll_event { events, u64: data };
            // SAFETY: our epoll set, descriptors and event.
            let r = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
            assert_eq!(r, 0);
        }
        let saved = testing::save_own_many(&[r.as_raw_fd(), w.as_raw_fd(), ep.as_raw_fd()]);
        let FdState::Epoll(items) = &saved[2].state else {
            panic!("{:?}", saved[2])
        };
        let mut items = items.clone();
        items.sort_by_key(|i| i.fd);
        // The kernel always adds EPOLLERR | EPOLLHUP.
        let always = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        assert_eq!(
            items,
            [
                EpollItem {
                    fd: r.as_raw_fd(),
                    events: libc::EPOLLIN as u32 | libc::EPOLLET as u32 | always,
                    data: 0x1122_3344_5566_7788
                },
                EpollItem {
                    fd: w.as_raw_fd(),
                    events: libc::EPOLLOUT as u32 | always,
                    data: 9
                }
            ]
        );
        let rec = testing::restore(&testing::manifest(saved.clone()));
        let names = rec.names();
        let first_epoll = names.iter().position(|n| n == "epoll_create1").unwrap();
        let last_dup3 = names.iter().rposition(|n| n == "dup3").unwrap();
        // Both pipe ends were put at their numbers before the set was made
        // (its own dup3 follows its creation).
        assert_eq!(names.iter().filter(|n| *n == "dup3").count(), 3);
        assert!(first_epoll < last_dup3);
        let adds = rec.calls("epoll_ctl(EPOLL_CTL_ADD)");
        assert_eq!(adds.len(), 2);
        let FdState::Epoll(in_image) = &saved[2].state else {
            unreachable!()
        };
        for (i, (add, item)) in adds.iter().zip(in_image).enumerate() {
            assert_eq!((add[0] as i32, add[2] as i32), (saved[2].fd, item.fd));
            let ev = rec.memory("epoll_ctl(EPOLL_CTL_ADD)", i, add[3], 12);
            assert_eq!(u32::from_le_bytes(ev[..4].try_into().unwrap()), item.events);
            assert_eq!(u64::from_le_bytes(ev[4..].try_into().unwrap()), item.data);
        }
    }

    #[test]
    fn a_registration_of_a_closed_number_is_refused() {
        // SAFETY: plain syscall.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let (r, _w) = testing::pipe();
        let keep = r.try_clone().unwrap();
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 1,
        };
        // SAFETY: our epoll set, descriptor and event.
        let added =
            unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, r.as_raw_fd(), &mut ev) };
        assert_eq!(added, 0);
        drop(r); // the file stays open through `keep`: the registration lives on
        let mut owner = testing::SaveOwner::new();
        let err = Epoll
            .save(&mut owner.cx(), &testing::seen(ep.as_raw_fd()))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("no longer open"), "{err}");
        drop(keep);
    }

    #[test]
    fn fdinfo_of_this_kernel_parses() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t26\n\
            tfd:        5 events: 4000201d data:     7ffeda84b6b4  pos:0 ino:1a sdev:10\n\
            tfd:        3 events: 80000019 data: 1122334455667788  pos:0 ino:1a sdev:10\n";
        let items = parse(text).unwrap();
        assert_eq!(items[0].fd, 5);
        assert_eq!(items[0].events, 0x4000_201d);
        assert_eq!(items[1].data, 0x1122_3344_5566_7788);
        assert!(parse("tfd: x events: 1 data: 2\n").is_none());
    }

    #[test]
    fn a_duplicate_of_an_epoll_set_is_the_same_set_again() {
        // SAFETY: plain syscall.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let again = ep.try_clone().unwrap();
        let other = ep.try_clone().unwrap();
        let mut saved = testing::save_own_many(&[ep.as_raw_fd(), again.as_raw_fd()]);
        // SAFETY: plain syscall.
        let lone = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        saved.push(testing::save_own(lone.as_raw_fd()));
        let me = std::process::id() as i32;
        crate::fd::description::share(&mut [(me, &mut saved[..])], &Default::default());
        assert_ne!(saved[0].desc, 0);
        assert_eq!((saved[1].desc, saved[2].desc), (saved[0].desc, 0));
        drop(other);
        let rec = testing::restore(&testing::manifest(saved.clone()));
        assert_eq!(rec.calls("epoll_create1").len(), 2, "two sets, not three");
        let dup3 = rec.calls("dup3");
        assert!(dup3
            .iter()
            .any(|c| (c[0] as i32, c[1] as i32) == (saved[0].fd, saved[1].fd)));
    }
}
