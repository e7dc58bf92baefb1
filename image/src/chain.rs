//! Chains of incremental checkpoints.
//!
//! An incremental image stores only the pages that changed since its parent;
//! a mapping flagged [`MAP_INHERITS`] takes every page it does not store from
//! the parent's mapping with the same range, and so on down the chain until
//! a mapping without the flag (or the full base). [`Chain::open`] reads an
//! image and its ancestors and resolves every page of the newest one to the
//! newest copy that holds it, as a list of [`Fill`]s that restore and
//! compaction process in parallel.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{
    pages::{ChunkRef, PageStore, MAX_CHUNK_PAGES, PAGE},
    ImageError, Manifest, MappingKind, MAP_INHERITS, SHMEM_PAGES, SHMEM_PAGES_END,
};

/// Longest chain accepted (a loop or a runaway chain is an error).
pub const MAX_CHAIN: usize = 100_000;

/// One image of a chain.
pub struct Link {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest as stored.
    pub manifest: Manifest,
    /// Its page store.
    pub store: PageStore,
}

/// Pages to copy out of one stored chunk.
#[derive(Debug, Clone)]
pub struct Fill {
    /// Which link holds the chunk (0 is the newest image).
    pub level: usize,
    /// The chunk.
    pub chunk: ChunkRef,
    /// `(first page in the chunk, pages)` to take from it, in order.
    pub pieces: Vec<(u32, u32)>,
}

impl Fill {
    /// Whether it holds shared memory contents (pseudo addresses from
    /// [`SHMEM_PAGES`]), not the process's own memory.
    pub fn is_shmem(&self) -> bool {
        (SHMEM_PAGES..SHMEM_PAGES_END).contains(&self.chunk.vaddr)
    }

    /// Pages this fill provides.
    pub fn pages(&self) -> u64 {
        self.pieces.iter().map(|p| p.1 as u64).sum()
    }
}

/// An image with its ancestors, every page resolved to its newest copy.
pub struct Chain {
    links: Vec<Link>,
    fills: Vec<Fill>,
    manifest: Manifest,
}

