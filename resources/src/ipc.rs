//! IPC namespaces: what one holds, saved from inside it and made again in
//! a new one.
//!
//! Saving ([`dump`]): a thread of ours joins the process's IPC namespace
//! (`setns`; the namespace is per thread) and reads, as the kernel shows
//! them to a task inside it, its sysctls ([`SYSCTLS`]), its System V
//! objects from `/proc/sysvipc/*` (key, id, permissions, owner), each
//! shared memory segment's contents (attached read-only in our address
//! space for a moment), each semaphore set's values (`GETALL`) and each
//! message queue's messages (`msgrcv` with `MSG_COPY`, which leaves them
//! queued). POSIX message queues are looked for on an `mqueue` mount of
//! that namespace and refused, as are a segment removed while still
//! attached (`SHM_DEST`) and permission bits we cannot set again.
//!
//! Restoring ([`populate`]): once the first stub of the namespace made a
//! new one, a thread of ours joins it, writes the sysctls, and makes every
//! object again with its id (`shm_next_id`, `sem_next_id`, `msg_next_id`),
//! key, permissions and owner; segments are filled, semaphores set
//! (`SETALL`), messages sent again in order. A queue is made while
//! `msgmnb` holds its capacity (raising `msg_qbytes` later would need
//! `CAP_SYS_RESOURCE`); the recorded `msgmnb` and the ids the next
//! objects get (`*_next_id`, when set) are written last. Not
//! carried (the kernel lets no one set them): creator uid/gid (the
//! restorer's), last attach/operation times and pids; semaphore undo
//! adjustments (`SEM_UNDO`) of the processes are not visible to save.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use cr_ebpf_image::{IpcNs, IpcPerm, SysvMsq, SysvSem, SysvShm, SHMEM_CAP};

use crate::RestoreError;

/// The sysctls an IPC namespace has of its own, below `/proc/sys`.
pub const SYSCTLS: &[&str] = &[
    "kernel/shmmax",
    "kernel/shmall",
    "kernel/shmmni",
    "kernel/shm_rmid_forced",
    "kernel/msgmax",
    "kernel/msgmnb",
    "kernel/msgmni",
    "kernel/auto_msgmni",
    "kernel/sem",
    "fs/mqueue/queues_max",
    "fs/mqueue/msg_max",
    "fs/mqueue/msgsize_max",
    "fs/mqueue/msg_default",
    "fs/mqueue/msgsize_default",
    "kernel/shm_next_id",
    "kernel/sem_next_id",
    "kernel/msg_next_id",
];

/// Of [`SYSCTLS`], those written after the objects are made: the
/// capacity new queues get, and the ids the next objects get (each object
/// made uses its `*_next_id`).
const LAST: &[&str] = &[
    "kernel/msgmnb",
    "kernel/shm_next_id",
    "kernel/sem_next_id",
    "kernel/msg_next_id",
];

/// `MSG_COPY` (`<linux/msg.h>`): read the message at an index, leave it.
const MSG_COPY: i32 = 0o40000;
/// `SHM_DEST` and `SHM_LOCKED` in a segment's mode.
const SHM_DEST: u32 = 0o1000;
const SHM_LOCKED: u32 = 0o2000;

/// Runs `f` in a thread of ours that joined the IPC namespace of process
/// `pid` first.
fn in_namespace<T: Send>(
    pid: i32,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    let path = format!("/proc/{pid}/ns/ipc");
    let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on our descriptor, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWIPC) } != 0 {
                return Err(format!(
                    "joining the IPC namespace of process {pid}: {}",
                    io::Error::last_os_error()
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("the thread in the IPC namespace panicked".into()))
    })
}

/// One line of `/proc/sysvipc/KIND`: key, id, mode, then the fields
/// at `uid_at` and after it (uid, gid), and the number at `n_at`.
fn objects(kind: &str, uid_at: usize, n_at: usize) -> Result<Vec<(IpcPerm, u64)>, String> {
    let path = format!("/proc/sysvipc/{kind}");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<i64>().ok());
        let (Some(key), Some(id), Some(mode), Some(uid), Some(gid), Some(n)) = (
            num(0),
            num(1),
            f.get(2).and_then(|v| u32::from_str_radix(v, 8).ok()),
            num(uid_at),
            num(uid_at + 1),
            num(n_at),
        ) else {
            return Err(format!("an unreadable line of {path}: {line:?}"));
        };
        let perm = IpcPerm {
            key: key as i32,
            id: id as i32,
            mode,
            uid: uid as u32,
            gid: gid as u32,
        };
        out.push((perm, n as u64));
    }
    Ok(out)
}

