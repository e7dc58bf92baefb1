//! Descriptors on anonymous inodes whose whole state `/proc/PID/fdinfo`
//! shows: epoll sets (their registrations), eventfd counters, timerfd
//! timers, signalfd masks, and inotify watches (their files found again
//! from the kernel's file handles).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use cr_ebpf_image::{EpollItem, FdKind, FdState, InotifyWatch};

/// `KCMP_EPOLL_TFD`: whether a registration of an epoll set is a given file.
const KCMP_EPOLL_TFD: i32 = 7;

/// The kind and state of `anon_inode:NAME` from its fdinfo text, or `None`
/// for an anonymous inode we do not know.
pub(crate) fn parse(name: &str, fdinfo: &str) -> Option<Result<(FdKind, FdState), String>> {
    let field = |k: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
    };
    let bad = |what: &str| Err(format!("unreadable {what} in the fdinfo of {name}"));
    Some(match name {
        "[eventpoll]" => {
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
                let fd = next_after("tfd:").and_then(|v| v.parse().ok());
                let events = next_after("events:").and_then(|v| u32::from_str_radix(&v, 16).ok());
                let data = next_after("data:").and_then(|v| u64::from_str_radix(&v, 16).ok());
                match (fd, events, data) {
                    (Some(fd), Some(events), Some(data)) => {
                        items.push(EpollItem { fd, events, data })
                    }
                    _ => return Some(bad("epoll registration")),
                }
            }
            Ok((FdKind::Epoll, FdState::Epoll(items)))
        }
        "[eventfd]" => {
            let count = field("eventfd-count:").and_then(|v| u64::from_str_radix(v, 16).ok());
            let semaphore = field("eventfd-semaphore:").map(|v| v == "1");
            match count {
                Some(count) => Ok((
                    FdKind::EventFd,
                    FdState::EventFd {
                        count,
                        semaphore: semaphore.unwrap_or(false),
                    },
                )),
                None => bad("eventfd count"),
            }
        }
        "[timerfd]" => {
            let pair = |k: &str| -> Option<u64> {
                // it_value: (8, 999837282)
                let v = field(k)?.trim_start_matches('(').trim_end_matches(')');
                let (s, ns) = v.split_once(',')?;
                Some(
                    s.trim().parse::<u64>().ok()? * 1_000_000_000
                        + ns.trim().parse::<u64>().ok()?,
                )
            };
            let clockid = field("clockid:").and_then(|v| v.parse().ok());
            let ticks = field("ticks:").and_then(|v| v.parse().ok());
            let flags = field("settime flags:").and_then(|v| u32::from_str_radix(v, 8).ok());
            match (
                clockid,
                ticks,
                flags,
                pair("it_value:"),
                pair("it_interval:"),
            ) {
                (Some(clockid), Some(ticks), Some(flags), Some(value_ns), Some(interval_ns)) => {
                    Ok((
                        FdKind::TimerFd,
                        FdState::TimerFd {
                            clockid,
                            abstime: flags & 1 != 0,
                            value_ns,
                            interval_ns,
                            ticks,
                        },
                    ))
                }
                _ => bad("timerfd state"),
            }
        }
        "inotify" => {
            let mut watches = Vec::new();
            for line in fdinfo.lines().filter(|l| l.starts_with("inotify wd:")) {
                match inotify_watch(line) {
                    Ok(w) => watches.push(w),
                    Err(e) => return Some(Err(e)),
                }
            }
            watches.sort_by_key(|w| w.wd);
            Ok((FdKind::Inotify, FdState::Inotify(watches)))
        }
        "[pidfd]" => match field("Pid:").and_then(|v| v.parse::<i32>().ok()) {
            Some(pid) if pid > 0 => Ok((FdKind::Pidfd, FdState::Pidfd { pid })),
            Some(_) => Err("a pidfd of a process that has exited".to_string()),
            None => bad("pidfd's process"),
        },
        "[signalfd]" => match field("sigmask:").and_then(|v| u64::from_str_radix(v, 16).ok()) {
            Some(mask) => Ok((FdKind::SignalFd, FdState::SignalFd { mask })),
            None => bad("signalfd mask"),
        },
        _ => return None,
    })
}

