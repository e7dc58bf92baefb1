//! The ring buffer as an async stream of decoded events.

use std::io;

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    event::{decode, DecodeError, Event},
    kernel_log::KernelLogger,
    LoaderError,
};

/// How often [`EventStream::next_batch`] looks for records that did not wake it.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Most events [`EventStream::next_batch`] returns at once (and what a
/// caller of [`EventStream::drain_some`] that must get on with other work
/// may take): a process writing records faster than they are read never
/// holds the reader in one call.
pub const BATCH_MAX: usize = 1 << 12;

/// Decoded events from the ring buffer, in the order the kernel committed them.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    logger: Option<KernelLogger>,
}

impl EventStream {
    pub(crate) fn new(map: Map, logger: Option<KernelLogger>) -> Result<Self, LoaderError> {
        let ring = RingBuf::try_from(map).map_err(|e| LoaderError::Map {
            map: cr_ebpf_common::map_names::EVENTS,
            what: "open the ring buffer".into(),
            source: Box::new(e),
        })?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LoaderError::Io {
                path: "the ring buffer".into(),
                source: io::Error::other("the event stream must be created inside a tokio runtime"),
            });
        }
        // SAFETY: the fd belongs to `ring`, which the AsyncFd owns from now on
        // and which neither closes nor replaces its map fd while it lives.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                LoaderError::Io {
                    path: "the ring buffer (registering with tokio)".into(),
                    source: e.into(),
                }
            })?;
        Ok(Self { ring, logger })
    }

    /// Appends every event available now, without waiting. Returns how many.
    /// Ends only when the ring buffer is empty: for processes that are
    /// stopped (a producer that runs can keep it from ending; see
    /// [`Self::drain_some`]).
    pub fn drain(&mut self, out: &mut Vec<Result<Event, DecodeError>>) -> usize {
        self.drain_some(out, usize::MAX)
    }

    /// Appends the events available now, at most `max`, without waiting.
    /// Returns how many. What a running process writes faster than it is
    /// read stays for the next call, so a caller that must also do other
    /// work (take a checkpoint) is not held here.
    pub fn drain_some(&mut self, out: &mut Vec<Result<Event, DecodeError>>, max: usize) -> usize {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
        let ring = self.ring.get_mut();
        let mut n = 0;
        while n < max {
            let Some(item) = ring.next() else { break };
            out.push(decode(&item));
            n += 1;
        }
        n
    }

    /// Waits until at least one event is available and appends all available ones.
    ///
    /// Fault and syscall records do not wake the reader one by one (only
    /// fork, exit and exec records do, and every 64 KiB of pending records):
    /// the ring buffer is also polled every [`POLL_INTERVAL`], so such a
    /// record is seen within that time.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Result<Event, DecodeError>>,
    ) -> io::Result<usize> {
        loop {
            let n = self.drain_some(out, BATCH_MAX);
            if n > 0 {
                return Ok(n);
            }
            if let Ok(guard) = tokio::time::timeout(POLL_INTERVAL, self.ring.readable_mut()).await {
                guard?.clear_ready();
            }
        }
    }
}
