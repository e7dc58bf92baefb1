//! Shared memory contents in the page store (format 1.11).
//!
//! The contents of every shared memory object a process image stores are
//! pages of its page store at pseudo addresses above user space: page `o`
//! of an object placed at `base` is stored at `base + o` (see
//! [`cr_ebpf_image::SHMEM_PAGES`]). An object keeps its `base` along a
//! chain, so an incremental checkpoint stores only the pages whose
//! contents differ from what the chain already holds for it, and flags the
//! object as inheriting the rest; the restore resolves them like the pages
//! of a mapping.
//!
//! What changed is found by content: every page of the object is read
//! while the processes are frozen and its hash compared with the chain's
//! (a [`View`]). Writes to shared memory come from every process mapping
//! it and from `write(2)` on its descriptors, which no per-process dirty
//! tracker sees; hashing sees them all, at the cost of reading the object
//! at each checkpoint (its pages are not copied out again when unchanged).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::FileExt as _,
};

use cr_ebpf_dirty_tracker::hashing::page_hash;
use cr_ebpf_image::{Manifest, ShmemObject, SHMEM_PAGES, SHMEM_SLOT};
use cr_ebpf_resources::ghost::data_runs;
use rayon::prelude::*;

use crate::{error::proc_err, DumpError};

const PAGE: u64 = 4096;

/// What a chain's page store holds for one object: the hash of each page
/// by offset. A page it does not list reads as zeros.
pub(crate) type View = HashMap<u64, u64>;

/// What [`place`] decided for a process's objects.
#[derive(Default)]
pub(crate) struct Placed {
    /// Pages to store, at their pseudo addresses.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// The chain's view of each object (by id) once they are stored, with
    /// its base.
    pub views: HashMap<u64, (u64, View)>,
    /// Objects inheriting from the parent image.
    pub inherited: usize,
}

/// The hash of a page of zeros.
fn zero_hash() -> u64 {
    page_hash(&[0u8; PAGE as usize])
}

/// Bytes read at once by one worker.
const PIECE: u64 = 256 * PAGE;

/// One piece's pages: every page's hash, and the pages to store.
type Piece = (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>);

/// Reads the contents of every object of `objects` whose file `files`
/// holds (the objects this process stores) and plans them as pages at
/// pseudo addresses.
///
/// An object the `parent` image of the same process stored in its page
/// store, and whose stored contents `prev` knows (by the parent's object),
/// keeps its base and stores only the pages that differ; any other is
/// stored whole at a base of its own. Pages are hashed only for that
/// comparison and for the views of [`Placed`], which only a chain that
/// goes on wants (`keep_views`; a one-off dump does not).
pub(crate) fn place(
    pid: i32,
    objects: &mut [ShmemObject],
    files: &HashMap<u64, File>,
    parent: Option<&Manifest>,
    mut prev: impl FnMut(&ShmemObject) -> Option<View>,
    keep_views: bool,
    pool: &rayon::ThreadPool,
) -> Result<Placed, DumpError> {
    let mut out = Placed::default();
    let mut used: HashSet<u64> = parent
        .map(|p| p.shmem.iter().map(|o| o.base).collect())
        .unwrap_or_default();
    let mut next = 0u64;
    for o in objects.iter_mut() {
        let Some(f) = files.get(&o.id) else { continue };
        let before = parent.and_then(|p| {
            p.shmem
                .iter()
                .find(|x| x.id == o.id && x.kind == o.kind && x.base != 0 && !x.elsewhere)
        });
        let view = before.and_then(&mut prev);
        let base = match before {
            Some(b) => b.base,
            None => loop {
                let b = SHMEM_PAGES + next * SHMEM_SLOT;
                next += 1;
                if used.insert(b) {
                    break b;
                }
            },
        };
        let what = || format!("shared memory object {} ({:?})", o.id, o.kind);
        let runs = data_runs(f, o.size).map_err(proc_err(pid, what()))?;
        let end = o.size.div_ceil(PAGE) * PAGE;
        let pieces = pieces(&runs, end);
        let zero = zero_hash();
        let hashing = view.is_some() || keep_views;
        let read: Result<Vec<Piece>, std::io::Error> = pool.install(|| {
            pieces
                .par_iter()
                .map_init(
                    || vec![0u8; PIECE as usize],
                    |buf, &(off, len)| {
                        read_piece(f, buf, off, len, o.size, hashing, |a, h| {
                            view.as_ref()
                                .is_none_or(|v| v.get(&a).copied().unwrap_or(zero) != h)
                        })
                    },
                )
                .collect()
        });
        let read = read.map_err(proc_err(pid, what()))?;
        let mut keep = Vec::new();
        let view = match view {
            Some(mut v) => {
                v.retain(|&off, _| off < end);
                let mut seen = HashSet::new();
                for (hashes, pages) in read {
                    for (off, h) in hashes {
                        seen.insert(off);
                        v.insert(off, h);
                    }
                    keep.extend(pages);
                }
                // Pages the chain holds that are holes now.
                let holes: Vec<u64> = v
                    .iter()
                    .filter(|(off, h)| **h != zero && !seen.contains(off))
                    .map(|(off, _)| *off)
                    .collect();
                for off in holes {
                    keep.push((off, vec![0u8; PAGE as usize]));
                    v.insert(off, zero);
                }
                o.inherits = true;
                out.inherited += 1;
                v
            }
            None => {
                let mut v = View::new();
                for (hashes, pages) in read {
                    v.extend(hashes);
                    keep.extend(pages);
                }
                v
            }
        };
        out.pages.extend(runs_at(keep, base));
        o.base = base;
        o.data.clear();
        if keep_views {
            out.views.insert(o.id, (base, view));
        }
    }
    Ok(out)
}

