//! The bytes waiting in a pseudo-terminal pair: what the slave side wrote
//! and the master has not read yet, and what was written on the master
//! and waits, after the slave's input processing, for a reader of the
//! slave (line by line on a canonical terminal).
//!
//! A terminal's queues cannot be peeked at: [`take`] reads them (the
//! process is frozen) and writes them straight back, so the process finds
//! them as they were; [`put`] writes them into a pair, at restore and for
//! that write-back. Bytes for the master are written on the slave with
//! output processing off; bytes for the slave on the master with echo,
//! signals and input translation off, and, on a canonical terminal, every
//! byte the line discipline would act on quoted with `VLNEXT`, each line
//! ended as it was (its delimiter, or `VEOF`), the last one left open if it
//! was. Each step polls the end that receives, which makes the kernel hand
//! the bytes to its line discipline before the settings change back.

use std::os::fd::{AsRawFd as _, OwnedFd};

use cr_ebpf_image::{LineEnd, QueuedInput, TERMIOS_LEN};

/// Offsets in `struct termios2`.
const IFLAG: usize = 0;
const OFLAG: usize = 4;
const LFLAG: usize = 12;
const CC: usize = 17;

fn flag(t: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(t[at..at + 4].try_into().expect("4 bytes"))
}

fn set_flag(t: &mut [u8], at: usize, v: u32) {
    t[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn cc(t: &[u8], i: usize) -> u8 {
    t[CC + i]
}

/// `TCGETS2` of `fd`.
pub fn get(fd: &OwnedFd) -> std::io::Result<[u8; TERMIOS_LEN]> {
    let mut t = [0u8; TERMIOS_LEN];
    // SAFETY: TCGETS2 writes a struct termios2 (TERMIOS_LEN bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS2, t.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

/// `TCSETS2` of `fd`.
fn set(fd: &OwnedFd, t: &[u8]) -> std::io::Result<()> {
    debug_assert_eq!(t.len(), TERMIOS_LEN);
    // SAFETY: TCSETS2 reads a struct termios2 (TERMIOS_LEN bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS2, t.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A poll of `fd` without waiting: the kernel hands the bytes still in its
/// flip buffers to the line discipline. Whether it is readable.
fn flush(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll of one descriptor of ours, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
}

/// One read into `buf`: `Ok(None)` when nothing is there (`EAGAIN`).
fn read(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    // SAFETY: reading into our own buffer of that length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// Writes all of `bytes` to `fd`, which has room for them.
fn write_all(fd: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        // SAFETY: writing from our own buffer.
        let n = unsafe {
            libc::write(
                fd.as_raw_fd(),
                bytes[at..].as_ptr().cast(),
                bytes.len() - at,
            )
        };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            return Err(if n == 0 {
                std::io::ErrorKind::WriteZero.into()
            } else {
                e
            });
        }
        at += n as usize;
    }
    Ok(())
}

/// Reads what waits on the master `master` (a raw terminal: all that is
/// there is readable), until a poll, which makes the kernel hand over what
/// its flip buffers still hold when nothing is readable, finds nothing.
fn read_master(master: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    while flush(master) {
        match read(master, &mut buf)? {
            Some(0) | None => break,
            Some(k) => out.extend_from_slice(&buf[..k]),
        }
        if out.len() > 1 << 20 {
            return Err(std::io::Error::other(
                "more than 1 MiB waiting on the master",
            ));
        }
    }
    Ok(out)
}

/// Hands `bytes` to the line discipline of `slave` as if received, one by
/// one and at once (`TIOCSTI`), under the settings in effect: unlike a
/// write on the master, nothing waits in a flip buffer for settings that
/// change back.
fn receive(slave: &OwnedFd, bytes: &[u8]) -> std::io::Result<()> {
    for c in bytes {
        // SAFETY: TIOCSTI reads one byte.
        if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSTI, c as *const u8) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether the last byte of a canonical line delimits it (newline, `VEOL`,
/// `VEOL2`), rather than `VEOF`, which a read leaves out.
fn delimited(t: &[u8], line: &[u8]) -> bool {
    line.last().is_some_and(|&c| {
        c == b'\n'
            || [libc::VEOL, libc::VEOL2]
                .iter()
                .any(|&i| cc(t, i) != 0 && cc(t, i) == c)
    })
}

/// Reads what waits on the slave `slave` (non-blocking), whose settings
/// are `t`: line by line when canonical, then what is left of an
/// incomplete line (readable once canonical mode is off a moment).
fn read_slave(slave: &OwnedFd, t: &[u8]) -> std::io::Result<Vec<QueuedInput>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    let canonical = flag(t, LFLAG) & libc::ICANON != 0;
    flush(slave);
    if canonical {
        while let Some(n) = read(slave, &mut buf)? {
            let line = &buf[..n];
            let end = if delimited(t, line) {
                LineEnd::Delimiter
            } else {
                LineEnd::EndOfFile
            };
            out.push(QueuedInput {
                end,
                bytes: line.to_vec(),
            });
        }
        let mut raw = t.to_vec();
        set_flag(&mut raw, LFLAG, flag(t, LFLAG) & !libc::ICANON);
        set(slave, &raw)?;
    }
    let mut rest = Vec::new();
    let tail = (|| {
        while let Some(n) = read(slave, &mut buf)? {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })();
    if canonical {
        set(slave, t)?;
    }
    tail?;
    if !rest.is_empty() {
        out.push(QueuedInput {
            end: LineEnd::Open,
            bytes: rest,
        });
    }
    Ok(out)
}

/// The bytes to write on the master so that the slave, with settings `t`
/// while echo, signals and input translation are off, queues `q` again.
fn encode_input(t: &[u8], q: &[QueuedInput]) -> Vec<u8> {
    let canonical = flag(t, LFLAG) & libc::ICANON != 0;
    if !canonical {
        return q.iter().flat_map(|p| p.bytes.iter().copied()).collect();
    }
    let special: Vec<u8> = [
        libc::VERASE,
        libc::VKILL,
        libc::VEOF,
        libc::VEOL,
        libc::VEOL2,
        libc::VWERASE,
        libc::VREPRINT,
        libc::VLNEXT,
    ]
    .iter()
    .map(|&i| cc(t, i))
    .chain([b'\n', LNEXT])
    .filter(|&c| c != 0)
    .collect();
    let mut out = Vec::new();
    for p in q {
        let body = match p.end {
            LineEnd::Delimiter => &p.bytes[..p.bytes.len() - 1],
            _ => &p.bytes[..],
        };
        for &c in body {
            if special.contains(&c) {
                out.push(LNEXT);
            }
            out.push(c);
        }
        match p.end {
            LineEnd::Delimiter => out.extend_from_slice(&p.bytes[p.bytes.len() - 1..]),
            LineEnd::EndOfFile => out.push(cc(t, libc::VEOF)),
            _ => {}
        }
    }
    out
}

/// The quoting character used while writing a canonical queue back (`^V`).
const LNEXT: u8 = 0x16;

/// The settings under which [`encode_input`]'s bytes are written.
fn input_settings(t: &[u8]) -> Vec<u8> {
    let mut w = t.to_vec();
    let iflag = flag(t, IFLAG)
        & !(libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IUCLC
            | libc::IXON
            | libc::IXOFF
            | libc::PARMRK
            | libc::BRKINT
            | libc::IGNBRK);
    set_flag(&mut w, IFLAG, iflag);
    let mut lflag = flag(t, LFLAG)
        & !(libc::ECHO
            | libc::ECHOE
            | libc::ECHOK
            | libc::ECHONL
            | libc::ECHOCTL
            | libc::ECHOPRT
            | libc::ECHOKE
            | libc::ISIG
            | libc::EXTPROC);
    if lflag & libc::ICANON != 0 {
        lflag |= libc::IEXTEN;
        w[CC + libc::VLNEXT] = LNEXT;
    } else {
        lflag &= !libc::IEXTEN;
    }
    set_flag(&mut w, LFLAG, lflag);
    w
}

/// Writes the queues into the pair of `slave` (whose settings are `t`, the
/// pair's own, set back afterwards): `to_master` for its master to read,
/// `to_slave` for the slave.
pub fn put(
    slave: &OwnedFd,
    t: &[u8],
    to_master: &[u8],
    to_slave: &[QueuedInput],
) -> std::io::Result<()> {
    if to_master.is_empty() && to_slave.is_empty() {
        return Ok(());
    }
    let written = (|| {
        if !to_slave.is_empty() {
            set(slave, &input_settings(t))?;
            receive(slave, &encode_input(t, to_slave))?;
        }
        if !to_master.is_empty() {
            let mut w = t.to_vec();
            set_flag(&mut w, OFLAG, flag(t, OFLAG) & !libc::OPOST);
            set(slave, &w)?;
            write_all(slave, to_master)?;
        }
        Ok(())
    })();
    set(slave, t)?;
    written
}

/// The queues of the pair of `master` (the frozen process's, in blocking
/// mode perhaps) and `slave` (a non-blocking open file of ours), read and
/// written back: (for the master, for the slave). The slave's first: what
/// it receives meanwhile echoes to the master.
pub fn take(master: &OwnedFd, slave: &OwnedFd) -> std::io::Result<(Vec<u8>, Vec<QueuedInput>)> {
    let t = get(slave)?;
    let to_slave = read_slave(slave, &t)?;
    let to_master = match read_master(master) {
        Ok(b) => b,
        Err(e) => {
            put(slave, &t, &[], &to_slave)?;
            return Err(e);
        }
    };
    put(slave, &t, &to_master, &to_slave)?;
    Ok((to_master, to_slave))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd::tty::{make_pair, open_peer};
    use cr_ebpf_image::PtyPair;

    /// A new pair with `t` as its settings: (master, non-blocking slave).
    fn pair(t: &[u8]) -> (OwnedFd, OwnedFd) {
        let master = make_pair(&PtyPair {
            termios: t.to_vec(),
            winsize: [24, 80, 0, 0],
            mode: 0o620,
            ..PtyPair::default()
        })
        .unwrap();
        let slave = open_peer(&master, libc::O_RDWR | libc::O_NONBLOCK).unwrap();
        (master, slave)
    }

    fn write(fd: &OwnedFd, b: &[u8]) {
        write_all(fd, b).unwrap();
    }

    /// Everything a reader of `fd` gets, read by read (while a poll says
    /// there is something: the master is in blocking mode).
    fn drain(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while flush(fd) {
            let Ok(Some(n)) = read(fd, &mut buf) else {
                break;
            };
            out.push(buf[..n].to_vec());
            if n == 0 {
                break;
            }
        }
        out
    }

    /// The settings a new terminal starts with (canonical, echo, ICRNL,
    /// OPOST|ONLCR).
    fn defaults() -> [u8; TERMIOS_LEN] {
        use std::os::unix::fs::OpenOptionsExt as _;
        let m = std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/ptmx")
            .unwrap();
        let m = OwnedFd::from(m);
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int.
        unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &unlock) };
        get(&open_peer(&m, libc::O_RDWR).unwrap()).unwrap()
    }

    #[test]
    fn queues_are_taken_without_loss_and_put_into_a_new_pair() {
        if !std::path::Path::new("/dev/ptmx").exists() {
            assert!(std::env::var_os("CI").is_none(), "CI: no /dev/ptmx");
            return;
        }
        let t = defaults();
        let (m, s) = pair(&t);
        // Lines typed on the master (echoed back to it as "..\r\n"), one
        // with characters the line discipline acts on when quoted, an
        // end-of-file, an incomplete line; output of the slave.
        let veof = cc(&t, libc::VEOF);
        let verase = cc(&t, libc::VERASE);
        write(&m, b"hello\n");
        write(&m, &[b'a', LNEXT, verase, b'b', b'\n']);
        write(&m, &[b'x', b'y', veof]);
        write(&m, &[veof]);
        write(&m, b"part");
        write(&s, b"out\n");
        let (to_master, to_slave) = take(&m, &s).unwrap();
        let text = String::from_utf8_lossy(&to_master).into_owned();
        assert!(text.contains("out\r\n"), "{text:?}");
        assert!(text.contains("hello\r\n"), "echo: {text:?}");
        assert!(text.contains("xy"), "echo: {text:?}");
        let ends: Vec<LineEnd> = to_slave.iter().map(|q| q.end).collect();
        assert_eq!(
            ends,
            [
                LineEnd::Delimiter,
                LineEnd::Delimiter,
                LineEnd::EndOfFile,
                LineEnd::EndOfFile,
                LineEnd::Open
            ]
        );
        assert_eq!(to_slave[1].bytes, [b'a', verase, b'b', b'\n']);
        // Still there, read by read as before; the incomplete line stays.
        let expect_slave: Vec<Vec<u8>> = vec![
            b"hello\n".to_vec(),
            vec![b'a', verase, b'b', b'\n'],
            b"xy".to_vec(),
            Vec::new(),
        ];
        // A second pair gets the same from `put`.
        let (m2, s2) = pair(&t);
        put(&s2, &t, &to_master, &to_slave).unwrap();
        for (master, slave) in [(&m, &s), (&m2, &s2)] {
            assert_eq!(get(slave).unwrap(), t, "settings back");
            assert_eq!(drain(master).concat(), to_master);
            assert_eq!(drain(slave), expect_slave);
            write(master, b"\n");
            assert_eq!(drain(slave), [b"part\n".to_vec()], "the open line goes on");
        }
    }

    #[test]
    fn a_raw_terminals_queue_is_taken_whole() {
        if !std::path::Path::new("/dev/ptmx").exists() {
            assert!(std::env::var_os("CI").is_none(), "CI: no /dev/ptmx");
            return;
        }
        let mut t = defaults();
        set_flag(&mut t, LFLAG, 0);
        set_flag(&mut t, IFLAG, libc::ICRNL);
        let (m, s) = pair(&t);
        write(&m, b"a\rb\x03\x7f");
        let (to_master, to_slave) = take(&m, &s).unwrap();
        assert!(to_master.is_empty());
        assert_eq!(to_slave.len(), 1);
        assert_eq!(to_slave[0].bytes, b"a\nb\x03\x7f");
        let (_m2, s2) = pair(&t);
        put(&s2, &t, &to_master, &to_slave).unwrap();
        for slave in [&s, &s2] {
            assert_eq!(drain(slave).concat(), b"a\nb\x03\x7f");
        }
    }
}
