//! Format 1.8: the IPC namespace of a process that has one of its own,
//! with everything in it: its sysctls and its System V objects (shared
//! memory segments with their contents, semaphore sets with their values,
//! message queues with their messages). Appended to the PROCESS section
//! after the UTS namespace (see `membership.rs`).

use crate::codec::{Dec, DecErr, Enc};

use super::SHMEM_CAP;

/// Most objects of each kind, and most sysctls.
const OBJECTS_CAP: usize = 1 << 15;
/// Most semaphores in a set (`SEMMSL` is at most 32000).
const SEMS_CAP: usize = 1 << 16;
/// Most messages in a queue, and the largest one.
const MESSAGES_CAP: usize = 1 << 20;
const MESSAGE_CAP: usize = 1 << 20;

/// What every System V object has: key, id, owner and permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpcPerm {
    /// Its key (`IPC_PRIVATE` is 0).
    pub key: i32,
    /// Its id, the one the processes use.
    pub id: i32,
    /// Permission bits, and for a segment `SHM_LOCKED` (0o2000).
    pub mode: u32,
    /// Owner uid and gid.
    pub uid: u32,
    pub gid: u32,
}

/// A System V shared memory segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysvShm {
    pub perm: IpcPerm,
    /// Its size in bytes.
    pub size: u64,
    /// Its contents: (offset, bytes) runs; what is not in a run is zero.
    pub data: Vec<(u64, Vec<u8>)>,
}

/// A System V semaphore set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysvSem {
    pub perm: IpcPerm,
    /// The value of each semaphore (`semctl(GETALL)`).
    pub values: Vec<u16>,
}

/// A System V message queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SysvMsq {
    pub perm: IpcPerm,
    /// Its capacity in bytes (`msg_qbytes`).
    pub qbytes: u64,
    /// Its messages in queue order: (type, text).
    pub messages: Vec<(i64, Vec<u8>)>,
}

/// An IPC namespace and what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpcNs {
    /// The namespace's inode at the checkpoint: processes with the same
    /// one share a namespace again after a restore.
    pub ns: u64,
    /// Its sysctls: (path below `/proc/sys`, value as read).
    pub sysctls: Vec<(String, String)>,
    pub shm: Vec<SysvShm>,
    pub sem: Vec<SysvSem>,
    pub msg: Vec<SysvMsq>,
}

fn count(b: &mut Dec<'_>, cap: usize, what: &str) -> Result<usize, DecErr> {
    let n = b.u32()? as usize;
    if n > cap {
        return Err(b.err(format!("{n} {what} (at most {cap})")));
    }
    Ok(n)
}

impl IpcPerm {
    fn encode(&self, b: &mut Enc) {
        b.i32(self.key);
        b.i32(self.id);
        b.u32(self.mode);
        b.u32(self.uid);
        b.u32(self.gid);
    }

    fn decode(b: &mut Dec<'_>) -> Result<Self, DecErr> {
        let p = Self {
            key: b.i32()?,
            id: b.i32()?,
            mode: b.u32()?,
            uid: b.u32()?,
            gid: b.u32()?,
        };
        if p.id < 0 || p.mode & !0o2777 != 0 {
            return Err(b.err(format!(
                "System V object id {} with mode {:#o}",
                p.id, p.mode
            )));
        }
        Ok(p)
    }
}

impl IpcNs {
    /// Its encoding, after a non-zero `ns`.
    pub(super) fn encode(&self, b: &mut Enc) {
        b.u64(self.ns);
        b.u32(self.sysctls.len() as u32);
        for (k, v) in &self.sysctls {
            b.str(k);
            b.str(v);
        }
        b.u32(self.shm.len() as u32);
        for s in &self.shm {
            s.perm.encode(b);
            b.u64(s.size);
            b.u32(s.data.len() as u32);
            for (off, bytes) in &s.data {
                b.u64(*off);
                b.bytes(bytes);
            }
        }
        b.u32(self.sem.len() as u32);
        for s in &self.sem {
            s.perm.encode(b);
            b.u32(s.values.len() as u32);
            for v in &s.values {
                b.u16(*v);
            }
        }
        b.u32(self.msg.len() as u32);
        for q in &self.msg {
            q.perm.encode(b);
            b.u64(q.qbytes);
            b.u32(q.messages.len() as u32);
            for (t, text) in &q.messages {
                b.u64(*t as u64);
                b.bytes(text);
            }
        }
    }

