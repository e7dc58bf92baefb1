//! Credentials and seccomp, thread by thread (the kernel keeps them per
//! thread): real, effective, saved and filesystem uids and gids,
//! supplementary groups, the five capability sets, securebits,
//! no_new_privs, the audit login uid, the seccomp mode and filters.
//!
//! Saved with each thread while the process is frozen ([`save`]: `/proc`,
//! an injected `PR_GET_SECUREBITS`, `PTRACE_SECCOMP_GET_FILTER`); set again
//! last, once everything that needs privilege is done ([`restore`]), in
//! the order the kernel needs: inheritable and ambient capabilities while
//! every capability is still held, the bounding set, the login uid,
//! groups, then the uids and gids with `SECBIT_NO_SETUID_FIXUP` (so no
//! capability changes behind our back), the securebits, the filters, and
//! only then the capability sets themselves and no_new_privs. Seccomp
//! filters are suspended in the threads while the restorer holds them
//! (`PTRACE_O_SUSPEND_SECCOMP`), so they act only once the process runs.
//! Filters every thread of a process has are installed once with
//! `SECCOMP_FILTER_FLAG_TSYNC` ([`shared_filters`]), so they are one again.

use cr_ebpf_image::{SeccompFilter, ThreadCreds, ThreadInfo};
use cr_ebpf_tracee::{Injector, Tracee};

use crate::{error::proc_err, proc::Status, sys::Sys, RestoreError, SaveError};

const PR_SET_SECCOMP: u64 = 22;
const PR_CAPBSET_DROP: u64 = 24;
const PR_GET_SECUREBITS: u64 = 27;
const PR_SET_SECUREBITS: u64 = 28;
const PR_SET_NO_NEW_PRIVS: u64 = 38;
const PR_CAP_AMBIENT: u64 = 47;
const PR_CAP_AMBIENT_RAISE: u64 = 2;
const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
/// `SECBIT_NO_SETUID_FIXUP`: uid changes leave the capabilities alone.
const SECBIT_NO_SETUID_FIXUP: u32 = 1 << 2;
/// The securebits that are not locks.
const SECBITS_UNLOCKED: u32 = 0x55;
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;
/// Most supplementary groups the scratch page holds.
const GROUPS_MAX: usize = 1000;

/// Indexes of [`ThreadCreds::caps`].
const EFF: usize = 0;
const PRM: usize = 1;
const INH: usize = 2;
const BND: usize = 3;
const AMB: usize = 4;
/// The `/proc/PID/status` fields of the capability sets, in that order.
const CAP_FIELDS: [&str; 5] = ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"];

/// What `/proc` shows of a thread's credentials (`status` and `loginuid`);
/// securebits and filters are left 0 and empty.
pub fn from_status(status: &Status, loginuid: Option<&str>) -> std::io::Result<ThreadCreds> {
    let ids = |key: &str| -> std::io::Result<[u32; 4]> {
        let v: Vec<u32> = status
            .field(key)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(std::io::Error::other)?;
        v.try_into()
            .map_err(|_| std::io::Error::other(format!("{key} of status is not four ids")))
    };
    let mut c = ThreadCreds {
        uids: ids("Uid")?,
        gids: ids("Gid")?,
        groups: status
            .field("Groups")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(std::io::Error::other)?,
        no_new_privs: status.number("NoNewPrivs", 10)? != 0,
        seccomp_mode: status.number("Seccomp", 10)? as u32,
        loginuid: match loginuid {
            Some(v) => v.trim().parse().map_err(std::io::Error::other)?,
            None => u32::MAX,
        },
        ..ThreadCreds::default()
    };
    for (i, key) in CAP_FIELDS.iter().enumerate() {
        c.caps[i] = status.number(key, 16)?;
    }
    Ok(c)
}

/// The restorer's own credentials: what every stub starts with.
pub fn ours() -> Result<ThreadCreds, RestoreError> {
    let err = |e: std::io::Error| {
        RestoreError::NotSupported(format!("reading cr-ebpf's own credentials: {e}"))
    };
    let status =
        Status::from_text(std::fs::read_to_string("/proc/thread-self/status").map_err(err)?);
    let loginuid = std::fs::read_to_string("/proc/thread-self/loginuid").ok();
    let mut c = from_status(&status, loginuid.as_deref()).map_err(err)?;
    // SAFETY: PR_GET_SECUREBITS takes no pointer.
    c.securebits = unsafe { libc::prctl(PR_GET_SECUREBITS as i32, 0, 0, 0, 0) }.max(0) as u32;
    Ok(c)
}

