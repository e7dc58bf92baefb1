//! `pages.img`: the page store.
//!
//! After the file header, a sequence of chunks, each a run of consecutive
//! pages of one mapping:
//!
//! | size | field |
//! |---|---|
//! | 8 | virtual address of the first page |
//! | 4 | number of pages (1 to [`MAX_CHUNK_PAGES`]); format 1.12: bit 31 set, the pages are stored as they are ([`RAW`]) |
//! | 4 | compressed length (the pages' length when stored as they are) |
//! | 4 | CRC-32 of the compressed bytes |
//! | 4 | CRC-32 of the uncompressed bytes |
//! | 4 | format 1.10: CRC-32 of the 24 bytes above |
//! | n | lz4 block (`lz4_flex` block format), or the pages themselves |
//!
//! Pages that lz4 cannot shrink (random data, already compressed data) are
//! stored as they are (format 1.12): compressing them cost the writer more
//! time than the disk write, and gained nothing.
//!
//! The header's payload CRC covers all chunks; each chunk also carries its
//! own checksums so a damaged chunk is named precisely. Chunks may come in
//! any order (they are written as parallel workers finish them).
//!
//! `pages.idx`, next to it, lists the chunk headers in file order so that a
//! reader finds every chunk with one read instead of one read per chunk
//! (a cold restore of 1 GiB spent 80 ms walking its 1,024 headers): the
//! magic `CRPIDX01`, the pages store's payload length (8) and payload
//! CRC-32 (4), the number of headers (4), their 28-byte records as in the
//! store, and a CRC-32 of everything before it (4). It is used only when
//! it matches the store's header and checks out in full; otherwise (absent,
//! damaged, another store's) the headers are walked as before. Every chunk
//! header it holds carries its own checksum, and each chunk's data is
//! checked as it is used, as with a walk.
//!
//! From format 1.10 every byte of a chunk is under a checksum of its own
//! (its header's, its data's), so a reader checks each chunk as it uses
//! it and reads the store once: opening reads only the chunk headers and
//! starts reading the rest ahead; a store of an older format is read and
//! checked whole when opened.

mod direct;
mod writer;

use std::{fs::File, path::Path};

pub use writer::{Edit, PageWriter, SLOW_BUFFERED};

use crate::{
    file::{self, FileKind, HEADER_LEN},
    ImageError,
};

/// Page size the store uses.
pub const PAGE: usize = 4096;
/// Largest chunk: 1024 pages (4 MiB).
pub const MAX_CHUNK_PAGES: u32 = 1024;
/// A chunk header before format 1.10, without its own checksum.
const CHUNK_HEADER_OLD: usize = 24;
/// A chunk header from format 1.10: the old fields and their CRC-32.
pub(crate) const CHUNK_HEADER: usize = 28;
/// First minor whose chunk headers carry their own checksum.
const HEADER_CRC_SINCE: u16 = 10;
/// Bit of a chunk header's page count (format 1.12): the pages follow as
/// they are, not lz4-compressed.
pub const RAW: u32 = 1 << 31;
/// First minor whose chunks may be stored as they are ([`RAW`]).
const RAW_SINCE: u16 = 12;
/// A chunk header's page count that marks padding (format 1.13): no
/// pages; its length field gives the bytes that follow and are skipped
/// (what was written there before the dump found it out of date).
pub const PAD: u32 = 1 << 30;
/// First minor whose stores may hold padding ([`PAD`]).
const PAD_SINCE: u16 = 13;
/// Magic of `pages.idx`.
const INDEX_MAGIC: &[u8; 8] = b"CRPIDX01";
/// Pages of a store [`PageStore::resident`] asks about at most.
const RESIDENT_SAMPLES: usize = 1024;
/// Bytes of a large chunk compressed first, at its start and its middle,
/// to tell whether it compresses at all.
const SAMPLE: usize = 32 << 10;