/// The data runs cut into page-aligned pieces of at most [`PIECE`] bytes
/// within `0..end`.
fn pieces(runs: &[(u64, u64)], end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, len) in runs {
        // tmpfs allocates whole pages: runs are page-aligned; one that is
        // not is widened (what lies around it in its pages is a hole).
        let mut off = start / PAGE * PAGE;
        let stop = (start + len).div_ceil(PAGE).saturating_mul(PAGE).min(end);
        if let Some(last) = out.last_mut().filter(|l: &&mut (u64, u64)| l.0 + l.1 > off) {
            off = last.0 + last.1;
        }
        while off < stop {
            let n = (stop - off).min(PIECE);
            out.push((off, n));
            off += n;
        }
    }
    out
}

/// Reads `len` bytes (whole pages, the last one possibly past `size`) at
/// `off` of `f` into `buf`, hashes each page (when `hashing`; otherwise
/// keeps them all) and keeps those `store` asks for (all of a piece in one
/// run when every page is kept).
fn read_piece(
    f: &File,
    buf: &mut [u8],
    off: u64,
    len: u64,
    size: u64,
    hashing: bool,
    store: impl Fn(u64, u64) -> bool,
) -> std::io::Result<Piece> {
    let b = &mut buf[..len as usize];
    let have = (size.saturating_sub(off)).min(len) as usize;
    b[have..].fill(0);
    f.read_exact_at(&mut b[..have], off)?;
    if !hashing {
        return Ok((Vec::new(), vec![(off, b.to_vec())]));
    }
    let mut hashes = Vec::with_capacity(b.len() / PAGE as usize);
    let mut kept: Vec<u64> = Vec::new();
    for (i, pg) in b.chunks_exact(PAGE as usize).enumerate() {
        let a = off + i as u64 * PAGE;
        let h = page_hash(pg);
        hashes.push((a, h));
        if store(a, h) {
            kept.push(a);
        }
    }
    let pages = if kept.len() == hashes.len() {
        vec![(off, b.to_vec())]
    } else {
        kept.iter()
            .map(|&a| {
                let i = (a - off) as usize;
                (a, b[i..i + PAGE as usize].to_vec())
            })
            .collect()
    };
    Ok((hashes, pages))
}

/// Pages and runs by offset, joined into runs of at most 256 pages at
/// `base`.
fn runs_at(mut pages: Vec<(u64, Vec<u8>)>, base: u64) -> Vec<(u64, Vec<u8>)> {
    pages.sort_unstable_by_key(|p| p.0);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, p) in pages {
        let a = base + off;
        match out.last_mut() {
            Some((s, b))
                if *s + b.len() as u64 == a && b.len() + p.len() <= 256 * PAGE as usize =>
            {
                b.extend_from_slice(&p)
            }
            _ => out.push((a, p)),
        }
    }
    out
}