/// The credentials and seccomp state of the stopped thread `t` of `pid`
/// (its securebits asked unless `securebits` gives them). A filter cr-ebpf
/// cannot read, or with flags it cannot set again, is refused.
pub fn save(
    pid: i32,
    injector: &Injector,
    t: &Tracee,
    securebits: Option<u32>,
) -> Result<ThreadCreds, SaveError> {
    let tid = t.tid();
    let path = format!("/proc/{pid}/task/{tid}/status");
    let status = Status::of_thread(pid, tid).map_err(proc_err(pid, path.clone()))?;
    let loginuid = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/loginuid")).ok();
    let mut c = from_status(&status, loginuid.as_deref()).map_err(proc_err(pid, path))?;
    let refuse = |what: String| SaveError::NotSupported { pid, what };
    let bits = match securebits {
        Some(b) => i64::from(b),
        None => injector
            .call(t, libc::SYS_prctl, [PR_GET_SECUREBITS, 0, 0, 0, 0, 0])
            .map_err(|source| SaveError::Trace { pid, source })?,
    };
    c.securebits = u32::try_from(bits).map_err(|_| {
        refuse(format!(
            "securebits of thread {tid} that cannot be read ({bits})"
        ))
    })?;
    match c.seccomp_mode {
        0 | 1 => {}
        2 => {
            let filters = t.seccomp_filters().map_err(|e| {
                refuse(format!(
                    "seccomp filters of thread {tid} that cr-ebpf cannot read ({e}; reading \
                     them needs CAP_SYS_ADMIN and a cr-ebpf not itself under seccomp)"
                ))
            })?;
            if let Some(n) = status.field("Seccomp_filters") {
                if n.parse() != Ok(filters.len()) {
                    return Err(refuse(format!(
                        "seccomp filters of thread {tid} that changed while they were read \
                         ({n} in its status, {} read)",
                        filters.len()
                    )));
                }
            }
            for (flags, prog) in filters {
                if notifies(&prog) {
                    return Err(refuse(format!(
                        "a seccomp filter of thread {tid} that hands syscalls to a supervisor \
                         (SECCOMP_RET_USER_NOTIF): its listener is not carried"
                    )));
                }
                if flags & !u64::from(cr_ebpf_image::SECCOMP_FILTER_LOG) != 0 {
                    return Err(refuse(format!(
                        "a seccomp filter of thread {tid} with flags {flags:#x} (only \
                         SECCOMP_FILTER_FLAG_LOG is carried)"
                    )));
                }
                c.seccomp_filters.push(SeccompFilter {
                    flags: flags as u32,
                    prog,
                });
            }
        }
        mode => return Err(refuse(format!("seccomp mode {mode} of thread {tid}"))),
    }
    Ok(c)
}

/// Whether a filter program can return `SECCOMP_RET_USER_NOTIF` (a
/// `BPF_RET | BPF_K` with that action).
pub fn notifies(prog: &[u8]) -> bool {
    prog.chunks_exact(8).any(|insn| {
        let code = u16::from_le_bytes([insn[0], insn[1]]);
        let k = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        code == 0x06 && k & 0xffff_0000 == 0x7fc0_0000
    })
}

/// How many of the oldest filters every thread of the process has: they
/// are installed once, synchronised to every thread (`TSYNC`). Threads
/// that share filters beyond those are refused by [`check_sharing`].
pub fn shared_filters(threads: &[ThreadInfo]) -> usize {
    let chains: Vec<&[SeccompFilter]> = threads
        .iter()
        .map(|t| t.creds.as_ref().map_or(&[][..], |c| &c.seccomp_filters))
        .collect();
    if chains.len() < 2 {
        return 0;
    }
    let first = chains[0];
    (0..first.len())
        .take_while(|&i| chains.iter().all(|c| c.get(i) == Some(&first[i])))
        .count()
}

