//! Round trips and refusals of terminals, on pairs of the test process.

use std::os::fd::AsRawFd as _;

use super::*;
use crate::fd::testing;

/// A pair of ours with a 24x90 window: (master, slave).
fn our_pair() -> (OwnedFd, OwnedFd) {
    let master = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_noctty()
            .open("/dev/ptmx")
            .unwrap(),
    );
    let off: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &off) };
    assert_eq!(r, 0);
    let slave = open_peer(&master, libc::O_RDWR).unwrap();
    let ws = [24u16, 90, 0, 0];
    // SAFETY: TIOCSWINSZ reads a struct winsize.
    let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, ws.as_ptr()) };
    assert_eq!(r, 0);
    (master, slave)
}

fn tty_state(f: &FdInfo) -> &TtyInfo {
    state(f).unwrap()
}

#[test]
fn a_pair_comes_back_as_a_new_pair_with_its_settings_and_open_files() {
    let (master, slave) = our_pair();
    let again = open_peer(&master, libc::O_RDONLY).unwrap();
    let dup = slave.try_clone().unwrap();
    let saved = testing::save_own_many(&[
        master.as_raw_fd(),
        slave.as_raw_fd(),
        again.as_raw_fd(),
        dup.as_raw_fd(),
    ]);
    assert!(saved.iter().all(|f| f.kind == FdKind::Tty));
    let index = pair_index(&master).unwrap();
    let roles: Vec<(TtyRole, u16, u32)> = saved
        .iter()
        .map(tty_state)
        .map(|t| (t.role, t.open, t.index))
        .collect();
    assert_eq!(
        roles,
        [
            (TtyRole::Master, 0, index),
            (TtyRole::Slave, 0, index),
            (TtyRole::Slave, 1, index),
            (TtyRole::Slave, 0, index)
        ],
        "a dup shares its open file, a second open has its own"
    );
    let pair = tty_state(&saved[0]).pair.clone().unwrap();
    assert_eq!(pair.winsize, [24, 90, 0, 0]);

    let m = testing::manifest(saved.clone());
    let (rec, shared) = testing::restore_keeping(&m);
    let new_master = shared.get(FdKind::Tty, index as u64, 0, 0).unwrap();
    assert_ne!(pair_index(new_master).unwrap(), index, "a new pair");
    let ours: Vec<i32> = rec
        .events()
        .iter()
        .filter_map(|e| match e {
            crate::sys::fake::Event::Adopt { ours, .. } => Some(*ours),
            _ => None,
        })
        .collect();
    let part = |p| {
        shared
            .get(FdKind::Tty, index as u64, p, 0)
            .unwrap()
            .as_raw_fd()
    };
    assert_eq!(ours, [part(0), part(1), part(2), part(1)]);
    // The new slave has the old one's termios and window size.
    let peer = open_peer(new_master, libc::O_RDWR).unwrap();
    let mut t = [0u8; TERMIOS_LEN];
    let mut ws = [0u16; 4];
    // SAFETY: TCGETS2 and TIOCGWINSZ write into our buffers.
    unsafe {
        assert_eq!(
            libc::ioctl(peer.as_raw_fd(), libc::TCGETS2, t.as_mut_ptr()),
            0
        );
        assert_eq!(
            libc::ioctl(peer.as_raw_fd(), libc::TIOCGWINSZ, ws.as_mut_ptr()),
            0
        );
    }
    assert_eq!((t.to_vec(), ws), (pair.termios, pair.winsize));
    // Written into the new master, read from the slave it handed over.
    // SAFETY: our buffers and descriptors.
    unsafe {
        assert_eq!(
            libc::write(new_master.as_raw_fd(), b"x\n".as_ptr().cast(), 2),
            2
        );
        let mut buf = [0u8; 8];
        let n = libc::read(part(1), buf.as_mut_ptr().cast(), 8);
        assert_eq!(&buf[..n as usize], b"x\n");
    }
}