/// Runs of non-zero pages of `mem`.
fn runs(mem: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, page) in mem.chunks(4096).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let off = (i * 4096) as u64;
        match out.last_mut() {
            Some((o, d)) if *o + d.len() as u64 == off => d.extend_from_slice(page),
            _ => out.push((off, page.to_vec())),
        }
    }
    out
}

fn segments() -> Result<Vec<SysvShm>, String> {
    let mut out = Vec::new();
    for (perm, size) in objects("shm", 7, 3)? {
        if perm.mode & SHM_DEST != 0 {
            return Err(format!(
                "System V shared memory segment {} removed while still attached",
                perm.id
            ));
        }
        if perm.mode & !(0o777 | SHM_LOCKED) != 0 {
            return Err(format!(
                "System V shared memory segment {} with mode {:#o}",
                perm.id, perm.mode
            ));
        }
        if size > SHMEM_CAP {
            return Err(format!(
                "System V shared memory segment {} of {} MiB (at most {} MiB)",
                perm.id,
                size >> 20,
                SHMEM_CAP >> 20
            ));
        }
        // SAFETY: attaching the segment read-only anywhere in our address
        // space, reading `size` bytes of it, detaching.
        let data = unsafe {
            let p = libc::shmat(perm.id, std::ptr::null(), libc::SHM_RDONLY);
            if p as isize == -1 {
                return Err(format!(
                    "attaching System V shared memory segment {}: {}",
                    perm.id,
                    io::Error::last_os_error()
                ));
            }
            let d = runs(std::slice::from_raw_parts(p as *const u8, size as usize));
            libc::shmdt(p);
            d
        };
        out.push(SysvShm { perm, size, data });
    }
    Ok(out)
}

fn semaphores() -> Result<Vec<SysvSem>, String> {
    let mut out = Vec::new();
    for (perm, n) in objects("sem", 4, 3)? {
        let mut values = vec![0u16; n as usize];
        // SAFETY: GETALL writes `n` shorts into `values`.
        if unsafe { libc::semctl(perm.id, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
            return Err(format!(
                "reading semaphore set {}: {}",
                perm.id,
                io::Error::last_os_error()
            ));
        }
        check_mode(&perm, "semaphore set")?;
        out.push(SysvSem { perm, values });
    }
    Ok(out)
}

fn check_mode(perm: &IpcPerm, what: &str) -> Result<(), String> {
    if perm.mode & !0o777 != 0 {
        return Err(format!(
            "System V {what} {} with mode {:#o}",
            perm.id, perm.mode
        ));
    }
    Ok(())
}

fn queues() -> Result<Vec<SysvMsq>, String> {
    let msgmax: usize = read_sysctl("kernel/msgmax")
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    let mut buf = vec![0u8; 8 + msgmax];
    let mut out = Vec::new();
    for (perm, qnum) in objects("msg", 7, 4)? {
        check_mode(&perm, "message queue")?;
        // SAFETY: zeroed msqid_ds is valid; IPC_STAT fills it.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::msgctl(perm.id, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(format!(
                "reading message queue {}: {}",
                perm.id,
                io::Error::last_os_error()
            ));
        }
        let mut messages = Vec::new();
        for i in 0..qnum {
            // SAFETY: `buf` holds a long type and `msgmax` bytes of text.
            let n = unsafe {
                libc::msgrcv(
                    perm.id,
                    buf.as_mut_ptr().cast(),
                    msgmax,
                    i as libc::c_long,
                    libc::IPC_NOWAIT | MSG_COPY,
                )
            };
            if n < 0 {
                return Err(format!(
                    "copying message {i} of queue {} (MSG_COPY needs CONFIG_CHECKPOINT_RESTORE): {}",
                    perm.id,
                    io::Error::last_os_error()
                ));
            }
            let t = i64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
            messages.push((t, buf[8..8 + n as usize].to_vec()));
        }
        out.push(SysvMsq {
            perm,
            qbytes: ds.msg_qbytes,
            messages,
        });
    }
    Ok(out)
}