/// Filters that some threads of a process have in common but not all
/// cannot be shared again (`TSYNC` reaches every thread): refused, since a
/// later `TSYNC` of the process would then fail. Returns what to refuse.
pub fn check_sharing(threads: &[ThreadInfo]) -> Option<String> {
    let shared = shared_filters(threads);
    let next = |t: &ThreadInfo| {
        t.creds
            .as_ref()
            .and_then(|c| c.seccomp_filters.get(shared).cloned())
    };
    for (i, a) in threads.iter().enumerate() {
        let Some(fa) = next(a) else { continue };
        if let Some(b) = threads[i + 1..]
            .iter()
            .find(|b| next(b) == Some(fa.clone()))
        {
            return Some(format!(
                "seccomp filters threads {} and {} may share while other threads do not \
                 (filters are carried per thread, or shared by every thread)",
                a.tid, b.tid
            ));
        }
    }
    None
}

/// Installs `filters`, oldest first, in the thread `sys` runs in; with
/// `tsync` each is synchronised to every thread of the process.
pub fn install_filters(
    sys: &dyn Sys,
    filters: &[SeccompFilter],
    tsync: bool,
) -> Result<(), RestoreError> {
    for f in filters {
        let len = f.prog.len() as u64;
        let n = len / 8;
        // The program goes after its `sock_fprog` in the scratch page, or,
        // when longer, into memory mapped for it.
        let (prog, mapped) = if 16 + len <= crate::sys::PAGE {
            (sys.put(16, &f.prog)?, None)
        } else {
            let size = len.div_ceil(crate::sys::PAGE) * crate::sys::PAGE;
            let at = sys.mmap(
                0,
                size,
                (libc::PROT_READ | libc::PROT_WRITE) as u32,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )?;
            sys.write(at, &f.prog)?;
            (at, Some((at, size)))
        };
        let mut fprog = n.to_le_bytes().to_vec();
        fprog.extend_from_slice(&prog.to_le_bytes());
        let at = sys.put(0, &fprog)?;
        let flags = u64::from(f.flags) | if tsync { SECCOMP_FILTER_FLAG_TSYNC } else { 0 };
        let r = sys.call(
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            libc::SYS_seccomp,
            [SECCOMP_SET_MODE_FILTER, flags, at, 0, 0, 0],
        )?;
        if tsync && r != 0 {
            return Err(RestoreError::NotSupported(format!(
                "seccomp filters shared by every thread could not be synchronised: thread {r} \
                 has others"
            )));
        }
        if let Some((at, size)) = mapped {
            sys.call("munmap", libc::SYS_munmap, [at, size, 0, 0, 0, 0])?;
        }
    }
    Ok(())
}

/// `capset` of the three sets.
fn capset(sys: &dyn Sys, eff: u64, prm: u64, inh: u64) -> Result<(), RestoreError> {
    let mut raw = CAP_V3.to_le_bytes().to_vec();
    raw.extend_from_slice(&0u32.to_le_bytes());
    for half in [0, 32] {
        for set in [eff, prm, inh] {
            raw.extend_from_slice(&((set >> half) as u32).to_le_bytes());
        }
    }
    let at = sys.put(0, &raw)?;
    sys.call("capset", libc::SYS_capset, [at, at + 8, 0, 0, 0, 0])
        .map(drop)
}

fn prctl(sys: &dyn Sys, name: &str, args: [u64; 3]) -> Result<(), RestoreError> {
    sys.call(name, libc::SYS_prctl, [args[0], args[1], args[2], 0, 0, 0])
        .map(drop)
}

/// The bits set in `set`.
fn bits(set: u64) -> impl Iterator<Item = u64> {
    (0..64).filter(move |b| set & (1 << b) != 0)
}