impl Chain {
    /// Reads the image in `dir` and every ancestor it names (checkpoints
    /// beside the one holding `dir`; of a tree checkpoint, the image of the
    /// same process), checks that they fit together, and resolves the pages.
    /// Fails, naming the image, if an ancestor is missing or damaged.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let mut links: Vec<Link> = Vec::new();
        let mut cur = dir.to_path_buf();
        // A parent's manifest read while finding it, not read again.
        let mut next_manifest: Option<Manifest> = None;
        loop {
            let manifest = match next_manifest.take() {
                Some(m) => m,
                None => Manifest::read(&cur)?,
            };
            let store = PageStore::open(&cur)?;
            let parent = manifest.chain.as_ref().map(|c| c.parent.clone());
            if let Some(child) = links.last() {
                check_link(&child.manifest, &child.dir, &manifest, &cur)?;
            }
            links.push(Link {
                dir: cur.clone(),
                manifest,
                store,
            });
            match parent {
                Some(p) if !p.is_empty() => {
                    if links.len() >= MAX_CHAIN {
                        return Err(corrupt(
                            dir,
                            format!("chain longer than {MAX_CHAIN} images (a loop?)"),
                        ));
                    }
                    let pid = links.last().map_or(0, |l| l.manifest.process.pid);
                    let ckpt = crate::images_dir::checkpoint_of(&cur);
                    let parent = ckpt.parent().unwrap_or(Path::new(".")).join(&p);
                    let missing = |what: String| ImageError::Corrupt {
                        path: cur.join(crate::MANIFEST_FILE).display().to_string(),
                        offset: 0,
                        what,
                    };
                    if !crate::images_dir::is_image(&parent) {
                        return Err(missing(format!(
                            "its parent checkpoint {} is missing: this checkpoint \
                             cannot be restored (restore an older full one, or one \
                             whose chain is complete)",
                            parent.display()
                        )));
                    }
                    let no_image = || {
                        missing(format!(
                            "its parent checkpoint {} holds no image of process {pid}",
                            parent.display()
                        ))
                    };
                    let next = if crate::tree::is_tree(&parent) {
                        crate::images_dir::process_image(&parent, pid)?.ok_or_else(no_image)?
                    } else {
                        let m = Manifest::read(&parent)?;
                        if m.process.pid != pid {
                            return Err(no_image());
                        }
                        next_manifest = Some(m);
                        parent.clone()
                    };
                    cur = next;
                }
                _ => break,
            }
        }
        let (fills, manifest) = resolve(&links)?;
        Ok(Self {
            links,
            fills,
            manifest,
        })
    }

    /// The newest image's manifest, with `pages_stored` counting every page
    /// resolved through the chain and no mapping flagged as inheriting.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The images, newest first.
    pub fn links(&self) -> &[Link] {
        &self.links
    }

    /// What to copy from where; every page appears once.
    pub fn fills(&self) -> &[Fill] {
        &self.fills
    }

    /// Pages resolved.
    pub fn pages(&self) -> u64 {
        self.fills.iter().map(Fill::pages).sum()
    }

    /// Reads the contents of every shared memory object kept in the page
    /// stores into the object's `data` in [`Chain::manifest`] (what the
    /// restore writes into the object before the process maps it).
    pub fn load_shmem(&mut self) -> Result<(), ImageError> {
        let mut bases: Vec<(u64, usize)> = (self.manifest.shmem.iter().enumerate())
            .filter(|(_, o)| o.base != 0)
            .map(|(i, o)| (o.base, i))
            .collect();
        if bases.is_empty() {
            return Ok(());
        }
        bases.sort_unstable();
        let mut runs: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); self.manifest.shmem.len()];
        let mut scratch = Vec::new();
        let shm: u64 = self
            .fills
            .iter()
            .filter(|f| f.is_shmem())
            .map(Fill::pages)
            .sum();
        crate::progress::start("loading shared memory", shm);
        for f in self.fills.iter().filter(|f| f.is_shmem()) {
            crate::progress::add(f.pages());
            self.read(
                f,
                &mut scratch,
                |addr, bytes| {
                    let k = bases.partition_point(|b| b.0 <= addr);
                    let Some(&(base, i)) = k.checked_sub(1).map(|k| &bases[k]) else {
                        return Err(format!(
                            "shared memory pages at {addr:#x} belong to no object"
                        ));
                    };
                    let (off, size) = (addr - base, self.manifest.shmem[i].size);
                    let n = (bytes.len() as u64).min(size.saturating_sub(off)) as usize;
                    runs[i].push((off, bytes[..n].to_vec()));
                    Ok(())
                },
                |e| e,
            )
            .map_err(|what| corrupt(&self.links[0].dir, what))?;
        }
        for (o, mut r) in self.manifest.shmem.iter_mut().zip(runs) {
            r.sort_unstable_by_key(|x| x.0);
            if o.base != 0 {
                o.data = r;
            }
        }
        Ok(())
    }

    /// Asks the kernel to read every page store of the chain ahead (see
    /// [`crate::pages::PageStore::read_ahead`]).
    pub fn read_ahead(&self) {
        for l in &self.links {
            l.store.read_ahead();
        }
    }

    /// Starts reading fill `f`'s chunk from the disk without waiting (see
    /// [`crate::pages::PageStore::will_need`]).
    pub fn will_need(&self, f: &Fill) {
        self.links[f.level].store.will_need(&f.chunk);
    }

    /// Checks fill `f`'s chunk and, when its pages are stored as they are,
    /// gives the whole chunk's pages where they lie in the page store's
    /// mapping (no copy; `f.pieces` says which of them to use); `None` for
    /// a compressed chunk (use [`Self::read`]).
    pub fn pages_in_place(&self, f: &Fill) -> Result<Option<&[u8]>, String> {
        let link = &self.links[f.level];
        link.store
            .pages_in_place(&f.chunk)
            .map_err(|e| format!("{}: {e}", link.dir.display()))
    }

    /// Checks `f`'s chunk, decompresses it into `scratch` unless its pages
    /// are stored as they are (then used where they lie), and calls
    /// `each(address, bytes)` for every piece.
    pub fn read<E>(
        &self,
        f: &Fill,
        scratch: &mut Vec<u8>,
        each: impl FnMut(u64, &[u8]) -> Result<(), E>,
        err: impl FnOnce(String) -> E,
    ) -> Result<(), E> {
        self.read_in(f, None, scratch, each, err)
    }

    /// Where `f`'s chunk lies in its link's `pages.img`
    /// ([`PageStore::extent`](crate::pages::PageStore::extent)).
    pub fn extent(&self, f: &Fill) -> std::ops::Range<usize> {
        self.links[f.level].store.extent(&f.chunk)
    }

    /// [`Self::read`] from `ext`, the bytes of `f`'s [`Self::extent`] read
    /// by the caller from its link's `pages.img`, instead of the store's
    /// mapping.
    pub fn read_from<E>(
        &self,
        f: &Fill,
        ext: &[u8],
        scratch: &mut Vec<u8>,
        each: impl FnMut(u64, &[u8]) -> Result<(), E>,
        err: impl FnOnce(String) -> E,
    ) -> Result<(), E> {
        self.read_in(f, Some(ext), scratch, each, err)
    }

    fn read_in<E>(
        &self,
        f: &Fill,
        ext: Option<&[u8]>,
        scratch: &mut Vec<u8>,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
        err: impl FnOnce(String) -> E,
    ) -> Result<(), E> {
        let n = f.chunk.npages as usize * PAGE;
        let link = &self.links[f.level];
        let fail = |e: String| format!("{}: {e}", link.dir.display());
        let in_place = match ext {
            Some(ext) => link.store.pages_from(&f.chunk, ext),
            None => link.store.pages_in_place(&f.chunk),
        };
        // Pages stored as they are are used where they lie (checked there):
        // no copy into `scratch`.
        let data = match in_place {
            Ok(Some(d)) => d,
            Ok(None) => {
                if scratch.len() < n {
                    scratch.resize(MAX_CHUNK_PAGES as usize * PAGE, 0);
                }
                let out = &mut scratch[..n];
                let r = match ext {
                    Some(ext) => link.store.decompress_from(&f.chunk, ext, out),
                    None => link.store.decompress_into(&f.chunk, out),
                };
                if let Err(e) = r {
                    return Err(err(fail(e)));
                }
                &scratch[..n]
            }
            Err(e) => return Err(err(fail(e))),
        };
        for &(first, pages) in &f.pieces {
            let a = first as usize * PAGE;
            each(
                f.chunk.vaddr + a as u64,
                &data[a..a + pages as usize * PAGE],
            )?;
        }
        Ok(())
    }
}

