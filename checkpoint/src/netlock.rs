//! The network lock of a dump that does not leave the process running.
//!
//! Its TCP connections are locked (every packet of them dropped, both
//! ways) right after the tree is frozen and before any of them is read,
//! so nothing the peers send after the read is acknowledged by a socket
//! that is about to go; the lock outlives the dump and the process, and
//! the restore removes it once the connections exist again. A dump that
//! fails, or is refused, removes the lock it made: the process runs on
//! with working connections. The lock itself (eBPF, bpffs) is the
//! caller's [`ConnectionLock`]: this crate knows no eBPF.

use std::sync::Arc;

pub use cr_ebpf_common::netlock::NetLockKey;

use crate::DumpError;

/// Something that can hold TCP connections between a dump and a restore.
pub trait ConnectionLock: std::fmt::Debug + Send + Sync {
    /// Drops every packet of `connections` from now on, under `name`
    /// (unique to this dump), until [`ConnectionLock::unlock`].
    fn lock(&self, name: &str, connections: &[NetLockKey]) -> Result<(), String>;
    /// Removes the lock `name` (a dump that failed).
    fn unlock(&self, name: &str);
}

/// A lock made by this dump: removed when dropped unless [`Held::keep`]
/// says the dump went through.
pub(crate) struct Held {
    lock: Arc<dyn ConnectionLock>,
    name: String,
    kept: bool,
}

impl Held {
    /// Locks the connections of the frozen processes `pids`; `None` when
    /// they have none.
    pub(crate) fn take(
        lock: &Arc<dyn ConnectionLock>,
        root: i32,
        pids: &[i32],
    ) -> Result<Option<Self>, DumpError> {
        let connections = cr_ebpf_resources::fd::socket::tcp::connections_of(pids)
            .map_err(crate::error::proc_err(root, "net (sock_diag)".into()))?;
        if connections.is_empty() {
            return Ok(None);
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("dump-{root}-{stamp}");
        lock.lock(&name, &connections)
            .map_err(|what| DumpError::NetworkLock { pid: root, what })?;
        Ok(Some(Self {
            lock: Arc::clone(lock),
            name,
            kept: false,
        }))
    }

    /// Its name, recorded in the image.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The dump went through: the lock stays for the restore.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.kept {
            self.lock.unlock(&self.name);
        }
    }
}
