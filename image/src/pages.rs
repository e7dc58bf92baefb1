//! `pages.img`: the page store.
//!
//! After the file header, a sequence of chunks, each a run of consecutive
//! pages of one mapping:
//!
//! | size | field |
//! |---|---|
//! | 8 | virtual address of the first page |
//! | 4 | number of pages (1 to [`MAX_CHUNK_PAGES`]) |
//! | 4 | compressed length |
//! | 4 | CRC-32 of the compressed bytes |
//! | 4 | CRC-32 of the uncompressed bytes |
//! | n | lz4 block (`lz4_flex` block format) |
//!
//! The header's payload CRC covers all chunks; each chunk also carries its
//! own checksums so a damaged chunk is named precisely. Chunks may come in
//! any order (they are written as parallel workers finish them).

use std::{
    fs::File,
    io::{BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use crate::{
    file::{self, FileKind, HEADER_LEN},
    ImageError,
};

/// Page size the store uses.
pub const PAGE: usize = 4096;
/// Largest chunk: 1024 pages (4 MiB).
pub const MAX_CHUNK_PAGES: u32 = 1024;
const CHUNK_HEADER: usize = 24;

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
}

impl Chunk {
    /// Compresses `raw` (whole pages) found at `vaddr`.
    pub fn compress(vaddr: u64, raw: &[u8]) -> Self {
        assert!(raw.len().is_multiple_of(PAGE) && !raw.is_empty());
        assert!(raw.len() / PAGE <= MAX_CHUNK_PAGES as usize);
        let data = lz4_flex::block::compress(raw);
        Self {
            vaddr,
            npages: (raw.len() / PAGE) as u32,
            crc: crc32fast::hash(&data),
            raw_crc: crc32fast::hash(raw),
            data,
        }
    }

    /// Decompresses into `out` (exactly `npages * PAGE` bytes), checking the
    /// uncompressed checksum.
    pub fn decompress_into(&self, out: &mut [u8]) -> Result<(), String> {
        let want = self.npages as usize * PAGE;
        if out.len() != want {
            return Err(format!("buffer of {} bytes for {want}", out.len()));
        }
        let n = lz4_flex::block::decompress_into(&self.data, out).map_err(|e| {
            format!(
                "lz4 block of pages at {:#x} does not decompress: {e}",
                self.vaddr
            )
        })?;
        if n != want {
            return Err(format!(
                "pages at {:#x} decompress to {n} bytes, expected {want}",
                self.vaddr
            ));
        }
        if crc32fast::hash(out) != self.raw_crc {
            return Err(format!(
                "pages at {:#x}: checksum of the contents does not match",
                self.vaddr
            ));
        }
        Ok(())
    }
}

/// Streams chunks into `pages.img`.
pub struct PageWriter {
    path: PathBuf,
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    len: u64,
    pages: u64,
}

impl PageWriter {
    /// Creates `pages.img` in `dir`.
    pub fn create(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(crate::PAGES_FILE);
        let io = |what| {
            let p = path.display().to_string();
            move |source| ImageError::Io {
                path: p,
                what,
                source,
            }
        };
        let mut f = File::create(&path).map_err(io("creating"))?;
        // Placeholder; the real header is written by finish().
        f.write_all(&[0u8; HEADER_LEN]).map_err(io("writing"))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, f),
            path,
            crc: crc32fast::Hasher::new(),
            len: 0,
            pages: 0,
        })
    }

    /// Appends a chunk.
    pub fn write(&mut self, c: &Chunk) -> Result<(), ImageError> {
        let mut h = [0u8; CHUNK_HEADER];
        h[0..8].copy_from_slice(&c.vaddr.to_le_bytes());
        h[8..12].copy_from_slice(&c.npages.to_le_bytes());
        h[12..16].copy_from_slice(&(c.data.len() as u32).to_le_bytes());
        h[16..20].copy_from_slice(&c.crc.to_le_bytes());
        h[20..24].copy_from_slice(&c.raw_crc.to_le_bytes());
        self.crc.update(&h);
        self.crc.update(&c.data);
        let path = self.path.display().to_string();
        self.out
            .write_all(&h)
            .and_then(|()| self.out.write_all(&c.data))
            .map_err(|source| ImageError::Io {
                path,
                what: "writing",
                source,
            })?;
        self.len += (CHUNK_HEADER + c.data.len()) as u64;
        self.pages += c.npages as u64;
        Ok(())
    }

    /// Writes the header and fsyncs. Returns (pages, bytes on disk).
    pub fn finish(self) -> Result<(u64, u64), ImageError> {
        let path = self.path.clone();
        let io = |what| {
            let p = path.display().to_string();
            move |source| ImageError::Io {
                path: p,
                what,
                source,
            }
        };
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io("writing"))?;
        file::rewrite_header(
            &mut f,
            &path,
            FileKind::Pages,
            self.len,
            self.crc.finalize(),
        )?;
        f.sync_all().map_err(io("syncing"))?;
        Ok((self.pages, self.len + HEADER_LEN as u64))
    }
}

