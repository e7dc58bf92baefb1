//! The controlling terminal. The slave of a pseudo-terminal pair whose
//! master is checkpointed with the process: the session leader takes the
//! new pair's slave again (`TIOCSCTTY`) as soon as its stub has its
//! session, before it makes children, which inherit it as they did; the
//! foreground process group is set again once every group exists
//! (`TIOCSPGRP`). A process of the session that had none gives up the one
//! it inherited (`TIOCNOTTY`). A terminal outside the checkpoint is a
//! shell job's: refused unless the dump is asked for `--shell-job`; such a
//! process stays in the restorer's session and gets the restorer's
//! terminal. The descriptors are [`crate::fd::tty`]'s.

use std::os::fd::AsFd as _;

use cr_ebpf_image::{Ctty, FdKind, Manifest, ProcessInfo, Terminal as Saved, TtyRole};

use super::{Phase, ProcessKind, SaveCx};
use crate::{
    error::proc_err,
    fd::{tty, Shared},
    proc,
    sys::Sys,
    RestoreError, SaveError,
};

/// The controlling terminal.
pub struct Terminal;

/// `major:minor` of a `tty_nr` of `/proc/PID/stat`.
fn device(tty_nr: i32) -> String {
    let (major, minor) = tty::decode_dev(tty_nr as u32);
    format!("{major}:{minor}")
}

/// The pairs whose master one of `pids` holds.
fn masters(pids: &[i32]) -> std::collections::HashSet<u32> {
    tty::Scope::scan(pids).masters
}

impl ProcessKind for Terminal {
    fn name(&self) -> &'static str {
        "controlling terminal"
    }

    fn phase(&self) -> Phase {
        Phase::Process
    }

    fn save(&self, cx: &mut SaveCx<'_>, p: &mut ProcessInfo) -> Result<(), SaveError> {
        let pid = cx.pid;
        let stat = |pid: i32| proc::stat(pid).map_err(proc_err(pid, format!("/proc/{pid}/stat")));
        let st = stat(pid)?;
        let outside_session = !cx.together.contains(&st.sid);
        let ctty = match tty::ctty_index(st.tty_nr) {
            _ if st.tty_nr == 0 => Ctty::None,
            Some(i) if masters(cx.together).contains(&i) => Ctty::Pty(i),
            _ if cx.shell_job => Ctty::Outside,
            _ => {
                return Err(cx.refuse(format!(
                    "a controlling terminal outside the checkpoint (device {}), a shell \
                     job's: `cr-ebpf dump --shell-job` checkpoints it, and `restore \
                     --shell-job` gives it cr-ebpf's own terminal; or start it detached \
                     (setsid, stdio not on a terminal)",
                    device(st.tty_nr)
                )));
            }
        };
        // A shell job that was its terminal's foreground job.
        let mut foreground = if ctty == Ctty::Outside && st.tpgid > 0 && st.tpgid == st.pgid {
            st.tpgid
        } else {
            0
        };
        if let Ctty::Pty(i) = ctty {
            if st.sid != pid {
                // Only a session leader takes a terminal: the others inherit it.
                let parent = stat(st.ppid).ok();
                if outside_session
                    || parent.is_none_or(|pp| pp.sid != st.sid || pp.tty_nr != st.tty_nr)
                {
                    return Err(cx.refuse(format!(
                        "a controlling terminal (pair {i}) its parent in the same session \
                         does not have: it could not inherit it at restore"
                    )));
                }
            }
            if st.tpgid > 0 {
                if !cx.together.contains(&st.tpgid) {
                    return Err(cx.refuse(format!(
                        "a controlling terminal (pair {i}) whose foreground process group \
                         {} is not led by a process checkpointed with it",
                        st.tpgid
                    )));
                }
                foreground = st.tpgid;
            }
        }
        p.terminal = Some(Saved {
            ctty,
            shell_job: cx.shell_job && (outside_session || ctty == Ctty::Outside),
            foreground,
        });
        Ok(())
    }

    fn restore(&self, _sys: &dyn Sys, _p: &ProcessInfo) -> Result<(), RestoreError> {
        // Done as the stub is made: take_controlling, set_foreground.
        Ok(())
    }
}

/// Whether restoring `m` needs `restore --shell-job`.
pub fn needs_shell_job(m: &Manifest) -> bool {
    m.process.terminal.is_some_and(|t| t.shell_job)
        || m.fds.iter().any(
            |f| matches!(&f.state, cr_ebpf_image::FdState::Tty(t) if t.role == TtyRole::Outside),
        )
}