fn corrupt(dir: &Path, what: String) -> ImageError {
    ImageError::Corrupt {
        path: dir.join(crate::MANIFEST_FILE).display().to_string(),
        offset: 0,
        what,
    }
}

fn check_link(
    child: &Manifest,
    child_dir: &Path,
    parent: &Manifest,
    dir: &Path,
) -> Result<(), ImageError> {
    let (c, p) = match (&child.chain, &parent.chain) {
        (Some(c), Some(p)) => (c, p),
        _ => {
            return Err(corrupt(
                dir,
                format!(
                    "named as the parent of {} but is not part of a chain",
                    child_dir.display()
                ),
            ))
        }
    };
    if p.id != c.parent || p.seq >= c.seq {
        return Err(corrupt(
            dir,
            format!(
                "is checkpoint {:?} (#{}), but {} expects its parent {:?} with a smaller number \
                 than #{} (directories renamed or mixed up?)",
                p.id,
                p.seq,
                child_dir.display(),
                c.parent,
                c.seq
            ),
        ));
    }
    if child.process.pid != parent.process.pid {
        return Err(corrupt(
            dir,
            format!(
                "is a checkpoint of process {}, its child {} of process {}",
                parent.process.pid,
                child_dir.display(),
                child.process.pid
            ),
        ));
    }
    Ok(())
}