/// Names of the POSIX message queues of the current IPC namespace, from a
/// short-lived `mqueue` mount of it.
fn posix_queues() -> Result<Vec<String>, String> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "cr-ebpf-mqueue-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let c = cstr(&dir);
    // SAFETY: NUL-terminated strings; plain syscall.
    let r = unsafe {
        libc::mount(
            c"mqueue".as_ptr(),
            c.as_ptr(),
            c"mqueue".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("mounting its POSIX message queues: {e}"));
    }
    let names = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .map_err(|e| format!("listing its POSIX message queues: {e}"));
    // SAFETY: as above.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(&dir);
    names
}

fn cstr(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
}

/// Everything the IPC namespace of process `pid` holds (namespace inode
/// `ns`); an error says what cannot be carried.
pub fn dump(pid: i32, ns: u64) -> Result<IpcNs, String> {
    in_namespace(pid, || {
        let mq = posix_queues()?;
        if !mq.is_empty() {
            return Err(format!(
                "POSIX message queues in its IPC namespace ({})",
                mq.join(", ")
            ));
        }
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|k| read_sysctl(k).map(|v| (k.to_string(), v)))
            .collect();
        Ok(IpcNs {
            ns,
            sysctls,
            shm: segments()?,
            sem: semaphores()?,
            msg: queues()?,
        })
    })
}

/// A sysctl's value, read in one call: a sysctl file read at an offset
/// other than 0 gives nothing, so a value longer than a first short read
/// (`read_to_string` starts with 32 bytes) would be cut.
fn read_sysctl(name: &str) -> Option<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; 4096];
    let n = File::open(Path::new("/proc/sys").join(name))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

fn sysctl(name: &str, value: &str) -> Result<(), String> {
    let p: PathBuf = Path::new("/proc/sys").join(name);
    std::fs::write(&p, value).map_err(|e| format!("writing {value:?} to {}: {e}", p.display()))
}

/// `*_next_id` for the next object, then `make`, which must give `id`.
fn with_id(kind: &str, id: i32, make: impl FnOnce() -> i32) -> Result<(), String> {
    sysctl(&format!("kernel/{kind}_next_id"), &id.to_string())?;
    let got = make();
    if got < 0 {
        return Err(format!(
            "making System V {kind} {id}: {}",
            io::Error::last_os_error()
        ));
    }
    if got != id {
        return Err(format!("System V {kind} {id} came back as {got}"));
    }
    Ok(())
}

