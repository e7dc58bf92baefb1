//! Loading the chunks of a lazy restore from the page store: what the
//! process touches first, read all at once before it runs, and the
//! background stream of every other chunk, read and checked ahead by as
//! many threads as cores.
//!
//! A chunk stored as it is (random data, most of a process's memory that
//! lz4 cannot shrink) is not copied out: its checksum is checked where it
//! lies in the page store's mapping, and `UFFDIO_COPY` copies it from there
//! into the process, the one copy the plain restore makes too.

use std::{
    collections::BTreeSet,
    sync::{
        mpsc::{Receiver, SyncSender},
        Arc, Mutex,
    },
};

use cr_ebpf_image::{chain::Fill, Chain, Manifest};

use crate::RestoreError;

const PAGE: u64 = 4096;

/// A chunk's pages, loaded and checked: copied out (decompressed), or
/// where they lie in the page store's mapping.
pub(super) enum Data {
    Owned(Vec<u8>),
    /// Address and length of the whole chunk's pages inside the mapping of
    /// a page store of the chain the server holds.
    InStore(usize, usize),
}

impl Data {
    /// The bytes. `_chain` must be the chain the data was loaded from: it
    /// keeps the page store's mapping alive while the bytes are used.
    pub(super) fn bytes<'a>(&'a self, _chain: &'a Chain) -> &'a [u8] {
        match self {
            Data::Owned(v) => v,
            // SAFETY: the range was a slice of a page store's read-only
            // mapping, which lives as long as `_chain` (borrowed for 'a).
            Data::InStore(p, n) => unsafe { std::slice::from_raw_parts(*p as *const u8, *n) },
        }
    }
}

/// Loads fill `f`'s chunk (its disk read started first, exactly its
/// bytes), checking its checksums.
pub(super) fn load(chain: &Chain, f: &Fill) -> Result<Data, String> {
    chain.will_need(f);
    if let Some(d) = chain.pages_in_place(f)? {
        return Ok(Data::InStore(d.as_ptr() as usize, d.len()));
    }
    let mut buf = Vec::new();
    chain.read(f, &mut buf, |_, _| Ok::<(), String>(()), |e| e)?;
    buf.truncate(f.chunk.npages as usize * PAGE as usize);
    Ok(Data::Owned(buf))
}

/// Largest lazy mapping loaded whole before the process runs.
const SMALL: u64 = 1 << 20;

/// The addresses loaded before the process runs: what each thread touches
/// first (its stack and thread area, its rseq area, robust list and child
/// tid word, which the restorer's last steps touch too) and every piece of
/// the small mappings among the lazy ones (heap, the libraries' zeroed
/// data, stacks: a few hundred KiB that a process touches as it resumes).
pub(crate) fn hot_addresses(m: &Manifest, chain: &Chain, lazy: &[usize]) -> Vec<u64> {
    let mut hot = Vec::new();
    for t in &m.threads {
        if let Some(r) = cr_ebpf_tracee::regs::from_bytes(&t.regs) {
            hot.extend([r.rsp, r.fs_base]);
        }
        hot.extend([t.rseq.0, t.robust_list.0, t.clear_child_tid]);
    }
    let small: Vec<(u64, u64)> = super::lazy_ranges(m)
        .into_iter()
        .filter(|&(s, e)| e - s <= SMALL)
        .collect();
    for &i in lazy {
        let f = &chain.fills()[i];
        if super::is_lazy(&small, f) {
            hot.extend(
                f.pieces
                    .iter()
                    .map(|&(first, _)| f.chunk.vaddr + first as u64 * PAGE),
            );
        }
    }
    hot.retain(|&a| a != 0);
    hot.sort_unstable();
    hot.dedup();
    hot
}

/// Whether fill `f` holds one of the addresses `hot` (sorted).
fn holds_any(f: &Fill, hot: &[u64]) -> bool {
    let i = hot.partition_point(|&a| a < f.chunk.vaddr);
    hot.get(i)
        .is_some_and(|&a| a < f.chunk.vaddr + f.chunk.npages as u64 * PAGE)
}