/// Disjoint address ranges already claimed by a newer image.
#[derive(Default)]
struct Claimed(BTreeMap<u64, u64>);

impl Claimed {
    /// Claims the parts of `s..e` nobody claimed yet and returns them.
    fn claim(&mut self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut overlapping: Vec<(u64, u64)> = Vec::new();
        if let Some((&a, &b)) = self.0.range(..=s).next_back() {
            if b > s {
                overlapping.push((a, b));
            }
        }
        for (&a, &b) in self.0.range(s..e) {
            if overlapping.last() != Some(&(a, b)) {
                overlapping.push((a, b));
            }
        }
        let mut free = Vec::new();
        let mut cur = s;
        for &(a, b) in &overlapping {
            if a > cur {
                free.push((cur, a));
            }
            cur = cur.max(b);
        }
        if cur < e {
            free.push((cur, e));
        }
        let lo = overlapping.first().map_or(s, |o| o.0.min(s));
        let hi = overlapping.last().map_or(e, |o| o.1.max(e));
        for (a, _) in overlapping {
            self.0.remove(&a);
        }
        self.0.insert(lo, hi);
        free
    }
}

/// A range of the newest image whose pages are resolved: a mapping, or a
/// shared memory object's pseudo addresses in the page store.
struct Region {
    start: u64,
    /// The end at each level it may look at (0 to its depth): an object
    /// that was smaller in an image takes nothing past that size from it
    /// or from older ones.
    ends: Vec<u64>,
    /// Pages are never taken for it (vDSO and the like).
    skip: bool,
    /// A mapping's index, or `None` for shared memory.
    mapping: Option<usize>,
}

impl Region {
    fn depth(&self) -> usize {
        self.ends.len() - 1
    }
}

/// The newest image's mappings as regions, each with how deep it may look
/// for pages.
fn mapping_regions(links: &[Link], out: &mut Vec<Region>) -> Result<(), ImageError> {
    let tip = &links[0].manifest;
    for (i, m) in tip.mappings.iter().enumerate() {
        let mut level = 0;
        let mut cur = m;
        while cur.flags & MAP_INHERITS != 0 {
            let next = level + 1;
            let Some(link) = links.get(next) else {
                return Err(corrupt(
                    &links[level].dir,
                    format!(
                        "mapping {:#x}-{:#x} inherits from a missing parent",
                        m.start, m.end
                    ),
                ));
            };
            let parent = link
                .manifest
                .mappings
                .binary_search_by_key(&m.start, |p| p.start)
                .ok()
                .map(|i| &link.manifest.mappings[i])
                .filter(|p| p.end == m.end && p.kind == m.kind);
            let Some(parent) = parent else {
                return Err(corrupt(
                    &links[level].dir,
                    format!(
                        "mapping {:#x}-{:#x} inherits pages, but the parent {} has no such mapping",
                        m.start,
                        m.end,
                        link.dir.display()
                    ),
                ));
            };
            cur = parent;
            level = next;
        }
        out.push(Region {
            start: m.start,
            ends: vec![m.end; level + 1],
            skip: matches!(
                m.kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
            ),
            mapping: Some(i),
        });
    }
    Ok(())
}

