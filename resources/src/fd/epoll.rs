//! epoll sets: their registrations (descriptor number, events, data) from
//! fdinfo, each checked with `kcmp` to still be the file open under its
//! number; rebuilt inside the process once every other descriptor has its
//! number, since registrations name the process's own numbers.
//!
//! An epoll set held by several descriptors of one process (`dup`) comes
//! back as one set; one shared with another process (fork) is refused:
//! each would be restored as a set of its own.
//!
//! A registration outlives a `close` of its number while its file stays
//! open: the file is then looked for among the process's other
//! descriptors (`kcmp(KCMP_EPOLL_TFD)`), and at restore put under the
//! registered number for the moment it takes to register it (whatever is
//! under that number is set aside and put back).

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
        items.push(EpollItem {
            fd,
            events,
            data,
            source: None,
        });
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
        let Some(mut items) = parse(&seen.fdinfo) else {
            return Some(Err(unreadable(cx, seen, "epoll registration")));
        };
        let mut pids = cx.scope.pids.clone();
        if !pids.contains(&cx.pid) {
            pids.push(cx.pid);
        }
        if let Some((pid, fd)) = shared_with(cx.pid, seen.fd, &pids) {
            return Some(Err(cx.refuse(
                seen.fd,
                format!(
                    "an epoll set shared with descriptor {fd} of process {pid} (dup or fork): \
                     each would be restored as a set of its own"
                ),
            )));
        }
        if let Err(e) = locate(cx.pid, cx.holder(seen.fd), &mut items) {
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
            register(cx, f.fd, item).map_err(|e| {
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

/// A descriptor of another process of `pids` that is the same epoll set
/// as descriptor `fd` of `pid` (one inherited across fork). Duplicates in
/// `pid` itself are one set again ([`made_before`]).
fn shared_with(pid: i32, fd: i32, pids: &[i32]) -> Option<(i32, i32)> {
    pids.iter().filter(|&&o| o != pid).find_map(|&other| {
        let rd = std::fs::read_dir(format!("/proc/{other}/fd")).ok()?;
        rd.flatten()
            .filter_map(|e| {
                let n: i32 = e.file_name().to_str()?.parse().ok()?;
                let link = std::fs::read_link(e.path()).ok()?;
                (link.as_os_str() == "anon_inode:[eventpoll]").then_some(n)
            })
            .filter(|&n| (other, n) != (pid, fd))
            .find(|&n| super::description::same_description(pid, fd, other, n))
            .map(|n| (other, n))
    })
}

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

/// Registers `item` in the epoll set `epfd` of the process being built. A
/// registration whose file was open under another number is made with
/// that file put under its number for the moment.
fn register(cx: &RestoreCx<'_>, epfd: i32, item: &EpollItem) -> Result<(), RestoreError> {
    let Some(src) = item.source else {
        return cx.sys.epoll_add(epfd, item.fd, item.events, item.data);
    };
    // What the number holds now, if anything: set aside, put back after.
    let held = cx
        .sys
        .call(
            "fcntl(F_GETFD)",
            libc::SYS_fcntl,
            [item.fd as u64, libc::F_GETFD as u64, 0, 0, 0, 0],
        )
        .ok();
    let aside = match held {
        Some(_) => Some(cx.sys.dup_above(item.fd as i64, 0)?),
        None => None,
    };
    cx.sys.dup3(src as i64, item.fd, false)?;
    let added = cx.sys.epoll_add(epfd, item.fd, item.events, item.data);
    match (aside, held) {
        (Some(t), Some(flags)) => {
            cx.sys
                .dup3(t, item.fd, flags & libc::FD_CLOEXEC as i64 != 0)?;
            cx.sys.close(t)?;
        }
        _ => cx.sys.close(item.fd as i64)?,
    }
    added
}

/// `kcmp(KCMP_EPOLL_TFD)`: whether descriptor `fd` of `pid` is the file of
/// registration number `toff` of descriptor `tfd` in the epoll set `ep`
/// (the process holding it and its number there: another than `pid` for
/// one in flight, which cr-ebpf holds).
fn is_target(pid: i32, fd: i32, ep: (i32, i32), tfd: i32, toff: u32) -> bool {
    let (ep_pid, epfd) = ep;
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = Slot {
        efd: epfd as u32,
        tfd: tfd as u32,
        toff,
    };
    // SAFETY: kcmp reads the slot we pass; no other memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            ep_pid,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            &slot as *const Slot,
        )
    };
    r == 0
}

/// Checks that each registration of the epoll set on `epfd` still refers
/// to the file open on its descriptor number in `pid`; where it does not
/// (a registration outlives a `close` of its number while the file stays
/// open elsewhere), finds another descriptor of `pid` open on that file
/// and names it as the registration's source.
pub(crate) fn locate(pid: i32, ep: (i32, i32), items: &mut [EpollItem]) -> Result<(), String> {
    let mut open: Option<Vec<i32>> = None;
    for i in 0..items.len() {
        let fd = items[i].fd;
        // Several registrations of one number (dup'ed files) are told apart
        // by their order among that number's registrations.
        let toff = items[..i].iter().filter(|o| o.fd == fd).count() as u32;
        if is_target(pid, fd, ep, fd, toff) {
            continue;
        }
        let fds = open.get_or_insert_with(|| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        });
        let found = fds
            .iter()
            .copied()
            .find(|&c| c != fd && is_target(pid, c, ep, fd, toff));
        match found {
            Some(c) => items[i].source = Some(c),
            None => {
                return Err(format!(
                    "an epoll registration of descriptor {fd} whose file is no longer open \
                     in the process (only elsewhere)"
                ))
            }
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
                    data: 0x1122_3344_5566_7788,
                    source: None,
                },
                EpollItem {
                    fd: w.as_raw_fd(),
                    events: libc::EPOLLOUT as u32 | always,
                    data: 9,
                    source: None,
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
    fn a_registration_of_a_closed_or_reused_number_names_where_its_file_is() {
        // SAFETY: plain syscall.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let (r, w) = testing::pipe();
        let (r2, _w2) = testing::pipe();
        let keep = r.try_clone().unwrap();
        let add = |fd: i32, data: u64| {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: data,
            };
            // SAFETY: our epoll set, descriptor and event.
            let added =
                unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
            assert_eq!(added, 0);
        };
        add(r.as_raw_fd(), 1);
        let n = r.as_raw_fd();
        // The number now holds another file (replaced in one step: other
        // tests open descriptors meanwhile), registered too; the first
        // file lives on through `keep`.
        // SAFETY: dup2 of our descriptor onto a number we hold.
        assert_eq!(unsafe { libc::dup2(r2.as_raw_fd(), n) }, n);
        add(n, 2);
        add(w.as_raw_fd(), 3);
        let mut owner = testing::SaveOwner::new();
        let info = Epoll
            .save(&mut owner.cx(), &testing::seen(ep.as_raw_fd()))
            .unwrap()
            .unwrap();
        let FdState::Epoll(items) = &info.state else {
            panic!("{info:?}")
        };
        let by_data = |d: u64| items.iter().find(|i| i.data == d).unwrap().clone();
        let old = by_data(1);
        assert_eq!(old.fd, n);
        let src = old.source.expect("found elsewhere");
        // SAFETY: kcmp of two of our descriptors.
        let same = unsafe {
            let me = libc::getpid();
            libc::syscall(libc::SYS_kcmp, me, me, 0, src, keep.as_raw_fd())
        };
        assert_eq!(same, 0, "the source is the registered file");
        assert_eq!(by_data(2).source, None, "the file now under the number");
        assert_eq!(by_data(3).source, None);
        // At restore: the file set aside, the old one put under the number
        // for its registration, then the number given back.
        let rec = crate::sys::fake::Recording::new();
        let shared = crate::fd::Shared::default();
        let shmem = std::collections::HashMap::new();
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        register(&cx, 50, &old).unwrap();
        assert_eq!(
            rec.names(),
            [
                "fcntl(F_GETFD)",
                "fcntl(F_DUPFD)",
                "dup3",
                "epoll_ctl(EPOLL_CTL_ADD)",
                "dup3",
                "close"
            ]
        );
        let dups = rec.calls("dup3");
        assert_eq!((dups[0][0] as i32, dups[0][1] as i32), (src, n));
        assert_eq!(rec.calls("epoll_ctl(EPOLL_CTL_ADD)")[0][2] as i32, n);
        // Nothing under the number: it is closed again after.
        let rec = crate::sys::fake::Recording::new();
        rec.fail("fcntl(F_GETFD)", libc::EBADF);
        let cx = RestoreCx {
            sys: &rec,
            shared: &shared,
            shmem: &shmem,
        };
        register(&cx, 50, &old).unwrap();
        assert_eq!(
            rec.names(),
            [
                "fcntl(F_GETFD)",
                "dup3",
                "epoll_ctl(EPOLL_CTL_ADD)",
                "close"
            ]
        );
        drop(keep);
    }

    #[test]
    fn only_an_epoll_set_shared_with_another_process_is_refused() {
        // SAFETY: plain syscall.
        let ep = unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) };
        let me = std::process::id() as i32;
        let _other = ep.try_clone().unwrap();
        // A duplicate in the same process is the same set again.
        assert_eq!(shared_with(me, ep.as_raw_fd(), &[me]), None);
    }

    #[test]
    fn a_registration_of_a_file_open_nowhere_in_the_process_is_refused() {
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
        let n = keep.as_raw_fd();
        let mut items = vec![EpollItem {
            fd: n + 1000,
            events: 1,
            data: 1,
            source: None,
        }];
        // A number that was never open and no file of ours: refused.
        let me = std::process::id() as i32;
        let err = locate(me, (me, ep.as_raw_fd()), &mut items).unwrap_err();
        assert!(err.contains("no longer open"), "{err}");
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