/// Checks cr-ebpf can give a shell job its terminal: its standard input
/// is a terminal, its controlling terminal.
pub fn check_shell_job_terminal() -> Result<(), RestoreError> {
    let mut sid: libc::pid_t = 0;
    // SAFETY: TIOCGSID writes one pid_t.
    let r = unsafe { libc::ioctl(0, libc::TIOCGSID, &mut sid) };
    // SAFETY: plain syscall.
    if r < 0 || sid != unsafe { libc::getsid(0) } {
        return Err(RestoreError::NotSupported(
            "--shell-job: cr-ebpf's standard input is not its controlling terminal, which \
             the restored shell job would get"
                .into(),
        ));
    }
    Ok(())
}

/// Gives the stub of process `p`, just made and in its session (its
/// controlling terminal now `current`, a `tty_nr`), the controlling
/// terminal `p` had: run before it makes children of its own.
pub fn take_controlling(
    sys: &dyn Sys,
    shared: &Shared,
    p: &ProcessInfo,
    current: i32,
) -> Result<(), RestoreError> {
    let Some(t) = p.terminal else {
        return Ok(()); // an image older than 1.8 had no terminal
    };
    match t.ctty {
        Ctty::Pty(i) => {
            let master = shared.get(FdKind::Tty, i as u64, 0, -1)?;
            if p.sid == p.pid {
                let peer =
                    tty::open_peer(master, libc::O_RDWR).map_err(|err| RestoreError::Syscall {
                        call: "TIOCGPTPEER".into(),
                        err,
                    })?;
                let fd = sys.adopt(peer.as_fd())?;
                sys.call(
                    "ioctl(TIOCSCTTY)",
                    libc::SYS_ioctl,
                    [fd as u64, libc::TIOCSCTTY, 0, 0, 0, 0],
                )?;
                sys.close(fd)?;
                return Ok(());
            }
            let now = tty::pair_index(master).ok();
            if tty::ctty_index(current) != now || now.is_none() {
                return Err(RestoreError::NotSupported(format!(
                    "process {} did not inherit its controlling terminal (pair {i}) from \
                     its parent",
                    p.pid
                )));
            }
        }
        Ctty::None if current != 0 => {
            let fd = sys.openat("/dev/tty", libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)?;
            sys.call(
                "ioctl(TIOCNOTTY)",
                libc::SYS_ioctl,
                [fd as u64, libc::TIOCNOTTY, 0, 0, 0, 0],
            )?;
            sys.close(fd)?;
        }
        Ctty::None => {}
        Ctty::Outside if current == 0 => {
            return Err(RestoreError::NotSupported(
                "--shell-job: cr-ebpf has no controlling terminal to give the shell job".into(),
            ));
        }
        Ctty::Outside => {}
    }
    Ok(())
}

/// Makes the foreground process group of the terminal that session leader
/// `p` controls the one it was, once every group exists. A shell job that
/// was the foreground job and led its group gets the foreground of the
/// restorer's terminal when the restorer has it (as a shell's `fg` does;
/// `cr-ebpf restore` takes it back when the job ends).
pub fn set_foreground(sys: &dyn Sys, p: &ProcessInfo) -> Result<(), RestoreError> {
    let Some(t) = p.terminal else {
        return Ok(());
    };
    let wanted = match t.ctty {
        Ctty::Pty(_) => t.foreground > 0 && p.sid == p.pid,
        Ctty::Outside => {
            // SAFETY: plain calls on our standard input.
            let ours = unsafe { libc::tcgetpgrp(0) == libc::getpgrp() };
            t.foreground == p.pid && p.pgid == p.pid && ours
        }
        Ctty::None => false,
    };
    if !wanted {
        return Ok(());
    }
    let fd = sys.openat("/dev/tty", libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)?;
    let at = sys.put(2048, &t.foreground.to_le_bytes())?;
    sys.call(
        "ioctl(TIOCSPGRP)",
        libc::SYS_ioctl,
        [fd as u64, libc::TIOCSPGRP, at, 0, 0, 0],
    )?;
    sys.close(fd)
}

#[cfg(test)]
mod tests {
    use cr_ebpf_image::{FdInfo, FdState, PtyPair, TtyInfo, TERMIOS_LEN};

    use super::*;
    use crate::sys::fake::{Event, Recording};

    fn process(pid: i32, sid: i32, ctty: Ctty, shell_job: bool, foreground: i32) -> ProcessInfo {
        ProcessInfo {
            pid,
            sid,
            pgid: pid,
            terminal: Some(Saved {
                ctty,
                shell_job,
                foreground,
            }),
            ..ProcessInfo::default()
        }
    }

    /// A new pair of ours kept as pair 9 of a restore.
    fn shared_pair() -> Shared {
        let mut termios = vec![0u8; TERMIOS_LEN];
        termios[12] = 0x3b; // c_lflag: ISIG | ICANON | ECHO | ECHOE | ECHOK
        let master = tty::make_pair(&PtyPair {
            termios,
            winsize: [10, 20, 0, 0],
            mode: 0o620,
            ..PtyPair::default()
        })
        .unwrap();
        let mut shared = Shared::default();
        shared.insert(FdKind::Tty, 9, 0, master);
        shared
    }