/// A compressed run of pages, ready to write or read back.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub npages: u32,
    /// lz4 block.
    pub data: Vec<u8>,
    /// CRC-32 of `data`.
    pub crc: u32,
    /// CRC-32 of the uncompressed pages.
    pub raw_crc: u32,
    /// `data` is the pages as they are, not an lz4 block ([`RAW`]).
    pub stored_raw: bool,
}

impl Chunk {
    /// Compresses `raw` (whole pages) found at `vaddr`, or keeps it as it
    /// is when lz4 does not shrink it: a chunk of more than two samples
    /// whose start and middle do not shrink by 3% is not compressed at all.
    pub fn compress(vaddr: u64, raw: &[u8]) -> Self {
        match Self::lz4(raw) {
            Some(data) => Self::compressed(vaddr, raw, data),
            None => Self::as_is(vaddr, raw.to_vec()),
        }
    }

    /// [`Chunk::compress`] of pages the caller gives up: kept as they are,
    /// they are not copied.
    pub fn of_pages(vaddr: u64, raw: Vec<u8>) -> Self {
        match Self::lz4(&raw) {
            Some(data) => Self::compressed(vaddr, &raw, data),
            None => Self::as_is(vaddr, raw),
        }
    }

    /// The lz4 block of `raw`, or `None` when it is not worth it.
    fn lz4(raw: &[u8]) -> Option<Vec<u8>> {
        assert!(raw.len().is_multiple_of(PAGE) && !raw.is_empty());
        assert!(raw.len() / PAGE <= MAX_CHUNK_PAGES as usize);
        let shrinks = |s: &[u8]| lz4_flex::block::compress(s).len() * 100 < s.len() * 97;
        let mid = raw.len() / 2;
        if raw.len() > 2 * SAMPLE && !shrinks(&raw[..SAMPLE]) && !shrinks(&raw[mid..mid + SAMPLE]) {
            return None;
        }
        let data = lz4_flex::block::compress(raw);
        (data.len() < raw.len()).then_some(data)
    }

    fn compressed(vaddr: u64, raw: &[u8], data: Vec<u8>) -> Self {
        Self {
            vaddr,
            npages: (raw.len() / PAGE) as u32,
            crc: crc32fast::hash(&data),
            raw_crc: crc32fast::hash(raw),
            data,
            stored_raw: false,
        }
    }

    fn as_is(vaddr: u64, raw: Vec<u8>) -> Self {
        let crc = crc32fast::hash(&raw);
        Self {
            vaddr,
            npages: (raw.len() / PAGE) as u32,
            data: raw,
            crc,
            raw_crc: crc,
            stored_raw: true,
        }
    }
}