/// Reads every chunk of `pages.img` in `dir`, checking the file and chunk
/// checksums. The data stays compressed.
pub fn read_chunks(dir: &Path) -> Result<Vec<Chunk>, ImageError> {
    let path = dir.join(crate::PAGES_FILE);
    let name = path.display().to_string();
    let io = |what| {
        let p = name.clone();
        move |source| ImageError::Io {
            path: p,
            what,
            source,
        }
    };
    let mut f = File::open(&path).map_err(io("opening"))?;
    // Sized up front: growing a buffer of a few GiB by doubling costs more
    // than reading it.
    let len = f.metadata().map_err(io("reading"))?.len() as usize;
    let mut bytes = Vec::with_capacity(len + 1);
    f.read_to_end(&mut bytes).map_err(io("reading"))?;
    let header = file::parse_header(&name, &bytes, FileKind::Pages)?;
    let payload = &bytes[HEADER_LEN.min(bytes.len())..];
    let corrupt = |offset: u64, what: String| ImageError::Corrupt {
        path: name.clone(),
        offset,
        what,
    };
    if payload.len() as u64 != header.payload_len {
        return Err(corrupt(
            bytes.len() as u64,
            format!(
                "page store holds {} bytes of chunks, the header says {} (truncated?)",
                payload.len(),
                header.payload_len
            ),
        ));
    }
    if crc32fast::hash(payload) != header.payload_crc {
        return Err(corrupt(
            HEADER_LEN as u64,
            "page store checksum mismatch".into(),
        ));
    }
    let mut chunks = Vec::new();
    let mut pos = 0usize;
    while pos < payload.len() {
        let at = (HEADER_LEN + pos) as u64;
        if payload.len() - pos < CHUNK_HEADER {
            return Err(corrupt(at, "truncated chunk header".into()));
        }
        let h = &payload[pos..pos + CHUNK_HEADER];
        let vaddr = u64::from_le_bytes(h[0..8].try_into().expect("8"));
        let npages = u32::from_le_bytes(h[8..12].try_into().expect("4"));
        let clen = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(h[16..20].try_into().expect("4"));
        let raw_crc = u32::from_le_bytes(h[20..24].try_into().expect("4"));
        if npages == 0 || npages > MAX_CHUNK_PAGES || !vaddr.is_multiple_of(PAGE as u64) {
            return Err(corrupt(
                at,
                format!("bad chunk: {npages} pages at {vaddr:#x}"),
            ));
        }
        let max = lz4_flex::block::get_maximum_output_size(npages as usize * PAGE);
        if clen > max || payload.len() - pos - CHUNK_HEADER < clen {
            return Err(corrupt(at, format!("bad chunk length {clen}")));
        }
        let data = payload[pos + CHUNK_HEADER..pos + CHUNK_HEADER + clen].to_vec();
        if crc32fast::hash(&data) != crc {
            return Err(corrupt(
                at,
                format!("checksum mismatch in the chunk of pages at {vaddr:#x}"),
            ));
        }
        chunks.push(Chunk {
            vaddr,
            npages,
            data,
            crc,
            raw_crc,
        });
        pos += CHUNK_HEADER + clen;
    }
    Ok(chunks)
}
