//! A page store made while the process ran (see `precopy.rs`), and what
//! must change in it once the process is frozen.

use cr_ebpf_image::{
    pages::{Edit, PageWriter},
    ImageError,
};
use rayon::prelude::*;

/// Pages of one process to bring up to date in its store once the freeze
/// is over: for each chunk copied while it ran, which of its pages the
/// frozen process still stores, and those read again (written since).
pub(crate) struct Streamed {
    /// The process's page store, holding the copies.
    pub(crate) store: PageWriter,
    pub(crate) revisions: Vec<Revision>,
}

/// What becomes of one chunk of a [`Streamed`] store.
pub(crate) struct Revision {
    /// The chunk.
    pub(crate) slot: usize,
    /// Which of its pages are still stored.
    pub(crate) keep: Vec<bool>,
    /// Pages read again: (index in the chunk, bytes).
    pub(crate) patches: Vec<(u32, Vec<u8>)>,
}

impl Streamed {
    /// Pages of the chunks still stored (the rest are read from the frozen
    /// process, or were not stored).
    pub(crate) fn pages(&self) -> u64 {
        self.revisions
            .iter()
            .map(|r| r.keep.iter().filter(|k| **k).count() as u64)
            .sum()
    }
}

/// Brings `store`, a store pre-copy made, up to what the frozen process
/// held: pages written since their copy patched in, pages no longer stored
/// left out (`revisions`). The chunks are read back and re-made on `pool`,
/// then written.
pub(crate) fn revise(
    store: &mut PageWriter,
    revisions: &[Revision],
    pool: &rayon::ThreadPool,
) -> Result<(), ImageError> {
    store.flush_all()?;
    let edits: Vec<Edit> = {
        let store = &*store;
        pool.install(|| {
            revisions
                .par_iter()
                .map(|r| {
                    let patches: Vec<(u32, &[u8])> =
                        r.patches.iter().map(|(k, b)| (*k, &b[..])).collect();
                    store.plan(r.slot, &|k| r.keep.get(k as usize) == Some(&true), &patches)
                })
                .collect::<Result<_, _>>()
        })?
    };
    for e in edits {
        store.apply(e)?;
    }
    Ok(())
}
