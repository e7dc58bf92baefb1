//! Filling memory from a page store that is not in the page cache: the
//! store is read with `O_DIRECT`, in file order, in windows of up to
//! 8 MiB, four reads in flight, while the chunks of the windows read go
//! into the process on all cores. On this machine's disk a cold buffered read of 1 GiB took
//! 0.68–1.9 s and an `O_DIRECT` one 0.50–0.63 s. A store mostly in the
//! page cache (a restore right after the dump), or one that cannot be
//! opened so (a file system without `O_DIRECT`), is read through its
//! mapping as before.

use std::{
    fs::File,
    ops::Range,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
};

use cr_ebpf_image::{aligned::Aligned, chain::Fill, Chain};
use cr_ebpf_resources::RestoreError;
use rayon::prelude::*;

/// Largest read.
const WINDOW: usize = 8 << 20;
/// Reads in flight at once: two read 1 GiB here in 0.61-0.74 s against
/// one's 0.79-0.94 s, and small windows (the eager part of a lazy
/// restore) wait for each other's latency less.
const READERS: usize = 4;
/// Alignment `O_DIRECT` asks of offsets, lengths and buffers.
const ALIGN: usize = 4096;
/// Chunks further apart than this are read in separate windows.
const GAP: usize = 256 << 10;
/// Below this share of a store in the page cache it is read directly.
const COLD: f64 = 0.5;

/// Puts one fill in, from the bytes of its chunk's extent (with a scratch
/// buffer of the calling thread's).
pub(super) type FillOne<'a> =
    dyn Fn(&Fill, &[u8], &mut Vec<u8>) -> Result<(), RestoreError> + Sync + 'a;

/// Consecutive chunks read at once: the file range (aligned) and the
/// fills whose chunks lie in it.
struct Window<'a> {
    range: Range<usize>,
    fills: Vec<&'a Fill>,
}

/// The windows of `fills` (all of one link), in file order.
fn windows<'a>(chain: &Chain, mut fills: Vec<&'a Fill>) -> Vec<Window<'a>> {
    fills.sort_by_key(|f| chain.extent(f).start);
    let mut out: Vec<Window<'a>> = Vec::new();
    for f in fills {
        let e = chain.extent(f);
        let (lo, hi) = (e.start / ALIGN * ALIGN, e.end.div_ceil(ALIGN) * ALIGN);
        match out.last_mut() {
            Some(w) if hi - w.range.start <= WINDOW && lo <= w.range.end + GAP => {
                w.range.end = w.range.end.max(hi);
                w.fills.push(f);
            }
            _ => out.push(Window {
                range: lo..hi,
                fills: vec![f],
            }),
        }
    }
    out
}

/// Fills `eager` of the links whose store is mostly not in the page cache
/// by reading them directly (see the module); returns the fills left for
/// the mapping, and the pages put in from direct reads. `one(fill, bytes
/// of its extent, scratch)` puts a fill in.
pub(super) fn fill<'a>(
    pool: &rayon::ThreadPool,
    chain: &Chain,
    eager: Vec<&'a Fill>,
    one: &FillOne<'_>,
) -> Result<(Vec<&'a Fill>, u64), RestoreError> {
    let mut left = Vec::new();
    let mut direct = 0;
    for (level, link) in chain.links().iter().enumerate() {
        let mine: Vec<&Fill> = eager.iter().copied().filter(|f| f.level == level).collect();
        if mine.is_empty() {
            continue;
        }
        let path = link.dir.join(cr_ebpf_image::PAGES_FILE);
        let file = (link.store.resident() < COLD)
            .then(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .ok()
            })
            .flatten();
        let Some(file) = file else {
            link.store.read_ahead();
            left.extend(mine);
            continue;
        };
        let ws = windows(chain, mine);
        let undone = stream(pool, chain, &file, &ws, one)?;
        if !undone.is_empty() {
            link.store.read_ahead();
        }
        let pages = |w: &Window<'_>| w.fills.iter().map(|f| f.pages()).sum::<u64>();
        direct += ws.iter().map(pages).sum::<u64>();
        for i in undone {
            direct -= pages(&ws[i]);
            left.extend(ws[i].fills.iter().copied());
        }
    }
    Ok((left, direct))
}

/// Reads `windows` of `file` on [`READERS`] threads of their own (as many
/// reads in flight), while the fills of each window read go in on `pool`.
/// A read that fails stops them: returns the windows not filled then
/// (their fills are left to the mapping, which reports the disk's error if
/// it is one), in file order.
fn stream(
    pool: &rayon::ThreadPool,
    chain: &Chain,
    file: &File,
    windows: &[Window<'_>],
    one: &FillOne<'_>,
) -> Result<Vec<usize>, RestoreError> {
    let readers = READERS.min(windows.len());
    let (free_tx, free_rx) = crossbeam_channel::unbounded::<Aligned>();
    for _ in 0..readers + 1 {
        let _ = free_tx.send(Aligned::new(WINDOW + ALIGN));
    }
    let (full_tx, full_rx) =
        crossbeam_channel::bounded::<(usize, std::io::Result<Aligned>)>(readers);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (next, stop) = (&next, &stop);
    std::thread::scope(|s| {
        for _ in 0..readers {
            let (free_rx, full_tx) = (free_rx.clone(), full_tx.clone());
            s.spawn(move || loop {
                use std::sync::atomic::Ordering::Relaxed;
                let i = next.fetch_add(1, Relaxed);
                let Some(r) = windows.get(i).map(|w| w.range.clone()) else {
                    return;
                };
                if stop.load(Relaxed) {
                    return;
                }
                let Ok(mut buf) = free_rx.recv() else {
                    return;
                };
                let got = read_at(file, &mut buf.bytes_mut()[..r.len()], r.start);
                let failed = got.is_err();
                if full_tx.send((i, got.map(|()| buf))).is_err() || failed {
                    stop.store(true, Relaxed);
                    return;
                }
            });
        }
        drop((free_rx, full_tx));
        // Owns the channel ends the readers wait on: however it returns,
        // they go, and the readers with them.
        let consume = move || -> Result<Vec<usize>, RestoreError> {
            let mut filled = vec![false; windows.len()];
            for (i, got) in full_rx.iter() {
                let Ok(buf) = got else {
                    continue;
                };
                let w = &windows[i];
                let bytes = &buf.bytes()[..w.range.len()];
                pool.install(|| {
                    w.fills
                        .par_iter()
                        .try_for_each_init(Vec::new, |scratch, f| {
                            let e = chain.extent(f);
                            let at = e.start - w.range.start..e.end - w.range.start;
                            one(f, &bytes[at], scratch)
                        })
                })?;
                filled[i] = true;
                // A closed channel: the readers are done.
                let _ = free_tx.send(buf);
            }
            Ok((0..windows.len()).filter(|&i| !filled[i]).collect())
        };
        consume()
    })
}

/// Reads exactly `buf.len()` bytes at `at`, short of the file's end only
/// past the last chunk (an aligned read may ask beyond it).
fn read_at(file: &File, buf: &mut [u8], at: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], (at + done) as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // The zeroes past the end are never a chunk's: every chunk's extent
    // lies inside the file (checked when the store was opened).
    buf[done..].fill(0);
    Ok(())
}
