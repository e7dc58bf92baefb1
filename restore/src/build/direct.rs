//! Filling memory from a page store that is not in the page cache: the
//! store is read with `O_DIRECT`, in file order, in windows of up to
//! 8 MiB, while the chunks of the window before go into the process on
//! all cores. On this machine's disk a cold buffered read of 1 GiB took
//! 0.68–1.9 s and an `O_DIRECT` one 0.50–0.63 s. A store mostly in the
//! page cache (a restore right after the dump), or one that cannot be
//! opened so (a file system without `O_DIRECT`), is read through its
//! mapping as before.

use std::{
    alloc::Layout,
    fs::File,
    ops::Range,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
};

use cr_ebpf_image::{chain::Fill, Chain};
use cr_ebpf_resources::RestoreError;
use rayon::prelude::*;

/// Largest read.
const WINDOW: usize = 8 << 20;
/// Alignment `O_DIRECT` asks of offsets, lengths and buffers.
const ALIGN: usize = 4096;
/// Chunks further apart than this are read in separate windows.
const GAP: usize = 256 << 10;
/// Below this share of a store in the page cache it is read directly.
const COLD: f64 = 0.5;

/// A buffer aligned for `O_DIRECT`.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, used by one thread at a time.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, ALIGN).expect("a valid layout");
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `layout.size()` bytes allocated by `new` (read into
        // before they are looked at: see `read`).
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated by `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

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
        let done = match stream(pool, chain, &file, &ws, one)? {
            Some(i) => {
                link.store.read_ahead();
                left.extend(ws[i..].iter().flat_map(|w| w.fills.iter().copied()));
                i
            }
            None => ws.len(),
        };
        direct += ws[..done]
            .iter()
            .flat_map(|w| w.fills.iter())
            .map(|f| f.pages())
            .sum::<u64>();
    }
    Ok((left, direct))
}

/// Reads `windows` of `file` on a thread of its own, one ahead, while the
/// fills of each window read go in on `pool`. A read that fails stops it:
/// returns the first window not filled then (their fills are left to the
/// mapping, which reports the disk's error if it is one).
fn stream(
    pool: &rayon::ThreadPool,
    chain: &Chain,
    file: &File,
    windows: &[Window<'_>],
    one: &FillOne<'_>,
) -> Result<Option<usize>, RestoreError> {
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Aligned>(3);
    for _ in 0..3 {
        let _ = free_tx.send(Aligned::new(WINDOW + ALIGN));
    }
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(usize, std::io::Result<Aligned>)>(2);
    let ranges: Vec<Range<usize>> = windows.iter().map(|w| w.range.clone()).collect();
    std::thread::scope(|s| {
        s.spawn(move || {
            for (i, r) in ranges.into_iter().enumerate() {
                let Ok(mut buf) = free_rx.recv() else {
                    return;
                };
                let got = read_at(file, &mut buf.bytes_mut()[..r.len()], r.start);
                let failed = got.is_err();
                if full_tx.send((i, got.map(|()| buf))).is_err() || failed {
                    return;
                }
            }
        });
        // Owns both channel ends the reader waits on: however it returns,
        // they go, and the reader with them.
        let consume = move || -> Result<Option<usize>, RestoreError> {
            for (i, got) in full_rx.iter() {
                let Ok(buf) = got else {
                    return Ok(Some(i));
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
                // A closed channel: the reader is done.
                let _ = free_tx.send(buf);
            }
            Ok(None)
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