fn make_segment(s: &SysvShm) -> Result<(), String> {
    let p = &s.perm;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    // SAFETY: plain syscall.
    with_id("shm", p.id, || unsafe {
        libc::shmget(p.key, s.size as usize, flags)
    })?;
    // SAFETY: attaching our new segment anywhere, filling it, detaching;
    // runs are within its size (checked when the image was read).
    unsafe {
        let at = libc::shmat(p.id, std::ptr::null(), 0);
        if at as isize == -1 {
            return Err(format!(
                "attaching segment {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
        for (off, bytes) in &s.data {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (at as *mut u8).add(*off as usize),
                bytes.len(),
            );
        }
        libc::shmdt(at);
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        ds.shm_perm.uid = p.uid;
        ds.shm_perm.gid = p.gid;
        ds.shm_perm.mode = (p.mode & 0o777) as u16;
        if libc::shmctl(p.id, libc::IPC_SET, &mut ds) != 0 {
            return Err(format!(
                "setting the owner of segment {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
        if p.mode & SHM_LOCKED != 0 && libc::shmctl(p.id, libc::SHM_LOCK, std::ptr::null_mut()) != 0
        {
            return Err(format!(
                "SHM_LOCK on segment {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn make_semaphores(s: &SysvSem) -> Result<(), String> {
    let p = &s.perm;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    // SAFETY: plain syscall.
    with_id("sem", p.id, || unsafe {
        libc::semget(p.key, s.values.len() as i32, flags)
    })?;
    // SAFETY: SETALL reads one short per semaphore; IPC_SET reads a
    // semid_ds.
    unsafe {
        if libc::semctl(p.id, 0, libc::SETALL, s.values.as_ptr()) != 0 {
            return Err(format!(
                "setting semaphore set {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
        let mut ds: libc::semid_ds = std::mem::zeroed();
        ds.sem_perm.uid = p.uid;
        ds.sem_perm.gid = p.gid;
        ds.sem_perm.mode = (p.mode & 0o777) as u16;
        if libc::semctl(p.id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) != 0 {
            return Err(format!(
                "setting the owner of semaphore set {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn make_queue(q: &SysvMsq) -> Result<(), String> {
    let p = &q.perm;
    // Its capacity is the namespace's msgmnb when it is made.
    sysctl("kernel/msgmnb", &q.qbytes.to_string())?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
    // SAFETY: plain syscall.
    with_id("msg", p.id, || unsafe { libc::msgget(p.key, flags) })?;
    let mut buf = Vec::new();
    for (t, text) in &q.messages {
        buf.clear();
        buf.extend_from_slice(&t.to_ne_bytes());
        buf.extend_from_slice(text);
        // SAFETY: `buf` is a long type followed by the text.
        if unsafe { libc::msgsnd(p.id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) } != 0 {
            return Err(format!(
                "refilling message queue {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: zeroed msqid_ds is valid; IPC_STAT fills it, IPC_SET reads it.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        if libc::msgctl(p.id, libc::IPC_STAT, &mut ds) != 0 {
            return Err(format!(
                "reading message queue {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
        ds.msg_perm.uid = p.uid;
        ds.msg_perm.gid = p.gid;
        ds.msg_perm.mode = (p.mode & 0o777) as u16;
        if libc::msgctl(p.id, libc::IPC_SET, &mut ds) != 0 {
            return Err(format!(
                "setting the owner of message queue {}: {}",
                p.id,
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Makes everything of `n` in the (new, empty) IPC namespace of process
/// `pid`.
pub fn populate(pid: i32, n: &IpcNs) -> Result<(), RestoreError> {
    in_namespace(pid, || {
        let last = |k: &String| LAST.contains(&k.as_str());
        for (k, v) in n.sysctls.iter().filter(|(k, _)| !last(k)) {
            sysctl(k, v)?;
        }
        n.shm.iter().try_for_each(make_segment)?;
        n.sem.iter().try_for_each(make_semaphores)?;
        n.msg.iter().try_for_each(make_queue)?;
        // A `*_next_id` of -1 (none set) is what a new namespace has, and
        // cannot be written.
        let unset = |k: &String, v: &String| k.ends_with("_next_id") && v == "-1";
        for (k, v) in n.sysctls.iter().filter(|(k, v)| last(k) && !unset(k, v)) {
            sysctl(k, v)?;
        }
        Ok(())
    })
    .map_err(|what| {
        RestoreError::NotSupported(format!(
            "rebuilding the IPC namespace of process {pid}: {what}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysctl_longer_than_a_short_first_read_is_read_whole() {
        let full = std::fs::read("/proc/sys/kernel/sem").unwrap();
        let got = read_sysctl("kernel/sem").unwrap();
        assert_eq!(got, String::from_utf8_lossy(&full).trim());
        assert_eq!(got.split_whitespace().count(), 4, "{got:?}");
        assert!(read_sysctl("kernel/no_such_sysctl").is_none());
    }

    #[test]
    fn only_non_zero_pages_are_kept() {
        let mut mem = vec![0u8; 5 * 4096];
        mem[1] = 1;
        mem[4096 + 7] = 2;
        mem[4 * 4096] = 3;
        let r = runs(&mem);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[0].1.len()), (0, 8192));
        assert_eq!((r[1].0, r[1].1.len()), (4 * 4096, 4096));
    }

    /// Saving and rebuilding a namespace for real needs root (`setns`,
    /// `unshare`): the privileged test `perf/tests/namespaces.rs` does;
    /// here, reading our own namespace finds what we made in it.
    #[test]
    fn our_own_namespace_is_read_as_the_kernel_shows_it() {
        // SAFETY: a private semaphore set of two, removed below.
        let id = unsafe { libc::semget(libc::IPC_PRIVATE, 2, 0o600 | libc::IPC_CREAT) };
        assert!(id >= 0, "{}", io::Error::last_os_error());
        let vals = [3u16, 9];
        // SAFETY: SETALL reads two shorts.
        let set = unsafe { libc::semctl(id, 0, libc::SETALL, vals.as_ptr()) };
        assert_eq!(set, 0);
        let got = semaphores();
        // SAFETY: removing our set.
        unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
        let s = got.unwrap().into_iter().find(|s| s.perm.id == id).unwrap();
        assert_eq!(s.values, vals);
        assert_eq!(s.perm.mode, 0o600);
        // SAFETY: plain query.
        assert_eq!(s.perm.uid, unsafe { libc::geteuid() });
    }
}