#[test]
fn unread_bytes_are_taken_and_left_a_closed_slave_and_a_foreign_slave_are_refused() {
    let (master, slave) = our_pair();
    // SAFETY: writing our buffer into our master.
    let n = unsafe { libc::write(master.as_raw_fd(), b"ls\n".as_ptr().cast(), 3) };
    assert_eq!(n, 3);
    let me = std::process::id() as i32;
    let save = |fd: i32| {
        let mut owner = testing::SaveOwner::new();
        owner.scope = crate::fd::TreeScope::new(&[me]);
        let mut cx = owner.cx();
        Tty.save(&mut cx, &testing::seen(fd)).expect("claimed")
    };
    let info = save(master.as_raw_fd()).unwrap();
    let FdState::Tty(t) = &info.state else {
        panic!("{info:?}")
    };
    let p = t.pair.as_ref().unwrap();
    assert_eq!(p.master_queue, b"ls\r\n", "the echo");
    assert_eq!(p.slave_queue.len(), 1);
    assert_eq!(p.slave_queue[0].bytes, b"ls\n");
    // The bytes are still there for the slave.
    let mut buf = [0u8; 8];
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(slave.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    assert_eq!(&buf[..n as usize], b"ls\n");
    // And its echo for the master.
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    assert_eq!(&buf[..n as usize], b"ls\r\n");
    // In packet mode they are refused.
    let on: libc::c_int = 1;
    // SAFETY: TIOCPKT reads one int; writing our buffer.
    unsafe {
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCPKT, &on), 0);
        assert_eq!(libc::write(slave.as_raw_fd(), b"z".as_ptr().cast(), 1), 1);
    }
    let err = save(master.as_raw_fd()).unwrap_err().to_string();
    assert!(err.contains("waiting to be read"), "{err}");
    assert!(err.contains("packet mode"), "{err}");
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    assert_eq!(&buf[..n as usize], b"\0z", "left as it was");
    let info = save(master.as_raw_fd()).expect("nothing waiting any more");
    let FdState::Tty(t) = &info.state else {
        panic!("{info:?}")
    };
    assert!(t.pair.as_ref().unwrap().master_queue.is_empty());
    drop(slave);
    let err = save(master.as_raw_fd()).unwrap_err().to_string();
    assert!(err.contains("slave is closed everywhere"), "{err}");
    // A slave whose master is not checkpointed (not in the scope).
    let (_m2, s2) = our_pair();
    let mut owner = testing::SaveOwner::new();
    let err = Tty
        .save(&mut owner.cx(), &testing::seen(s2.as_raw_fd()))
        .expect("claimed")
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither a pseudo-terminal pair"), "{err}");
}

#[test]
fn device_numbers_decode_as_the_kernel_encodes_them() {
    assert_eq!(pts_index(136, 5), Some(5));
    assert_eq!(pts_index(137, 1), Some(257));
    assert_eq!(pts_index(4, 1), None);
    assert_eq!(decode_dev((136 << 8) | 7), (136, 7));
    assert!(is_terminal(5) && is_terminal(4) && is_terminal(143) && !is_terminal(1));
}

/// A terminal device outside the checkpoint that is not its controlling
/// terminal (here the console, through a node of its own as ZDTM's
/// `console` makes) is opened again by its path, as one open file for its
/// duplicates; a path that is now another device is named; a removed node
/// is refused.
#[test]
fn a_console_is_opened_again_by_its_path_and_must_still_be_the_console() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
        eprintln!("skipped: making a device node needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cr-ebpf-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node = dir.join("console");
    let mknod = |dev: libc::dev_t| {
        let _ = std::fs::remove_file(&node);
        let path = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path of ours.
        let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, dev) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    };
    mknod(libc::makedev(5, 1));
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_noctty()
        .open(&node)
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the console opens in CI"
        );
        eprintln!("skipped: this machine's console does not open");
        return;
    };
    let fd = OwnedFd::from(f);
    let dup = fd.try_clone().unwrap();
    let saved = testing::save_own_many(&[fd.as_raw_fd(), dup.as_raw_fd()]);
    let roles: Vec<(TtyRole, u16, u32)> = saved
        .iter()
        .map(tty_state)
        .map(|t| (t.role, t.open, t.index))
        .collect();
    let dev = encode_dev(5, 1);
    assert_eq!(
        roles,
        [(TtyRole::Device, 0, dev), (TtyRole::Device, 0, dev)]
    );
    let (rec, shared) = testing::restore_keeping(&testing::manifest(saved.clone()));
    let again = shared
        .get(FdKind::Tty, DEVICE | u64::from(dev), 1, 0)
        .unwrap();
    let meta = std::fs::File::from(again.try_clone().unwrap())
        .metadata()
        .unwrap();
    assert_eq!((libc::major(meta.rdev()), libc::minor(meta.rdev())), (5, 1));
    // SAFETY: isatty on our descriptor.
    assert_eq!(unsafe { libc::isatty(again.as_raw_fd()) }, 1);
    let adopted = rec
        .events()
        .iter()
        .filter(|e| matches!(e, crate::sys::fake::Event::Adopt { ours, .. } if *ours == again.as_raw_fd()))
        .count();
    assert_eq!(adopted, 2, "one open file for both descriptors");
    // The node is now /dev/null's device: named, not opened as it.
    mknod(libc::makedev(1, 3));
    let err = crate::fd::prepare(&[&testing::manifest(saved)], &crate::fd::Prepare::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("terminal device 5:1, is now device 1:3"),
        "{err}"
    );
    // A removed node cannot be opened again.
    mknod(libc::makedev(5, 1));
    let fd = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_noctty()
            .open(&node)
            .unwrap(),
    );
    std::fs::remove_file(&node).unwrap();
    let mut owner = testing::SaveOwner::new();
    let err = Tty
        .save(&mut owner.cx(), &testing::seen(fd.as_raw_fd()))
        .expect("claimed")
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither a pseudo-terminal pair"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