    #[test]
    fn a_session_leader_takes_the_new_slave_and_the_others_inherit_it() {
        let shared = shared_pair();
        let leader = process(50, 50, Ctty::Pty(9), false, 51);
        let rec = Recording::new();
        take_controlling(&rec, &shared, &leader, 0).unwrap();
        assert_eq!(rec.names(), ["adopt", "ioctl(TIOCSCTTY)", "close"]);
        assert!(
            matches!(rec.events()[0], Event::Adopt { .. }),
            "the slave handed over"
        );
        assert_eq!(rec.calls("ioctl(TIOCSCTTY)")[0][1], libc::TIOCSCTTY);
        // A process of its session made after it: inherited, nothing to do.
        let new = tty::pair_index(shared.get(FdKind::Tty, 9, 0, 0).unwrap()).unwrap();
        let member = process(51, 50, Ctty::Pty(9), false, 51);
        let rec = Recording::new();
        let inherited = (136 << 8) | (new as i32 & 0xff) | ((new as i32 & !0xff) << 12);
        take_controlling(&rec, &shared, &member, inherited).unwrap();
        assert!(rec.events().is_empty());
        // One that did not inherit it: an error, not a silent difference.
        assert!(take_controlling(&Recording::new(), &shared, &member, 0).is_err());
        // The foreground group, set by the leader only.
        let rec = Recording::new();
        set_foreground(&rec, &leader).unwrap();
        assert_eq!(rec.names(), ["openat", "ioctl(TIOCSPGRP)", "close"]);
        let at = rec.calls("ioctl(TIOCSPGRP)")[0][2];
        assert_eq!(
            rec.memory("ioctl(TIOCSPGRP)", 0, at, 4),
            51i32.to_le_bytes()
        );
        assert_eq!(rec.string(rec.calls("openat")[0][1]), "/dev/tty");
        let rec = Recording::new();
        set_foreground(&rec, &member).unwrap();
        assert!(rec.events().is_empty());
    }

    #[test]
    fn one_without_a_terminal_gives_up_an_inherited_one() {
        let shared = Shared::default();
        let p = process(60, 50, Ctty::None, false, 0);
        let rec = Recording::new();
        take_controlling(&rec, &shared, &p, 136 << 8).unwrap();
        assert_eq!(rec.names(), ["openat", "ioctl(TIOCNOTTY)", "close"]);
        let rec = Recording::new();
        take_controlling(&rec, &shared, &p, 0).unwrap();
        assert!(rec.events().is_empty());
        // An image older than 1.8: nothing.
        let rec = Recording::new();
        take_controlling(&rec, &shared, &ProcessInfo::default(), 136 << 8).unwrap();
        assert!(rec.events().is_empty());
    }

    #[test]
    fn a_shell_job_keeps_the_restorers_terminal_and_needs_the_option() {
        let shared = Shared::default();
        let job = process(70, 5, Ctty::Outside, true, 0);
        let rec = Recording::new();
        take_controlling(&rec, &shared, &job, 136 << 8 | 4).unwrap();
        assert!(rec.events().is_empty(), "the stub already has ours");
        assert!(
            take_controlling(&rec, &shared, &job, 0).is_err(),
            "we have none"
        );
        let m = Manifest {
            process: job,
            ..Manifest::default()
        };
        assert!(needs_shell_job(&m));
        let fd = FdInfo {
            fd: 0,
            kind: FdKind::Tty,
            state: FdState::Tty(TtyInfo {
                role: TtyRole::Outside,
                ..TtyInfo::default()
            }),
            ..FdInfo::default()
        };
        let m = Manifest {
            fds: vec![fd],
            ..Manifest::default()
        };
        assert!(needs_shell_job(&m));
        assert!(!needs_shell_job(&Manifest::default()));
        // Its group, led outside, stays the restorer's.
        let mut job = process(70, 5, Ctty::Outside, true, 0);
        job.pgid = 5;
        let rec = Recording::new();
        rec.returns("getsid", 5);
        rec.returns("getpgid", 6);
        super::super::session::Session.restore(&rec, &job).unwrap();
        assert_eq!(rec.names(), ["getsid", "getpgid"]);
    }

    #[test]
    fn terminal_devices_are_named_as_the_kernel_encodes_them() {
        // /dev/pts/3 is 136:3; /dev/tty1 is 4:1; minors past 255 in the high bits.
        assert_eq!(device(136 << 8 | 3), "136:3");
        assert_eq!(device(4 << 8 | 1), "4:1");
        assert_eq!(device((136 << 8) | (0x3 << 20) | 4), "136:772");
        assert_eq!(tty::ctty_index((136 << 8) | (0x3 << 20) | 4), Some(772));
        assert_eq!(tty::ctty_index(4 << 8 | 1), None);
        assert_eq!(tty::ctty_index(0), None);
    }
}