    /// Reads one whose (non-zero) `ns` was just read.
    pub(super) fn decode(b: &mut Dec<'_>, ns: u64) -> Result<Self, DecErr> {
        let n = count(b, OBJECTS_CAP, "IPC sysctls")?;
        let mut sysctls = Vec::with_capacity(n);
        for _ in 0..n {
            let k = b.str(64, "sysctl name")?;
            if k.contains("..") || k.starts_with('/') {
                return Err(b.err(format!("sysctl name {k:?}")));
            }
            sysctls.push((k, b.str(256, "sysctl value")?));
        }
        let n = count(b, OBJECTS_CAP, "shared memory segments")?;
        let mut shm = Vec::with_capacity(n);
        for _ in 0..n {
            let perm = IpcPerm::decode(b)?;
            let size = b.u64()?;
            if size > SHMEM_CAP {
                return Err(b.err(format!("a segment of {size} bytes (at most {SHMEM_CAP})")));
            }
            let runs = count(b, (SHMEM_CAP / 4096) as usize, "runs")?;
            let mut data = Vec::with_capacity(runs);
            for _ in 0..runs {
                let off = b.u64()?;
                let bytes = b.bytes(SHMEM_CAP as usize, "segment run")?;
                if off.saturating_add(bytes.len() as u64) > size {
                    return Err(b.err(format!("a run at {off} beyond the segment's {size} bytes")));
                }
                data.push((off, bytes.to_vec()));
            }
            shm.push(SysvShm { perm, size, data });
        }
        let n = count(b, OBJECTS_CAP, "semaphore sets")?;
        let mut sem = Vec::with_capacity(n);
        for _ in 0..n {
            let perm = IpcPerm::decode(b)?;
            let k = count(b, SEMS_CAP, "semaphores")?;
            let values = (0..k).map(|_| b.u16()).collect::<Result<_, _>>()?;
            sem.push(SysvSem { perm, values });
        }
        let n = count(b, OBJECTS_CAP, "message queues")?;
        let mut msg = Vec::with_capacity(n);
        for _ in 0..n {
            let perm = IpcPerm::decode(b)?;
            let qbytes = b.u64()?;
            let k = count(b, MESSAGES_CAP, "messages")?;
            let mut messages = Vec::with_capacity(k);
            for _ in 0..k {
                let t = b.u64()? as i64;
                if t <= 0 {
                    return Err(b.err(format!("a message of type {t}")));
                }
                messages.push((t, b.bytes(MESSAGE_CAP, "message")?.to_vec()));
            }
            msg.push(SysvMsq {
                perm,
                qbytes,
                messages,
            });
        }
        Ok(Self {
            ns,
            sysctls,
            shm,
            sem,
            msg,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> IpcNs {
        let perm = |key, id| IpcPerm {
            key,
            id,
            mode: 0o600,
            uid: 1,
            gid: 2,
        };
        IpcNs {
            ns: 4026532200,
            sysctls: vec![("kernel/shmmax".into(), "4096".into())],
            shm: vec![SysvShm {
                perm: perm(0x1234, 5),
                size: 8192,
                data: vec![(4096, b"page two".to_vec())],
            }],
            sem: vec![SysvSem {
                perm: perm(0, 0),
                values: vec![1, 2, 3],
            }],
            msg: vec![SysvMsq {
                perm: perm(77, 32768),
                qbytes: 16384,
                messages: vec![(1, b"one".to_vec()), (2, Vec::new())],
            }],
        }
    }

    fn decoded(n: &IpcNs) -> Result<IpcNs, DecErr> {
        let mut e = Enc::default();
        n.encode(&mut e);
        let mut d = Dec::new(&e.buf, 0);
        let ns = d.u64()?;
        let back = IpcNs::decode(&mut d, ns)?;
        assert!(d.done());
        Ok(back)
    }

    #[test]
    fn an_ipc_namespace_round_trips_and_bad_values_are_refused() {
        let n = sample();
        assert_eq!(decoded(&n).unwrap(), n);
        let mut bad = sample();
        bad.shm[0].data[0].0 = 8190;
        assert!(decoded(&bad).unwrap_err().what.contains("beyond"));
        let mut bad = sample();
        bad.msg[0].messages[0].0 = 0;
        assert!(decoded(&bad).unwrap_err().what.contains("type 0"));
        let mut bad = sample();
        bad.sem[0].perm.mode = 0o4600;
        assert!(decoded(&bad).is_err());
        let mut bad = sample();
        bad.sysctls[0].0 = "../etc".into();
        assert!(decoded(&bad).is_err());
    }
}