/// One `inotify wd:2 ino:9a8157 sdev:fe00000 mask:80000002 ignored_mask:0
/// fhandle-bytes:8 fhandle-type:1 f_handle:57819a00733d77df` line, with the
/// watched file's path found from its handle.
fn inotify_watch(line: &str) -> Result<InotifyWatch, String> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .ok_or_else(|| format!("no {k} in the inotify line {line:?}"))
    };
    let hex = |k: &str| {
        field(k).and_then(|v| {
            u64::from_str_radix(v, 16).map_err(|_| format!("bad {k} in the inotify line {line:?}"))
        })
    };
    let wd: i32 = field("wd:")?
        .parse()
        .map_err(|_| format!("bad wd in {line:?}"))?;
    let ino = hex("ino:")?;
    let sdev = hex("sdev:")?;
    let mask = hex("mask:")? as u32;
    let handle_type = hex("fhandle-type:")? as i32;
    let bytes: Vec<u8> = {
        let h = field("f_handle:")?;
        (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[i * 2..i * 2 + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("bad f_handle in {line:?}"))?
    };
    // The kernel's dev_t: major in the bits above 20.
    let (major, minor) = ((sdev >> 20) as u32, (sdev & 0xf_ffff) as u32);
    let path = path_of_handle(major, minor, handle_type, &bytes)
        .map_err(|e| format!("the file of inotify watch {wd} (inode {ino}): {e}"))?;
    Ok(InotifyWatch {
        wd,
        mask,
        path,
        ino,
        dev: libc::makedev(major, minor),
    })
}

/// The path of a file given by a file handle on the filesystem `major:minor`
/// (a mount of it is looked up in our mountinfo; needs CAP_DAC_READ_SEARCH).
fn path_of_handle(
    major: u32,
    minor: u32,
    handle_type: i32,
    handle: &[u8],
) -> Result<String, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let want = format!("{major}:{minor}");
    let mount = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str())).then(|| f.get(4).map(|m| m.to_string()))?
        })
        .ok_or_else(|| format!("no mount of device {want} here"))?;
    let mount_fd = std::fs::File::open(&mount).map_err(|e| format!("{mount}: {e}"))?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: the handle buffer is ours and well formed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "open_by_handle_at: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    if path.ends_with(" (deleted)") {
        return Err(format!("{path}: deleted"));
    }
    Ok(path)
}

/// Checks that each registration of the epoll set on `epfd` still refers
/// to the file open on its descriptor number in `pid` (a registration
/// outlives a `close` of its number when the file stays open elsewhere).
pub(crate) fn check_epoll(pid: i32, epfd: i32, items: &[EpollItem]) -> Result<(), String> {
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
                pid,
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
    use super::*;

    #[test]
    fn fdinfo_texts_of_this_kernel_parse() {
        let epoll = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t26\n\
            tfd:        5 events: 4000201d data:     7ffeda84b6b4  pos:0 ino:1a sdev:10\n\
            tfd:        3 events: 80000019 data: 1122334455667788  pos:0 ino:1a sdev:10\n";
        let (k, s) = parse("[eventpoll]", epoll).unwrap().unwrap();
        assert_eq!(k, FdKind::Epoll);
        assert_eq!(
            s,
            FdState::Epoll(vec![
                EpollItem {
                    fd: 5,
                    events: 0x4000_201d,
                    data: 0x7ffe_da84_b6b4
                },
                EpollItem {
                    fd: 3,
                    events: 0x8000_0019,
                    data: 0x1122_3344_5566_7788
                },
            ])
        );
        let ev = "pos:\t0\nflags:\t02\nmnt_id:\t16\nino:\t26\neventfd-count:                ff\neventfd-id: 1\neventfd-semaphore: 1\n";
        assert_eq!(
            parse("[eventfd]", ev).unwrap().unwrap().1,
            FdState::EventFd {
                count: 255,
                semaphore: true
            }
        );
        let tfd = "pos:\t0\nflags:\t02\nmnt_id:\t16\nino:\t26\nclockid: 1\nticks: 0\nsettime flags: 01\nit_value: (8, 999837282)\nit_interval: (2, 500000000)\n";
        assert_eq!(
            parse("[timerfd]", tfd).unwrap().unwrap().1,
            FdState::TimerFd {
                clockid: 1,
                abstime: true,
                value_ns: 8_999_837_282,
                interval_ns: 2_500_000_000,
                ticks: 0
            }
        );
        let sfd = "pos:\t0\nflags:\t02\nmnt_id:\t16\nino:\t26\nsigmask:\t0000000200004200\n";
        assert_eq!(
            parse("[signalfd]", sfd).unwrap().unwrap().1,
            FdState::SignalFd {
                mask: 0x2_0000_4200
            }
        );
        assert!(parse("[io_uring]", "").is_none());
        let pfd = "pos:\t0\nflags:\t02000002\nmnt_id:\t4\nino:\t2\nPid:\t7830\nNSpid:\t7830\n";
        assert_eq!(
            parse("[pidfd]", pfd).unwrap().unwrap().1,
            FdState::Pidfd { pid: 7830 }
        );
        let gone = "pos:\t0\nflags:\t02000002\nPid:\t-1\nNSpid:\t-1\n";
        assert!(parse("[pidfd]", gone).unwrap().is_err());
        // A watch whose handle cannot be resolved is an error, not a guess.
        let bad = "pos:\t0\nflags:\t00\nmnt_id:\t16\nino:\t26\ninotify wd:1 ino:2 sdev:fff00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:0000000000000000\n";
        assert!(parse("inotify", bad).unwrap().is_err());
        assert!(parse("[eventfd]", "pos: 0\n").unwrap().is_err());
    }
}