/// Sets credentials `c` in the thread `sys` runs in, which has `from` (the
/// restorer's); its first `shared` filters are already installed (by
/// [`install_filters`] with `tsync`).
pub fn restore(
    sys: &dyn Sys,
    c: &ThreadCreds,
    from: &ThreadCreds,
    shared: usize,
) -> Result<(), RestoreError> {
    if !c.no_new_privs && from.no_new_privs {
        return Err(RestoreError::NotSupported(
            "a thread without no_new_privs, restored by a cr-ebpf that has it set (it cannot be \
             cleared)"
                .into(),
        ));
    }
    // Inheritable and ambient while every capability is still held.
    capset(sys, from.caps[EFF], from.caps[PRM], c.caps[INH])?;
    if from.caps[AMB] != 0 {
        prctl(
            sys,
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            [PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0],
        )?;
    }
    for cap in bits(c.caps[AMB]) {
        prctl(
            sys,
            "prctl(PR_CAP_AMBIENT_RAISE)",
            [PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap],
        )?;
    }
    for cap in bits(from.caps[BND] & !c.caps[BND]) {
        prctl(sys, "prctl(PR_CAPBSET_DROP)", [PR_CAPBSET_DROP, cap, 0])?;
    }
    if c.loginuid != from.loginuid {
        set_loginuid(sys, c.loginuid)?;
    }
    if c.groups != from.groups {
        set_groups(sys, &c.groups)?;
    }
    // The ids, with the capabilities left alone by the change.
    let mut bits_now = from.securebits;
    if c.uids != from.uids || c.gids != from.gids {
        let keep = (c.securebits & SECBITS_UNLOCKED) | SECBIT_NO_SETUID_FIXUP;
        if keep != bits_now {
            prctl(
                sys,
                "prctl(PR_SET_SECUREBITS)",
                [PR_SET_SECUREBITS, keep.into(), 0],
            )?;
            bits_now = keep;
        }
        let [r, e, s, fs] = c.gids.map(u64::from);
        sys.call("setresgid", libc::SYS_setresgid, [r, e, s, 0, 0, 0])?;
        sys.call("setfsgid", libc::SYS_setfsgid, [fs, 0, 0, 0, 0, 0])?;
        let [r, e, s, fs] = c.uids.map(u64::from);
        sys.call("setresuid", libc::SYS_setresuid, [r, e, s, 0, 0, 0])?;
        sys.call("setfsuid", libc::SYS_setfsuid, [fs, 0, 0, 0, 0, 0])?;
    }
    if c.securebits != bits_now {
        prctl(
            sys,
            "prctl(PR_SET_SECUREBITS)",
            [PR_SET_SECUREBITS, c.securebits.into(), 0],
        )?;
    }
    // Filters while CAP_SYS_ADMIN is held (no_new_privs is not needed for
    // them); they act only once the restorer lets the thread go.
    install_filters(
        sys,
        c.seccomp_filters.get(shared..).unwrap_or_default(),
        false,
    )?;
    if c.seccomp_mode == 1 {
        prctl(sys, "prctl(PR_SET_SECCOMP)", [PR_SET_SECCOMP, 1, 0])?;
    }
    capset(sys, c.caps[EFF], c.caps[PRM], c.caps[INH])?;
    if c.no_new_privs && !from.no_new_privs {
        prctl(
            sys,
            "prctl(PR_SET_NO_NEW_PRIVS)",
            [PR_SET_NO_NEW_PRIVS, 1, 0],
        )?;
    }
    Ok(())
}

/// Writes the thread's audit login uid (`/proc/thread-self/loginuid`).
fn set_loginuid(sys: &dyn Sys, loginuid: u32) -> Result<(), RestoreError> {
    let fd = sys.openat("/proc/thread-self/loginuid", libc::O_WRONLY)?;
    let text = loginuid.to_string();
    let at = sys.put(0, text.as_bytes())?;
    let r = sys.call(
        "write(loginuid)",
        libc::SYS_write,
        [fd as u64, at, text.len() as u64, 0, 0, 0],
    );
    sys.close(fd)?;
    r.map(drop).map_err(|e| {
        RestoreError::NotSupported(format!(
            "the audit login uid {loginuid} cannot be set again (it needs \
             CAP_AUDIT_CONTROL, and a kernel whose login uids are not immutable): {e}"
        ))
    })
}

fn set_groups(sys: &dyn Sys, groups: &[u32]) -> Result<(), RestoreError> {
    if groups.len() > GROUPS_MAX {
        return Err(RestoreError::NotSupported(format!(
            "{} supplementary groups (at most {GROUPS_MAX})",
            groups.len()
        )));
    }
    let raw: Vec<u8> = groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let at = sys.put(0, &raw)?;
    sys.call(
        "setgroups",
        libc::SYS_setgroups,
        [groups.len() as u64, at, 0, 0, 0, 0],
    )
    .map(drop)
}

#[cfg(test)]
#[path = "creds_tests.rs"]
mod tests;