/// Starts the disk reads of what the process needs before it runs, all at
/// once and in a thread of its own, so that they overlap with each other
/// and with the building of the process instead of waiting one after the
/// other: the chunks filled before it runs (outside the lazy ranges) and
/// the lazy ones holding a hot address, and the pages of the mapped files
/// those fills overwrite (a page of a private file mapping is read from
/// its file before it is written).
pub(crate) fn prefetch(chain: &Arc<Chain>) {
    let chain = chain.clone();
    // Only a hint: without the thread the reads happen when needed.
    let _ = std::thread::Builder::new()
        .name("lazy-prefetch".into())
        .spawn(move || {
            let m = chain.manifest();
            let ranges = super::lazy_ranges(m);
            let lazy = super::lazy_fills(&chain, &ranges);
            let hot = hot_addresses(m, &chain, &lazy);
            let mut files: std::collections::BTreeMap<&str, Vec<(u64, u64)>> = Default::default();
            for (i, f) in chain.fills().iter().enumerate() {
                let eager = !f.is_shmem() && !super::is_lazy(&ranges, f);
                if eager || (lazy.binary_search(&i).is_ok() && holds_any(f, &hot)) {
                    chain.will_need(f);
                }
                if !eager {
                    continue;
                }
                // The mapping holding it (mappings are in address order).
                let (s, e) = (f.chunk.vaddr, f.chunk.vaddr + f.chunk.npages as u64 * PAGE);
                let at = m.mappings.partition_point(|x| x.end <= s);
                let file = m.mappings.get(at).filter(|x| {
                    x.kind == cr_ebpf_image::MappingKind::File && x.start < e && s < x.end
                });
                if let Some(x) = file {
                    let (s, e) = (s.max(x.start), e.min(x.end));
                    let at = x.offset + (s - x.start);
                    files.entry(&x.path).or_default().push((at, e - s));
                }
            }
            for (path, ranges) in files {
                let Ok(file) = std::fs::File::open(path) else {
                    continue;
                };
                for (at, len) in ranges {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: advice on a descriptor of ours.
                    unsafe {
                        libc::posix_fadvise(
                            file.as_raw_fd(),
                            at as i64,
                            len as i64,
                            libc::POSIX_FADV_WILLNEED,
                        )
                    };
                }
            }
        });
}

/// What a reader sends: the fill, and its data or `None` when it is
/// damaged (the server reads it again, which says how).
pub(super) type Loaded = (usize, Option<Data>);

/// What the readers have still to read: positions in the background
/// order, taken from a cursor on. A fault moves the cursor just past the
/// chunk it needed: a process working through its memory finds the chunks
/// after it read ahead, and those skipped are read when the end is
/// reached.
pub(super) struct Queue {
    /// (positions still to read, cursor).
    state: Mutex<(BTreeSet<usize>, usize)>,
}

impl Queue {
    pub(super) fn new(len: usize) -> Self {
        Self {
            state: Mutex::new(((0..len).collect(), 0)),
        }
    }

    /// The next position to read, and the one after it (to start its read).
    fn take(&self) -> Option<(usize, Option<usize>)> {
        let mut st = self.state.lock().expect("not poisoned");
        let (pending, cursor) = &mut *st;
        let k = pending
            .range(*cursor..)
            .next()
            .or_else(|| pending.iter().next())
            .copied()?;
        pending.remove(&k);
        *cursor = k + 1;
        let after = pending
            .range(*cursor..)
            .next()
            .or_else(|| pending.iter().next())
            .copied();
        Some((k, after))
    }

    /// The chunk at position `k` was needed by a fault (and is loaded by
    /// the server): read on from after it.
    pub(super) fn jump(&self, k: usize) {
        let mut st = self.state.lock().expect("not poisoned");
        st.0.remove(&k);
        st.1 = k + 1;
    }
}

/// Starts the readers of `order` as `queue` gives them out, as many as
/// cores: a cold page store reads faster with several requests in flight.
/// Each starts the read of the chunk after its own too.
pub(super) fn spawn_readers(
    chain: &Arc<Chain>,
    order: &[usize],
    queue: &Arc<Queue>,
    tx: &SyncSender<Loaded>,
) -> Result<Vec<std::thread::JoinHandle<()>>, RestoreError> {
    let readers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let order: Arc<[usize]> = order.into();
    let mut ahead = Vec::new();
    for i in 0..readers {
        let (chain, order, queue, tx) = (chain.clone(), order.clone(), queue.clone(), tx.clone());
        let h = std::thread::Builder::new()
            .name(format!("lazy-read-{i}"))
            .spawn(move || {
                while let Some((k, after)) = queue.take() {
                    let fills = chain.fills();
                    if let Some(g) = after.and_then(|a| order.get(a)) {
                        chain.will_need(&fills[*g]);
                    }
                    let f = order[k];
                    let data = load(&chain, &fills[f]).ok();
                    if tx.send((f, data)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| RestoreError::stub(format!("starting a lazy read thread: {e}")))?;
        ahead.push(h);
    }
    Ok(ahead)
}

/// Drains `rx` (so that readers blocked on a full channel end) and joins
/// the readers.
pub(super) fn stop_readers(rx: Receiver<Loaded>, readers: Vec<std::thread::JoinHandle<()>>) {
    drop(rx);
    for h in readers {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::Queue;

    fn drain(q: &Queue) -> Vec<usize> {
        std::iter::from_fn(|| q.take().map(|(k, _)| k)).collect()
    }

    #[test]
    fn the_queue_gives_every_position_once_in_order() {
        let q = Queue::new(4);
        assert_eq!(q.take(), Some((0, Some(1))));
        assert_eq!(drain(&q), vec![1, 2, 3]);
        assert_eq!(q.take(), None);
    }

    #[test]
    fn a_fault_moves_the_reads_past_its_chunk_and_the_skipped_come_last() {
        let q = Queue::new(6);
        assert_eq!(q.take(), Some((0, Some(1))));
        // A fault needed position 3 (loaded by the server itself).
        q.jump(3);
        assert_eq!(q.take(), Some((4, Some(5))));
        assert_eq!(q.take(), Some((5, Some(1))));
        assert_eq!(drain(&q), vec![1, 2]);
    }
}