/// The view of the object at `base` in a chain whose pages hash to
/// `hashes` (by address).
pub(crate) fn view_of(hashes: &HashMap<u64, u64>, base: u64) -> View {
    hashes
        .iter()
        .filter(|(a, _)| **a >= base && **a - base < SHMEM_SLOT)
        .map(|(a, h)| (a - base, *h))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cr_ebpf_image::ShmemKind;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
    }

    /// A memfd of `size` bytes and its object (id 7).
    fn memfd(size: u64) -> (HashMap<u64, File>, Vec<ShmemObject>) {
        // SAFETY: a NUL-terminated name; plain syscall.
        let fd = unsafe { libc::memfd_create(c"shm-pages".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        let o = ShmemObject {
            id: 7,
            kind: ShmemKind::Memfd,
            size,
            ..ShmemObject::default()
        };
        (HashMap::from([(7, f)]), vec![o])
    }

    fn punch(f: &File, off: u64, len: u64) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: fallocate on our memfd.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            )
        };
        assert_eq!(r, 0);
    }

    /// Stores the pages of `placed` at `base` into `store` (page offset ->
    /// contents) and returns the offsets stored.
    fn apply(store: &mut HashMap<u64, Vec<u8>>, placed: &Placed, base: u64) -> Vec<u64> {
        let mut offs = Vec::new();
        for (a, b) in &placed.pages {
            assert!(*a >= base && *a < base + SHMEM_SLOT);
            for (i, p) in b.chunks(PAGE as usize).enumerate() {
                let off = a - base + i as u64 * PAGE;
                store.insert(off, p.to_vec());
                offs.push(off);
            }
        }
        offs
    }

    /// The next checkpoint of `objs`, whose previous one placed `before`.
    fn again(
        objs: &mut [ShmemObject],
        files: &HashMap<u64, File>,
        before: &Placed,
        pool: &rayon::ThreadPool,
    ) -> Placed {
        let parent = Manifest {
            shmem: objs.to_vec(),
            ..Manifest::default()
        };
        let known = |o: &ShmemObject| before.views.get(&o.id).map(|v| v.1.clone());
        place(1, objs, files, Some(&parent), known, true, pool).unwrap()
    }

    #[test]
    fn a_first_store_is_whole_and_then_only_what_changed() {
        let pool = pool();
        let page = |v: u8| vec![v; PAGE as usize];
        let size = 4 * PAGE + 100;
        let (files, mut objs) = memfd(size);
        let f = &files[&7];
        for (i, v) in [1u8, 2, 3].iter().enumerate() {
            f.write_all_at(&page(*v), i as u64 * PAGE).unwrap();
        }
        f.write_all_at(&[9u8; 100], 4 * PAGE).unwrap();
        // Page 3 is a hole.
        let first = place(1, &mut objs, &files, None, |_| None, true, &pool).unwrap();
        let base = objs[0].base;
        assert!(base >= SHMEM_PAGES && !objs[0].inherits);
        let mut store = HashMap::new();
        let offs = apply(&mut store, &first, base);
        assert_eq!(offs, [0, PAGE, 2 * PAGE, 4 * PAGE]);
        assert_eq!(store[&(4 * PAGE)][..100], [9u8; 100]);
        assert!(store[&(4 * PAGE)][100..].iter().all(|&b| b == 0));

        // Page 1 written, page 2 punched out, page 3 written.
        f.write_all_at(&page(5), PAGE).unwrap();
        punch(f, 2 * PAGE, PAGE);
        f.write_all_at(&page(6), 3 * PAGE).unwrap();
        let second = again(&mut objs, &files, &first, &pool);
        assert_eq!(objs[0].base, base);
        assert!(objs[0].inherits);
        let mut offs = apply(&mut store, &second, base);
        offs.sort_unstable();
        assert_eq!(offs, [PAGE, 2 * PAGE, 3 * PAGE]);
        assert_eq!(store[&0], page(1));
        assert_eq!(store[&PAGE], page(5));
        assert_eq!(store[&(2 * PAGE)], page(0));
        assert_eq!(store[&(3 * PAGE)], page(6));

        // Nothing changed: nothing stored.
        let third = again(&mut objs, &files, &second, &pool);
        assert!(third.pages.is_empty());

        // Shrunk to one page: nothing stored, the view forgets the rest.
        f.set_len(PAGE).unwrap();
        objs[0].size = PAGE;
        let fourth = again(&mut objs, &files, &third, &pool);
        assert!(fourth.pages.is_empty());
        assert_eq!(fourth.views[&7].1.len(), 1);
    }

    #[test]
    fn a_one_off_dump_stores_whole_and_keeps_no_hashes() {
        let pool = pool();
        let (files, mut objs) = memfd(3 * PAGE);
        files[&7]
            .write_all_at(&[1u8; 3 * PAGE as usize], 0)
            .unwrap();
        let placed = place(1, &mut objs, &files, None, |_| None, false, &pool).unwrap();
        assert!(placed.views.is_empty());
        let stored: usize = placed.pages.iter().map(|p| p.1.len()).sum();
        assert_eq!(stored, 3 * PAGE as usize);
        assert!(!objs[0].inherits && objs[0].base >= SHMEM_PAGES);
    }

    #[test]
    fn a_new_object_never_takes_a_base_the_parent_used() {
        let pool = pool();
        let (files, mut objs) = memfd(PAGE);
        files[&7].write_all_at(b"x", 0).unwrap();
        let parent = Manifest {
            shmem: vec![ShmemObject {
                id: 1,
                kind: ShmemKind::Memfd,
                size: PAGE,
                base: SHMEM_PAGES,
                ..ShmemObject::default()
            }],
            ..Manifest::default()
        };
        place(1, &mut objs, &files, Some(&parent), |_| None, true, &pool).unwrap();
        assert_eq!(objs[0].base, SHMEM_PAGES + SHMEM_SLOT);
        assert!(!objs[0].inherits);
    }

    #[test]
    fn pieces_are_page_aligned_and_bounded() {
        assert_eq!(
            pieces(&[(0, 3 * PAGE), (5 * PAGE + 10, 20)], 8 * PAGE),
            [(0, 3 * PAGE), (5 * PAGE, PAGE)]
        );
        assert_eq!(
            pieces(&[(0, 600 * PAGE)], 600 * PAGE),
            [(0, PIECE), (PIECE, PIECE), (2 * PIECE, 88 * PAGE)]
        );
        // Past the end of the object: nothing.
        assert_eq!(pieces(&[(0, 4 * PAGE)], 2 * PAGE), [(0, 2 * PAGE)]);
    }
}