/// Bytes on disk of the page store of the image at `dir`, its index
/// included (what [`PageWriter::finish`] reports, and the commands call
/// its bytes).
pub fn bytes_on_disk(dir: &Path) -> u64 {
    [crate::PAGES_FILE, crate::PAGES_INDEX_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// The page store mapped read-only, for restoring: no copy of the data is
/// made, and chunks are decompressed straight from the mapping (in
/// parallel by the caller). Opening checks the header and every chunk's
/// header and bounds (from format 1.10 each chunk header's own checksum;
/// before, the checksum of the whole store, read at once); each chunk's
/// data is checked as it is decompressed, so a reader that uses every
/// chunk before it lets anything run (restore fills every page before the
/// process runs) refuses a damaged store before anything runs, having
/// read it once.
pub struct PageStore {
    base: *mut libc::c_void,
    len: usize,
    chunks: Vec<ChunkRef>,
    /// The file, for messages.
    path: String,
    /// The payload checksum its header gives.
    payload_crc: u32,
}

// SAFETY: the mapping is private and read-only for its whole life; nothing
// writes through it, so sharing it between threads is sound.
unsafe impl Send for PageStore {}
// SAFETY: as above.
unsafe impl Sync for PageStore {}

/// Where one chunk lies in a [`PageStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Address of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub npages: u32,
    offset: usize,
    clen: usize,
    crc: u32,
    raw_crc: u32,
    /// Taken from `pages.idx`: the store's own copy of the header, just
    /// before the data, is compared with it when the chunk is used.
    indexed: bool,
    /// The pages are stored as they are ([`RAW`]).
    raw: bool,
}

impl PageStore {
    /// Maps and checks `pages.img` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(crate::PAGES_FILE);
        let name = path.display().to_string();
        let f = File::open(&path).map_err(file::io(&path, "opening"))?;
        let len = f.metadata().map_err(file::io(&path, "reading"))?.len() as usize;
        if len < HEADER_LEN {
            return Err(ImageError::Corrupt {
                path: name,
                offset: 0,
                what: format!("file of {len} bytes has no complete header"),
            });
        }
        use std::os::fd::AsRawFd as _;
        let mut h = [0u8; HEADER_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 0)
            .map_err(file::io(&path, "reading"))?;
        let header = file::parse_header(&name, &h, FileKind::Pages)?;
        let whole = header.minor < HEADER_CRC_SINCE;
        // An older store is checked whole now: read it all at once.
        let populate = if whole { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new private read-only mapping of a file we opened.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | populate,
                f.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(file::io(&path, "mapping")(std::io::Error::last_os_error()));
        }
        let mut store = Self {
            base,
            len,
            chunks: Vec::new(),
            path: name.clone(),
            payload_crc: header.payload_crc,
        };
        let bytes = store.bytes();
        let payload = &bytes[HEADER_LEN..];
        let corrupt = |offset: u64, what: String| ImageError::Corrupt {
            path: name.clone(),
            offset,
            what,
        };
        if payload.len() as u64 != header.payload_len {
            return Err(corrupt(
                len as u64,
                format!(
                    "page store holds {} bytes of chunks, the header says {} (truncated?)",
                    payload.len(),
                    header.payload_len
                ),
            ));
        }
        if whole && crc32fast::hash(payload) != header.payload_crc {
            return Err(corrupt(
                HEADER_LEN as u64,
                "page store checksum mismatch".into(),
            ));
        }
        let chunk_header = if whole {
            CHUNK_HEADER_OLD
        } else {
            CHUNK_HEADER
        };
        let index = if whole {
            None
        } else {
            read_index(&dir.join(crate::PAGES_INDEX_FILE), &header)
        };
        let mut chunks = Vec::new();
        let mut pos = 0usize;
        let mut next = 0usize;
        while pos < payload.len() {
            let at = (HEADER_LEN + pos) as u64;
            if payload.len() - pos < chunk_header {
                return Err(corrupt(at, "truncated chunk header".into()));
            }
            // Read from the file, not through the mapping: a fault there
            // would read far ahead (the device's read-ahead window), and
            // the walk would wait for most of the store.
            let mut hb = [0u8; CHUNK_HEADER];
            let h = &mut hb[..chunk_header];
            if whole {
                h.copy_from_slice(&payload[pos..pos + chunk_header]);
            } else if let Some(ix) = &index {
                // One more header than the index holds: not this store's.
                let Some(e) = ix.get(next * CHUNK_HEADER..(next + 1) * CHUNK_HEADER) else {
                    return Err(corrupt(
                        at,
                        "pages.idx lists fewer chunks than the store".into(),
                    ));
                };
                h.copy_from_slice(e);
                next += 1;
            } else {
                std::os::unix::fs::FileExt::read_exact_at(&f, h, at)
                    .map_err(file::io(&path, "reading"))?;
            }
            let c = match parse_chunk(&*h, header.minor, payload.len() - pos - chunk_header)
                .map_err(|what| corrupt(at, what))?
            {
                Parsed::Chunk(c) => c,
                Parsed::Pad(len) => {
                    pos += chunk_header + len;
                    continue;
                }
            };
            let clen = c.clen;
            chunks.push(ChunkRef {
                offset: HEADER_LEN + pos + chunk_header,
                indexed: index.is_some(),
                ..c
            });
            pos += chunk_header + clen;
        }
        if index.is_some_and(|ix| next * CHUNK_HEADER != ix.len()) {
            return Err(corrupt(
                len as u64,
                "pages.idx lists more chunks than the store".into(),
            ));
        }
        store.chunks = chunks;
        Ok(store)
    }

    /// Asks the kernel to read the whole store ahead, without waiting, for
    /// a reader that goes through the mapping (not asked at open: the chunk
    /// headers are read first, and a reader that reads the file itself, or
    /// only some chunks first, would find the disk busy with the rest).
    /// Advice only: its failure changes nothing.
    pub fn read_ahead(&self) {
        // SAFETY: advice on the mapping this value owns.
        unsafe { libc::madvise(self.base, self.len, libc::MADV_WILLNEED) };
    }

    /// Reads the whole store and checks it against its header's checksum
    /// (what opening a store before format 1.10 did; `inspect` asks for it).
    pub fn verify(&self) -> Result<(), ImageError> {
        self.read_ahead();
        // In pieces, each counted as progress (a page per 4 KiB read).
        let mut crc = crc32fast::Hasher::new();
        for piece in self.bytes()[HEADER_LEN..].chunks(16 << 20) {
            crc.update(piece);
            crate::progress::add((piece.len() / PAGE) as u64);
        }
        if crc.finalize() != self.payload_crc {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                offset: HEADER_LEN as u64,
                what: "page store checksum mismatch".into(),
            });
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.base as *const u8, self.len) }
    }

    /// The chunks, in file order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Pages stored.
    pub fn pages(&self) -> u64 {
        self.chunks.iter().map(|c| c.npages as u64).sum()
    }

    /// Bytes of compressed data.
    pub fn compressed_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.clen as u64).sum()
    }

    /// Starts reading chunk `c` (its header and data) from the disk, without
    /// waiting: `MADV_WILLNEED` on exactly its bytes, so that several
    /// chunks are read at once and a later touch of the mapping reads
    /// neither less (one page at a time) nor more (the device's read-ahead
    /// window around it).
    pub fn will_need(&self, c: &ChunkRef) {
        let page = PAGE;
        let lo = c.offset.saturating_sub(CHUNK_HEADER) & !(page - 1);
        let hi = (c.offset + c.clen).min(self.len);
        if hi <= lo {
            return;
        }
        // SAFETY: advice on a range inside our own mapping; it changes
        // nothing but what the kernel reads ahead.
        unsafe {
            libc::madvise(
                (self.base as *mut u8).add(lo).cast(),
                hi - lo,
                libc::MADV_WILLNEED,
            )
        };
    }

    /// Checks chunk `c`'s checksums and, when its pages are stored as they
    /// are ([`RAW`]), gives them where they lie in the mapping (no copy);
    /// `None` for a compressed chunk (see [`Self::decompress_into`]).
    pub fn pages_in_place(&self, c: &ChunkRef) -> Result<Option<&[u8]>, String> {
        if !c.raw {
            return Ok(None);
        }
        let data = self.checked(c)?;
        if data.len() != c.npages as usize * PAGE {
            return Err(format!(
                "chunk of pages at {:#x} stored as it is holds {} bytes for {} pages",
                c.vaddr,
                data.len(),
                c.npages
            ));
        }
        Ok(Some(data))
    }

    /// Checks chunk `c`'s checksums and decompresses it into `out`
    /// (exactly `npages * PAGE` bytes).
    pub fn decompress_into(&self, c: &ChunkRef, out: &mut [u8]) -> Result<(), String> {
        let data = self.checked(c)?;
        unpack(c, data, out)
    }

    /// Where chunk `c` lies in the file, its header and its data: for a
    /// reader that reads the file itself ([`Self::pages_from`],
    /// [`Self::decompress_from`]).
    pub fn extent(&self, c: &ChunkRef) -> std::ops::Range<usize> {
        c.offset - CHUNK_HEADER..c.offset + c.clen
    }

    /// [`Self::pages_in_place`] on `ext`, the bytes of chunk `c`'s
    /// [`Self::extent`] read by the caller.
    pub fn pages_from<'a>(&self, c: &ChunkRef, ext: &'a [u8]) -> Result<Option<&'a [u8]>, String> {
        if !c.raw {
            return Ok(None);
        }
        let data = self.checked_from(c, ext)?;
        if data.len() != c.npages as usize * PAGE {
            return Err(format!(
                "chunk of pages at {:#x} stored as it is holds {} bytes for {} pages",
                c.vaddr,
                data.len(),
                c.npages
            ));
        }
        Ok(Some(data))
    }

    /// [`Self::decompress_into`] from `ext`, the bytes of chunk `c`'s
    /// [`Self::extent`] read by the caller.
    pub fn decompress_from(&self, c: &ChunkRef, ext: &[u8], out: &mut [u8]) -> Result<(), String> {
        let data = self.checked_from(c, ext)?;
        unpack(c, data, out)
    }

    /// The share of the store's pages in the page cache (`mincore`; 0 when
    /// it cannot be told). A large store is sampled ([`RESIDENT_SAMPLES`]
    /// pages spread over it): asking for every page of 1 GiB took 13-15 ms,
    /// most of a lazy restore's wait before the process runs.
    pub fn resident(&self) -> f64 {
        let pages = self.len.div_ceil(PAGE);
        if pages == 0 {
            return 0.0;
        }
        let step = (pages / RESIDENT_SAMPLES).max(1);
        let (mut asked, mut found) = (0usize, 0usize);
        for k in (0..pages).step_by(step) {
            let mut v = 0u8;
            // SAFETY: page `k` is inside our own mapping of `len` bytes.
            let at = unsafe { self.base.cast::<u8>().add(k * PAGE) };
            // SAFETY: one page of that mapping, a byte for its answer.
            if unsafe { libc::mincore(at.cast(), PAGE, &mut v) } != 0 {
                return 0.0;
            }
            asked += 1;
            found += usize::from(v & 1 != 0);
        }
        found as f64 / asked as f64
    }

    /// Chunk `c`'s stored bytes, its header (from `pages.idx`) and data
    /// checksums checked.
    fn checked(&self, c: &ChunkRef) -> Result<&[u8], String> {
        self.checked_from(c, &self.bytes()[self.extent(c)])
    }

    /// The data of chunk `c` in `ext`, the bytes of its extent, its header
    /// (when it came from `pages.idx`) and data checksums checked.
    fn checked_from<'a>(&self, c: &ChunkRef, ext: &'a [u8]) -> Result<&'a [u8], String> {
        if ext.len() != CHUNK_HEADER + c.clen {
            return Err(format!(
                "the chunk of pages at {:#x} read as {} bytes, not {}",
                c.vaddr,
                ext.len(),
                CHUNK_HEADER + c.clen
            ));
        }
        let (h, data) = ext.split_at(CHUNK_HEADER);
        if c.indexed {
            // Every byte of the store is checked when used: the header in
            // the store too, against the index's (same 24 bytes, its CRC).
            let fields = (
                u64::from_le_bytes(h[0..8].try_into().expect("8")),
                u32::from_le_bytes(h[8..12].try_into().expect("4")),
                u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize,
                u32::from_le_bytes(h[16..20].try_into().expect("4")),
                u32::from_le_bytes(h[20..24].try_into().expect("4")),
            );
            let count = if c.raw { c.npages | RAW } else { c.npages };
            if crc32fast::hash(&h[..24]).to_le_bytes() != h[24..28]
                || fields != (c.vaddr, count, c.clen, c.crc, c.raw_crc)
            {
                return Err(format!(
                    "the header of the chunk of pages at {:#x} is damaged (or is not what pages.idx lists)",
                    c.vaddr
                ));
            }
        }
        if crc32fast::hash(data) != c.crc {
            return Err(format!(
                "checksum mismatch in the chunk of pages at {:#x}",
                c.vaddr
            ));
        }
        Ok(data)
    }
}

