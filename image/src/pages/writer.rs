//! Writing a page store: chunks appended as they come, and, for a dump
//! whose pages were stored while the process still ran, chunks revised
//! afterwards (pages written since patched in, pages no longer there left
//! out), their old place turned into padding when the new version does not
//! fit it.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use super::direct::DirectSink;
use super::{Chunk, CHUNK_HEADER, INDEX_MAGIC, MAX_CHUNK_PAGES, PAD, PAGE, RAW};
use crate::{
    file::{self, FileKind, HEADER_LEN},
    ImageError,
};

/// Bytes handed to the kernel after which their write-back is started.
const KICK_BYTES: u64 = 8 << 20;
/// Appended bytes kept before they are written.
const BUFFER: usize = 1 << 20;
/// Bytes of buffered writes timed before [`PageWriter::write_adaptive`]
/// looks at their rate.
const ADAPT_LOOK: u64 = 32 << 20;
/// Bytes per second below which buffered writes are slower than direct
/// ones were on this machine's disk (1.5-2.2 GB/s, eight 2 MiB writes in
/// flight).
pub const SLOW_BUFFERED: f64 = 2.0e9;
/// Chunk data of at least this many bytes is written from where it is,
/// not copied into the buffer first.
const DIRECT: usize = 64 << 10;

/// Writes all of `parts`, one after the other, at `at` in `file`.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut at: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: every iovec points into a slice borrowed for the call;
        // the kernel only reads them.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        at += n as u64;
        let mut n = n as usize;
        while n > 0 {
            let first = parts[0].len().min(n);
            n -= first;
            if first == parts[0].len() {
                parts.remove(0);
            } else {
                parts[0] = &parts[0][first..];
            }
        }
    }
    Ok(())
}

/// One chunk (or padding) of the store, in file order.
#[derive(Debug, Clone)]
struct Slot {
    /// Its header as in the file.
    header: [u8; CHUNK_HEADER],
    /// Offset of the header in the payload (after the file header).
    at: u64,
    /// Bytes after the header.
    len: u64,
    /// CRC-32 of those bytes.
    data_crc: u32,
    /// Pages (0: padding).
    pages: u32,
}

impl Slot {
    /// CRC-32 of the slot's bytes, header and data.
    fn crc(&self) -> crc32fast::Hasher {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.header);
        h.combine(&crc32fast::Hasher::new_with_initial_len(
            self.data_crc,
            self.len,
        ));
        h
    }
}

/// The CRC-32 state of `len` zero bytes (`len` a multiple of the page
/// size, at most a chunk): from a table made once.
fn zeros(len: u64) -> crc32fast::Hasher {
    static TABLE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let page =
            crc32fast::Hasher::new_with_initial_len(crc32fast::hash(&[0; PAGE]), PAGE as u64);
        let mut all = Vec::with_capacity(MAX_CHUNK_PAGES as usize + 1);
        let mut h = crc32fast::Hasher::new();
        all.push(h.clone().finalize());
        for _ in 0..MAX_CHUNK_PAGES {
            h.combine(&page);
            all.push(h.clone().finalize());
        }
        all
    });
    let k = (len / PAGE as u64) as usize;
    debug_assert!(len.is_multiple_of(PAGE as u64) && k < t.len());
    crc32fast::Hasher::new_with_initial_len(t[k], len)
}

/// The header of chunk `c`.
fn chunk_header(c: &Chunk) -> [u8; CHUNK_HEADER] {
    let count = if c.stored_raw {
        c.npages | RAW
    } else {
        c.npages
    };
    header(c.vaddr, count, c.data.len() as u32, c.crc, c.raw_crc)
}