/// The shared memory objects whose contents the newest image keeps in the
/// page store, as regions, each following its parents while they inherit.
fn shmem_regions(links: &[Link], out: &mut Vec<Region>) -> Result<(), ImageError> {
    let tip = &links[0].manifest;
    let mut objects: Vec<&crate::ShmemObject> = tip.shmem.iter().filter(|o| o.base != 0).collect();
    objects.sort_by_key(|o| o.base);
    let page = PAGE as u64;
    for o in objects {
        let mut ends = vec![o.base + o.size.div_ceil(page) * page];
        let mut cur = o;
        let mut level = 0;
        while cur.inherits {
            let next = level + 1;
            let parent = links.get(next).and_then(|l| {
                l.manifest
                    .shmem
                    .iter()
                    .find(|p| p.base == o.base && p.id == o.id && !p.elsewhere)
            });
            let Some(parent) = parent else {
                return Err(corrupt(
                    &links[level].dir,
                    format!(
                        "shared memory object {} inherits pages, but the parent image has no \
                         such object in its page store",
                        o.id
                    ),
                ));
            };
            let end = parent.base + parent.size.div_ceil(page) * page;
            ends.push(end.min(ends[level]));
            cur = parent;
            level = next;
        }
        out.push(Region {
            start: o.base,
            ends,
            skip: false,
            mapping: None,
        });
    }
    Ok(())
}

fn resolve(links: &[Link]) -> Result<(Vec<Fill>, Manifest), ImageError> {
    let tip = &links[0].manifest;
    let mut regions = Vec::with_capacity(tip.mappings.len() + tip.shmem.len());
    mapping_regions(links, &mut regions)?;
    shmem_regions(links, &mut regions)?;
    // Objects lie between user space and the vsyscall page.
    regions.sort_by_key(|r| r.start);
    if let Some(w) = regions.windows(2).find(|w| w[0].ends[0] > w[1].start) {
        return Err(corrupt(
            &links[0].dir,
            format!(
                "ranges {:#x}-{:#x} and {:#x}-{:#x} overlap",
                w[0].start, w[0].ends[0], w[1].start, w[1].ends[0]
            ),
        ));
    }
    let mut claimed = Claimed::default();
    let mut resolved = vec![0u64; tip.mappings.len()];
    let mut fills = Vec::new();
    for (level, link) in links.iter().enumerate() {
        for c in link.store.chunks() {
            let (cs, ce) = (c.vaddr, c.vaddr + c.npages as u64 * PAGE as u64);
            let first = regions.partition_point(|r| r.ends[0] <= cs);
            let mut pieces = Vec::new();
            let mut covered = 0u64;
            for r in regions.iter().skip(first) {
                if r.start >= ce {
                    break;
                }
                covered += ce.min(r.ends[0]) - cs.max(r.start);
                if r.depth() < level || r.skip {
                    continue;
                }
                let (s, e) = (cs.max(r.start), ce.min(r.ends[level]));
                if s >= e {
                    continue;
                }
                for (a, b) in claimed.claim(s, e) {
                    if let Some(i) = r.mapping {
                        resolved[i] += (b - a) / PAGE as u64;
                    }
                    pieces.push((
                        ((a - cs) / PAGE as u64) as u32,
                        ((b - a) / PAGE as u64) as u32,
                    ));
                }
            }
            if level == 0 && covered != ce - cs {
                return Err(corrupt(
                    &link.dir,
                    format!("stored pages at {cs:#x}-{ce:#x} lie outside every mapping"),
                ));
            }
            if !pieces.is_empty() {
                fills.push(Fill {
                    level,
                    chunk: *c,
                    pieces,
                });
            }
        }
    }
    let mut manifest = tip.clone();
    for (m, n) in manifest.mappings.iter_mut().zip(resolved) {
        m.flags &= !MAP_INHERITS;
        m.pages_stored = n;
    }
    for o in &mut manifest.shmem {
        o.inherits = false;
    }
    Ok((fills, manifest))
}

#[cfg(test)]
mod tests {
    use super::Claimed;

    #[test]
    fn claims_only_what_is_free() {
        let mut c = Claimed::default();
        assert_eq!(c.claim(10, 20), vec![(10, 20)]);
        assert_eq!(c.claim(5, 25), vec![(5, 10), (20, 25)]);
        assert_eq!(c.claim(30, 40), vec![(30, 40)]);
        assert_eq!(c.claim(0, 50), vec![(0, 5), (25, 30), (40, 50)]);
        assert_eq!(c.claim(12, 14), vec![]);
        assert_eq!(c.0.len(), 1);
    }
}