/// Chunk `c`'s pages from its checked `data` into `out` (exactly
/// `npages * PAGE` bytes), their checksum checked after decompression.
fn unpack(c: &ChunkRef, data: &[u8], out: &mut [u8]) -> Result<(), String> {
    let want = c.npages as usize * PAGE;
    if out.len() != want {
        return Err(format!("buffer of {} bytes for {want}", out.len()));
    }
    if c.raw {
        // Its one checksum (of the bytes stored, which are the pages) was
        // checked; the header says both are the same.
        out.copy_from_slice(data);
        return Ok(());
    }
    let n = lz4_flex::block::decompress_into(data, out).map_err(|e| {
        format!(
            "lz4 block of pages at {:#x} does not decompress: {e}",
            c.vaddr
        )
    })?;
    if n != want || crc32fast::hash(out) != c.raw_crc {
        return Err(format!(
            "pages at {:#x}: contents do not match their checksum",
            c.vaddr
        ));
    }
    Ok(())
}

impl Drop for PageStore {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The chunk a header `h` (of a store of format `minor`, followed by
/// `left` bytes) describes, its bounds checked (its offset and `indexed`
/// left to the caller); what is wrong with it otherwise.
fn parse_chunk(h: &[u8], minor: u16, left: usize) -> Result<Parsed, String> {
    let whole = minor < HEADER_CRC_SINCE;
    if !whole && crc32fast::hash(&h[..24]).to_le_bytes() != h[24..28] {
        return Err("chunk header checksum mismatch".into());
    }
    let vaddr = u64::from_le_bytes(h[0..8].try_into().expect("8"));
    let count = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    let clen = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
    if minor >= PAD_SINCE && count == PAD {
        // Padding: skipped. Nothing else in its header may be set.
        if vaddr != 0 || h[16..24] != [0; 8] || left < clen {
            return Err(format!("bad padding of {clen} bytes"));
        }
        return Ok(Parsed::Pad(clen));
    }
    let raw = minor >= RAW_SINCE && count & RAW != 0;
    let npages = if raw { count & !RAW } else { count };
    if npages == 0 || npages > MAX_CHUNK_PAGES || !vaddr.is_multiple_of(PAGE as u64) {
        return Err(format!("bad chunk: {npages} pages at {vaddr:#x}"));
    }
    let fits = if raw {
        // Stored as they are: the pages' length, and one checksum for both.
        clen == npages as usize * PAGE && h[16..20] == h[20..24]
    } else {
        clen <= lz4_flex::block::get_maximum_output_size(npages as usize * PAGE)
    };
    if !fits || left < clen {
        return Err(format!("bad chunk length {clen}"));
    }
    Ok(Parsed::Chunk(ChunkRef {
        vaddr,
        npages,
        offset: 0,
        clen,
        crc: u32::from_le_bytes(h[16..20].try_into().expect("4")),
        raw_crc: u32::from_le_bytes(h[20..24].try_into().expect("4")),
        indexed: false,
        raw,
    }))
}

/// What a chunk header describes.
enum Parsed {
    /// A chunk of pages.
    Chunk(ChunkRef),
    /// Padding of this many bytes ([`PAD`]).
    Pad(usize),
}

/// The chunk headers `pages.idx` at `path` lists, when it is whole and
/// belongs to the store whose header is `h` (same payload length and
/// checksum); `None` otherwise, and the store's headers are walked.
fn read_index(path: &Path, h: &file::Header) -> Option<Vec<u8>> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 28 || &b[..8] != INDEX_MAGIC {
        return None;
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let len = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let payload_crc = u32::from_le_bytes(body[16..20].try_into().ok()?);
    let n = u32::from_le_bytes(body[20..24].try_into().ok()?) as usize;
    let headers = &body[24..];
    (len == h.payload_len
        && payload_crc == h.payload_crc
        && n.checked_mul(CHUNK_HEADER) == Some(headers.len()))
    .then(|| headers.to_vec())
}