fn header(vaddr: u64, count: u32, len: u32, crc: u32, raw_crc: u32) -> [u8; CHUNK_HEADER] {
    let mut h = [0u8; CHUNK_HEADER];
    h[0..8].copy_from_slice(&vaddr.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h[20..24].copy_from_slice(&raw_crc.to_le_bytes());
    let hcrc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// How [`PageWriter::apply`] brings a chunk up to date.
#[derive(Debug)]
pub enum Edit {
    /// Nothing changed.
    Keep,
    /// Stored as they are, some pages patched in place: the chunk's new
    /// header and data checksum, and the bytes to write at their offsets
    /// in its data.
    Patch {
        /// The chunk.
        slot: usize,
        /// Its new header.
        header: [u8; CHUNK_HEADER],
        /// CRC-32 of its new data.
        crc: u32,
        /// (offset in the data, bytes).
        writes: Vec<(u64, Vec<u8>)>,
    },
    /// The chunk becomes padding and these chunks are appended.
    Replace {
        /// The chunk.
        slot: usize,
        /// What replaces it.
        chunks: Vec<Chunk>,
    },
}

/// Streams chunks into `pages.img`.
pub struct PageWriter {
    path: PathBuf,
    file: File,
    /// Appended bytes not written yet; they start at payload offset
    /// `len - buf.len()`.
    buf: Vec<u8>,
    /// Payload bytes appended.
    len: u64,
    /// Every chunk and padding, in file order.
    slots: Vec<Slot>,
    /// Bytes of the file already sent to the disk by [`Self::kick`].
    kicked: u64,
    /// Where appended bytes go instead of `buf`, past the page cache (see
    /// [`Self::write_direct`]).
    direct: Option<DirectSink>,
    /// Buffered writes measured, to go past the page cache when they are
    /// slow (see [`Self::write_adaptive`]): bytes and time since the last
    /// look.
    adapt: Option<(u64, std::time::Duration, f64)>,
}

impl PageWriter {
    /// Creates `pages.img` in `dir`.
    pub fn create(dir: &Path) -> Result<Self, ImageError> {
        Self::create_at(&dir.join(crate::PAGES_FILE))
    }

    /// Creates a page store at `path` (moved into an image by
    /// [`Self::move_into`]).
    pub fn create_at(path: &Path) -> Result<Self, ImageError> {
        let f = crate::trust::create_private_file(path).map_err(file::io(path, "creating"))?;
        // Placeholder; the real header is written by finish().
        f.write_all_at(&[0u8; HEADER_LEN], 0)
            .map_err(file::io(path, "writing"))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: f,
            buf: Vec::with_capacity(BUFFER),
            len: 0,
            slots: Vec::new(),
            kicked: 0,
            direct: None,
            adapt: None,
        })
    }

    /// From now on, chunks appended go to the disk directly (`O_DIRECT`,
    /// large blocks, several in flight), until [`Self::flush_all`] or
    /// [`Self::finish`]: for a large store written in one go. False
    /// (nothing changes) where the file system does not take it.
    pub fn write_direct(&mut self) -> bool {
        if self.direct.is_some() {
            return true;
        }
        if self.flush().is_err() {
            return false;
        }
        // From the page holding the end on: what is written of it read
        // back and carried over (the header's place, zeroes until
        // `finish`, on a new store).
        let end = HEADER_LEN as u64 + self.len;
        let at = end / PAGE as u64 * PAGE as u64;
        let mut head = vec![0u8; (end - at) as usize];
        if self.file.read_exact_at(&mut head, at).is_err() {
            return false;
        }
        let Some(mut d) = DirectSink::open(&self.path, at) else {
            return false;
        };
        if d.push(&head).is_err() {
            return false;
        }
        self.direct = Some(d);
        true
    }

    /// Allocates disk space for `chunks` more chunks of `pages` pages in
    /// all, stored as they are, after what is written. Writing into space
    /// allocated at once costs the kernel less than allocating it as the
    /// pages reach the disk; what is not used is given back by
    /// [`Self::finish`]. Only when the file system has four times that
    /// free. Advice: a failure changes nothing (a full disk fails the
    /// writes that need the space).
    pub fn reserve(&mut self, pages: u64, chunks: u64) {
        use std::os::fd::AsRawFd as _;
        let at = HEADER_LEN as u64 + self.len;
        let bytes = pages * PAGE as u64 + chunks * CHUNK_HEADER as u64;
        if bytes == 0 {
            return;
        }
        // Compressible pages take far less than this: never the space
        // others on the file system may need meanwhile.
        // SAFETY: a plain syscall on our descriptor, into our struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) } != 0
            || (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < bytes.saturating_mul(4)
        {
            return;
        }
        // SAFETY: a plain syscall on the descriptor `file` owns.
        unsafe { libc::fallocate(self.file.as_raw_fd(), 0, at as i64, bytes as i64) };
    }

    /// Appends through the page cache while that is fast, and past it
    /// (as [`Self::write_direct`]) from the moment buffered writes fall
    /// below `slow_below` bytes a second ([`SLOW_BUFFERED`] is what
    /// direct writes did on this machine's disk): on a machine whose fresh
    /// memory is slow to get (a virtual machine whose host takes freed
    /// memory back), a buffered write can take ten times as long as at
    /// other moments, while a direct one does not depend on it; when
    /// memory is fast the buffered write is the faster.
    pub fn write_adaptive(&mut self, slow_below: f64) {
        self.adapt = Some((0, std::time::Duration::ZERO, slow_below));
    }

    /// Whether appended chunks now go past the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Counts `bytes` handed to the page cache in `took`; past a look's
    /// worth, goes past the page cache if that was slow.
    fn measured(&mut self, bytes: usize, took: std::time::Duration) {
        let Some((b, t, slow_below)) = &mut self.adapt else {
            return;
        };
        *b += bytes as u64;
        *t += took;
        if *b < ADAPT_LOOK {
            return;
        }
        let slow = (*b as f64) < *slow_below * t.as_secs_f64();
        *b = 0;
        *t = std::time::Duration::ZERO;
        if slow && self.write_direct() {
            self.adapt = None;
        }
    }

    /// Renames the store to `pages.img` in `dir` (the same file system).
    pub fn move_into(&mut self, dir: &Path) -> Result<(), ImageError> {
        let to = dir.join(crate::PAGES_FILE);
        std::fs::rename(&self.path, &to).map_err(file::io(&to, "renaming into place"))?;
        self.path = to;
        Ok(())
    }

    /// Appends a chunk; returns its number, for [`Self::revise`].
    pub fn write(&mut self, c: &Chunk) -> Result<usize, ImageError> {
        let h = chunk_header(c);
        self.append(h, &c.data, c.crc, c.npages)
    }

    fn append(
        &mut self,
        header: [u8; CHUNK_HEADER],
        data: &[u8],
        data_crc: u32,
        pages: u32,
    ) -> Result<usize, ImageError> {
        self.slots.push(Slot {
            header,
            at: self.len,
            len: data.len() as u64,
            data_crc,
            pages,
        });
        self.len += (CHUNK_HEADER + data.len()) as u64;
        if let Some(d) = &mut self.direct {
            return d
                .push(&header)
                .and_then(|()| d.push(data))
                .map(|()| self.slots.len() - 1)
                .map_err(file::io(&self.path, "writing"));
        }
        self.buf.extend_from_slice(&header);
        let t = std::time::Instant::now();
        if data.len() >= DIRECT {
            // Large data goes to the kernel from where it is, after what
            // is buffered: one copy less.
            let n = self.buf.len() + data.len();
            let at = HEADER_LEN as u64 + self.len - n as u64;
            write_all_vectored_at(&self.file, &[&self.buf, data], at)
                .map_err(file::io(&self.path, "writing"))?;
            self.buf.clear();
            self.kick();
            self.measured(n, t.elapsed());
            return Ok(self.slots.len() - 1);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BUFFER {
            let n = self.buf.len();
            self.flush()?;
            self.measured(n, t.elapsed());
        }
        Ok(self.slots.len() - 1)
    }

    /// Writes what is buffered.
    fn flush(&mut self) -> Result<(), ImageError> {
        if let Some(d) = self.direct.take() {
            d.finish(&self.file)
                .map_err(file::io(&self.path, "writing"))?;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let at = HEADER_LEN as u64 + self.len - self.buf.len() as u64;
        self.file
            .write_all_at(&self.buf, at)
            .map_err(file::io(&self.path, "writing"))?;
        self.buf.clear();
        self.kick();
        Ok(())
    }

    /// Starts writing back what the kernel holds of the store once
    /// [`KICK_BYTES`] more are there, so that the disk works while chunks
    /// are still made and the final fsync finds little left to write (a
    /// 1 GiB store otherwise reached the disk only in `finish`).
    fn kick(&mut self) {
        use std::os::fd::AsRawFd as _;
        let handed = HEADER_LEN as u64 + self.len;
        if handed < self.kicked + KICK_BYTES {
            return;
        }
        // SAFETY: a plain syscall on the descriptor `file` owns; it only
        // starts write-back of the range. Advice: a failure changes
        // nothing, the fsync in `finish` writes whatever is left.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.kicked as i64,
                (handed - self.kicked) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.kicked = handed;
    }

    /// Writes what is buffered, so that [`Self::plan`] can read every
    /// chunk back.
    pub fn flush_all(&mut self) -> Result<(), ImageError> {
        self.flush()
    }

    /// Removes the store: nothing of it is used.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// An error about chunk `slot`, at its offset in the file.
    fn corrupt(&self, slot: usize, what: String) -> ImageError {
        ImageError::Corrupt {
            path: self.path.display().to_string(),
            offset: HEADER_LEN as u64 + self.slots[slot].at,
            what,
        }
    }

    /// Chunk `slot`, which must be a chunk (not padding) all written.
    fn revisable(&self, slot: usize) -> Result<&Slot, ImageError> {
        let s = &self.slots[slot];
        if s.pages == 0 || !self.buf.is_empty() || self.direct.is_some() {
            return Err(self.corrupt(slot, "revising padding or an unwritten chunk".into()));
        }
        Ok(s)
    }

    /// The pages of chunk `slot`, read back and checked.
    fn read_back(&self, slot: usize) -> Result<(u64, Vec<u8>), ImageError> {
        let s = self.revisable(slot)?;
        let corrupt = |what: String| self.corrupt(slot, what);
        let mut data = vec![0u8; s.len as usize];
        self.file
            .read_exact_at(&mut data, HEADER_LEN as u64 + s.at + CHUNK_HEADER as u64)
            .map_err(file::io(&self.path, "reading back"))?;
        if crc32fast::hash(&data) != s.data_crc {
            return Err(corrupt(
                "a chunk read back does not match what was written".into(),
            ));
        }
        let vaddr = u64::from_le_bytes(s.header[0..8].try_into().expect("8"));
        let count = u32::from_le_bytes(s.header[8..12].try_into().expect("4"));
        if count & RAW != 0 {
            return Ok((vaddr, data));
        }
        let mut out = vec![0u8; s.pages as usize * PAGE];
        match lz4_flex::block::decompress_into(&data, &mut out) {
            Ok(n) if n == out.len() => Ok((vaddr, out)),
            _ => Err(corrupt("a chunk read back does not decompress".into())),
        }
    }

    /// Brings chunk `slot` up to date: `patches` are pages (by index in
    /// the chunk) that now hold other bytes, `keep` says which of its pages
    /// are still stored. See [`Self::plan`].
    pub fn revise(
        &mut self,
        slot: usize,
        keep: &dyn Fn(u32) -> bool,
        patches: &[(u32, &[u8])],
    ) -> Result<(), ImageError> {
        self.flush()?;
        let e = self.plan(slot, keep, patches)?;
        self.apply(e)
    }

    /// What [`Self::apply`] must do to bring chunk `slot` up to date (see
    /// [`Self::revise`]); reads the chunk back, so several may be planned
    /// at once (after [`Self::flush_all`]). A chunk stored as it is and
    /// only patched is written in place; otherwise the chunk's pages still
    /// stored are appended anew and its old place becomes padding.
    pub fn plan(
        &self,
        slot: usize,
        keep: &dyn Fn(u32) -> bool,
        patches: &[(u32, &[u8])],
    ) -> Result<Edit, ImageError> {
        let n = self.slots[slot].pages;
        let all = (0..n).all(keep);
        if all && patches.is_empty() {
            return Ok(Edit::Keep);
        }
        if !(0..n).any(keep) {
            return Ok(Edit::Replace {
                slot,
                chunks: Vec::new(),
            });
        }
        let raw =
            u32::from_le_bytes(self.slots[slot].header[8..12].try_into().expect("4")) & RAW != 0;
        if all && raw {
            return self.patch_in_place(slot, patches);
        }
        let (vaddr, mut pages) = self.read_back(slot)?;
        for &(k, b) in patches {
            let at = k as usize * PAGE;
            pages[at..at + PAGE].copy_from_slice(b);
        }
        // What is still stored, in runs.
        let mut chunks = Vec::new();
        let mut k = 0;
        while k < n {
            if !keep(k) {
                k += 1;
                continue;
            }
            let from = k;
            while k < n && keep(k) && k - from < MAX_CHUNK_PAGES {
                k += 1;
            }
            let (a, b) = (from as usize * PAGE, k as usize * PAGE);
            chunks.push(Chunk::compress(vaddr + a as u64, &pages[a..b]));
        }
        Ok(Edit::Replace { slot, chunks })
    }

    /// The edit of chunk `slot`, stored as it is, that writes `patches`
    /// in place. Only the pages patched are read back: the chunk's new
    /// CRC-32 is its old one changed by what the patches change (CRC-32 is
    /// affine: for messages of one length, crc(a ^ b ^ c) = crc(a) ^ crc(b)
    /// ^ crc(c); with b the old chunk, a what differs, zeros elsewhere, and
    /// c all zeros).
    fn patch_in_place(&self, slot: usize, patches: &[(u32, &[u8])]) -> Result<Edit, ImageError> {
        let s = self.revisable(slot)?;
        let mut sorted: Vec<(u32, &[u8])> = patches.to_vec();
        sorted.sort_by_key(|p| p.0);
        // The last patch of a page wins.
        sorted.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = later.1;
            }
            same
        });
        let len = s.len;
        let data_at = HEADER_LEN as u64 + s.at + CHUNK_HEADER as u64;
        let mut diff = crc32fast::Hasher::new();
        let mut pos = 0u64;
        let mut old = vec![0u8; PAGE];
        let mut writes = Vec::with_capacity(sorted.len());
        for &(k, new) in &sorted {
            let at = k as u64 * PAGE as u64;
            if at + PAGE as u64 > len || new.len() != PAGE {
                return Err(self.corrupt(
                    slot,
                    format!("a patch of page {k} of a chunk of {len} bytes"),
                ));
            }
            diff.combine(&zeros(at - pos));
            self.file
                .read_exact_at(&mut old, data_at + at)
                .map_err(file::io(&self.path, "reading back"))?;
            for (o, n) in old.iter_mut().zip(new) {
                *o ^= n;
            }
            diff.update(&old);
            pos = at + PAGE as u64;
            writes.push((at, new.to_vec()));
        }
        diff.combine(&zeros(len - pos));
        let crc = s.data_crc ^ diff.finalize() ^ zeros(len).finalize();
        let vaddr = u64::from_le_bytes(s.header[0..8].try_into().expect("8"));
        Ok(Edit::Patch {
            slot,
            header: header(vaddr, s.pages | RAW, len as u32, crc, crc),
            crc,
            writes,
        })
    }

    /// Carries out an edit [`Self::plan`] made.
    pub fn apply(&mut self, e: Edit) -> Result<(), ImageError> {
        match e {
            Edit::Keep => Ok(()),
            Edit::Patch {
                slot,
                header,
                crc,
                writes,
            } => {
                self.flush()?;
                let s = &mut self.slots[slot];
                s.header = header;
                s.data_crc = crc;
                let base = HEADER_LEN as u64 + s.at;
                let io = || file::io(&self.path, "writing");
                self.file.write_all_at(&s.header, base).map_err(io())?;
                for (at, b) in writes {
                    self.file
                        .write_all_at(&b, base + CHUNK_HEADER as u64 + at)
                        .map_err(io())?;
                }
                Ok(())
            }
            Edit::Replace { slot, chunks } => {
                self.pad(slot)?;
                for c in &chunks {
                    self.write(c)?;
                }
                Ok(())
            }
        }
    }

    /// Turns chunk `slot` into padding (its bytes stay, skipped).
    fn pad(&mut self, slot: usize) -> Result<(), ImageError> {
        self.flush()?;
        let s = &mut self.slots[slot];
        s.header = header(0, PAD, s.len as u32, 0, 0);
        s.pages = 0;
        self.file
            .write_all_at(&s.header, HEADER_LEN as u64 + s.at)
            .map_err(file::io(&self.path, "writing"))
    }

    /// Writes the header and fsyncs. Returns (pages, bytes on disk).
    pub fn finish(mut self) -> Result<(u64, u64), ImageError> {
        self.flush()?;
        let path = self.path.clone();
        // Space reserved and not used goes back.
        self.file
            .set_len(HEADER_LEN as u64 + self.len)
            .map_err(file::io(&path, "truncating"))?;
        let mut crc = crc32fast::Hasher::new();
        let mut headers = Vec::with_capacity(self.slots.len() * CHUNK_HEADER);
        for s in &self.slots {
            crc.combine(&s.crc());
            headers.extend_from_slice(&s.header);
        }
        let payload_crc = crc.finalize();
        file::rewrite_header(
            &mut self.file,
            &path,
            FileKind::Pages,
            self.len,
            payload_crc,
        )?;
        self.file.sync_all().map_err(file::io(&path, "syncing"))?;
        let mut idx = Vec::with_capacity(28 + headers.len());
        idx.extend_from_slice(INDEX_MAGIC);
        idx.extend_from_slice(&self.len.to_le_bytes());
        idx.extend_from_slice(&payload_crc.to_le_bytes());
        idx.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        idx.extend_from_slice(&headers);
        let icrc = crc32fast::hash(&idx);
        idx.extend_from_slice(&icrc.to_le_bytes());
        let ipath = path.with_file_name(crate::PAGES_INDEX_FILE);
        let fi = crate::trust::create_private_file(&ipath).map_err(file::io(&ipath, "creating"))?;
        fi.write_all_at(&idx, 0)
            .and_then(|()| fi.sync_all())
            .map_err(file::io(&ipath, "writing"))?;
        let pages = self.slots.iter().map(|s| s.pages as u64).sum();
        Ok((pages, self.len + HEADER_LEN as u64 + idx.len() as u64))
    }
}
