//! The header every image file starts with (32 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `CREBPFIM` |
//! | 8 | 2 | format major (1) |
//! | 10 | 2 | format minor (9): the writer's; a reader takes any minor up to its own |
//! | 12 | 2 | file kind (1 manifest, 2 pages, 3 tree) |
//! | 14 | 2 | flags (0) |
//! | 16 | 8 | payload length |
//! | 24 | 4 | CRC-32 of the payload |
//! | 28 | 4 | CRC-32 of bytes 0..28 |

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    path::Path,
};

use crate::{codec::Dec, ImageError};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CREBPFIM";
/// Format major version: a reader refuses any other major.
pub const FORMAT_MAJOR: u16 = 1;
/// Newest format minor version this build knows, and the one it writes.
///
/// Every new section tag, descriptor kind, mapping kind or shared memory
/// kind bumps it, as do new flag bits and other changes of layout: a reader
/// refuses a newer minor in the header, so it never meets a tag or kind it
/// does not know in an image it accepts.
pub const FORMAT_MINOR: u16 = 14;
/// Header size.
pub const HEADER_LEN: usize = 32;
/// Largest manifest payload accepted.
pub const MANIFEST_CAP: u64 = 256 << 20;

/// What a component file holds. `0` is never valid.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Process, threads, mappings.
    Manifest = 1,
    /// Page store.
    Pages = 2,
    /// A process tree (format 1.2).
    Tree = 3,
}

impl TryFrom<u16> for FileKind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        match v {
            1 => Ok(Self::Manifest),
            2 => Ok(Self::Pages),
            3 => Ok(Self::Tree),
            other => Err(other),
        }
    }
}

/// Encodes a header.
pub fn header(kind: FileKind, payload_len: u64, payload_crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[12..14].copy_from_slice(&(kind as u16).to_le_bytes());
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    h[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A parsed, validated header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Format minor version the file was written with (at most
    /// [`FORMAT_MINOR`]): how to read its payload.
    pub minor: u16,
    /// Payload length.
    pub payload_len: u64,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

/// Validates a header read from `path`, expecting `kind`.
pub fn parse_header(path: &str, h: &[u8], kind: FileKind) -> Result<Header, ImageError> {
    let corrupt = |offset: u64, what: String| ImageError::Corrupt {
        path: path.into(),
        offset,
        what,
    };
    if h.len() < HEADER_LEN {
        return Err(corrupt(
            0,
            format!("file of {} bytes has no complete header", h.len()),
        ));
    }
    if &h[0..8] != MAGIC {
        return Err(corrupt(0, "not a cr-ebpf image file (bad magic)".into()));
    }
    let stored = u32::from_le_bytes(h[28..32].try_into().expect("4 bytes"));
    if crc32fast::hash(&h[0..28]) != stored {
        return Err(corrupt(28, "header checksum mismatch".into()));
    }
    let mut d = Dec::new(&h[8..28], 8);
    let e = |e: crate::codec::DecErr| corrupt(e.offset, e.what);
    let major = d.u16().map_err(e)?;
    let minor = d.u16().map_err(e)?;
    if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
        return Err(ImageError::Version {
            path: path.into(),
            major,
            minor,
        });
    }
    let raw_kind = d.u16().map_err(e)?;
    let found =
        FileKind::try_from(raw_kind).map_err(|k| corrupt(12, format!("unknown file kind {k}")))?;
    if found != kind {
        return Err(corrupt(
            12,
            format!("expected a {kind:?} file, found {found:?}"),
        ));
    }
    let flags = d.u16().map_err(e)?;
    if flags != 0 {
        return Err(corrupt(14, format!("unknown header flags {flags:#x}")));
    }
    Ok(Header {
        minor,
        payload_len: d.u64().map_err(e)?,
        payload_crc: d.u32().map_err(e)?,
    })
}

pub(crate) fn io<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// Writes a whole small file (header + payload) and fsyncs it.
pub fn write_whole(path: &Path, kind: FileKind, payload: &[u8]) -> Result<(), ImageError> {
    let mut f = crate::trust::create_private_file(path).map_err(io(path, "creating"))?;
    f.write_all(&header(
        kind,
        payload.len() as u64,
        crc32fast::hash(payload),
    ))
    .and_then(|()| f.write_all(payload))
    .map_err(io(path, "writing"))?;
    f.sync_all().map_err(io(path, "syncing"))
}

/// Reads a whole small file, checks header and payload CRC, returns the payload.
pub fn read_whole(path: &Path, kind: FileKind, cap: u64) -> Result<Vec<u8>, ImageError> {
    read_whole_with_header(path, kind, cap).map(|(_, payload)| payload)
}

/// [`read_whole`], with the file's header (its format minor version says
/// how to read the payload).
pub fn read_whole_with_header(
    path: &Path,
    kind: FileKind,
    cap: u64,
) -> Result<(Header, Vec<u8>), ImageError> {
    let name = path.display().to_string();
    let mut f = File::open(path).map_err(io(path, "opening"))?;
    let mut h = Vec::with_capacity(HEADER_LEN);
    (&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut h)
        .map_err(io(path, "reading"))?;
    let header = parse_header(&name, &h, kind)?;
    if header.payload_len > cap {
        return Err(ImageError::Corrupt {
            path: name,
            offset: 16,
            what: format!(
                "payload of {} bytes exceeds the cap of {cap}",
                header.payload_len
            ),
        });
    }
    let mut payload = Vec::with_capacity(header.payload_len as usize);
    (&mut f)
        .take(header.payload_len + 1)
        .read_to_end(&mut payload)
        .map_err(io(path, "reading"))?;
    if payload.len() as u64 != header.payload_len {
        return Err(ImageError::Corrupt {
            path: name,
            offset: HEADER_LEN as u64 + payload.len() as u64,
            what: format!(
                "payload is {} bytes, the header says {} (truncated or extended file)",
                payload.len(),
                header.payload_len
            ),
        });
    }
    if crc32fast::hash(&payload) != header.payload_crc {
        return Err(ImageError::Corrupt {
            path: name,
            offset: HEADER_LEN as u64,
            what: "payload checksum mismatch".into(),
        });
    }
    Ok((header, payload))
}

/// Rewrites the header of an already written file (streamed payloads).
pub fn rewrite_header(
    f: &mut File,
    path: &Path,
    kind: FileKind,
    len: u64,
    crc: u32,
) -> Result<(), ImageError> {
    f.seek(SeekFrom::Start(0)).map_err(io(path, "seeking"))?;
    f.write_all(&header(kind, len, crc))
        .map_err(io(path, "writing"))
}
