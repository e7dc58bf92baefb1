//! The decoders never panic, hang or run out of memory on crafted input:
//! real images (the fixtures, of formats 1.1 to 1.3, and the same written
//! again in the current format) are mutated at random — bits flipped, bytes
//! set, ranges cut, duplicated or inserted — with every checksum computed
//! again, as someone crafting an image would, and read back: the manifest,
//! the tree and the page store (its chunks decompressed; one of today's
//! format too). Each read must
//! end, quickly, in a value or an error.
//!
//! 3,000 mutations of each file in a normal run; `CR_EBPF_LONG=1` runs
//! 100 times more; `CR_EBPF_FUZZ_SEED` repeats a run.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cr_ebpf_image::{
    file::{self, FileKind, HEADER_LEN},
    pages::{Chunk, PageStore, PageWriter, MAX_CHUNK_PAGES, PAGE},
    tree::Tree,
    Manifest,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to eight random edits of `b`.
fn mutate(b: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(8) {
        let len = b.len();
        match rng.below(7) {
            0 | 1 if len > 0 => {
                let at = rng.below(len);
                b[at] ^= 1 << rng.below(8);
            }
            2 if len > 0 => {
                // A byte set to a value decoders find interesting.
                let at = rng.below(len);
                b[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            3 if len > 4 => {
                // A length or count made huge.
                let at = rng.below(len - 4);
                b[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
            }
            4 => b.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(64)).min(len);
                let piece = b[from..to].to_vec();
                let at = rng.below(len);
                b.splice(at..at, piece);
            }
            _ => {
                let at = rng.below(len + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, junk);
            }
        }
    }
}

/// The file's bytes with `payload` after a header of the same kind and
/// version whose length and checksum are computed again.
fn with_header(original: &[u8], kind: FileKind, payload: &[u8]) -> Vec<u8> {
    let mut h = file::header(kind, payload.len() as u64, crc32fast::hash(payload));
    // The original's version (fixtures are of older formats).
    h[8..12].copy_from_slice(&original[8..12]);
    let mut out = h.to_vec();
    // The header's own checksum over its first 28 bytes, as written.
    let crc = crc32fast::hash(&out[..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Runs `f`, which must neither panic nor take long.
fn survives(what: &str, f: impl FnOnce()) {
    let start = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(f));
    assert!(r.is_ok(), "{what}: the decoder panicked");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{what}: the decoder took {:?}",
        start.elapsed()
    );
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every `NAME` file under `dir`.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            find(&p, name, out);
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn crafted_images_never_make_a_decoder_panic_hang_or_exhaust_memory() {
    let long = std::env::var("CR_EBPF_LONG").is_ok_and(|v| v == "1");
    let rounds = if long { 300_000 } else { 3_000 };
    let seed = std::env::var("CR_EBPF_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fuzzing the decoders: seed {seed} (CR_EBPF_FUZZ_SEED), {rounds} per file");
    let mut rng = Rng(seed);
    let scratch =
        Scratch(std::env::temp_dir().join(format!("cr-ebpf-fuzz-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();

    // Manifests: the fixtures, and each written again in today's format.
    let mut manifests = Vec::new();
    find(&fixtures(), "manifest.img", &mut manifests);
    let mut inputs: Vec<Vec<u8>> = manifests
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    for (i, p) in manifests.iter().enumerate() {
        let m = Manifest::read(p.parent().unwrap()).unwrap();
        let dir = scratch.0.join(format!("current-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        m.write(&dir).unwrap();
        inputs.push(std::fs::read(dir.join("manifest.img")).unwrap());
    }
    let (mut ok, mut refused) = (0u64, 0u64);
    for original in &inputs {
        let minor = u16::from_le_bytes([original[10], original[11]]);
        for _ in 0..rounds {
            let mut payload = original[HEADER_LEN..].to_vec();
            mutate(&mut payload, &mut rng);
            survives("manifest", || {
                match Manifest::decode_version(&payload, HEADER_LEN as u64, minor) {
                    Ok(_) => ok += 1,
                    Err(_) => refused += 1,
                }
            });
        }
    }
    eprintln!("manifests: {refused} refused, {ok} decoded");

    // The tree and the page store are read from a directory.
    let dir = scratch.0.join("crafted");
    std::fs::create_dir_all(&dir).unwrap();
    let mut trees = Vec::new();
    find(&fixtures(), "tree.img", &mut trees);
    let (mut ok, mut refused) = (0u64, 0u64);
    for t in &trees {
        let original = std::fs::read(t).unwrap();
        for _ in 0..rounds / 10 {
            let mut payload = original[HEADER_LEN..].to_vec();
            mutate(&mut payload, &mut rng);
            let bytes = with_header(&original, FileKind::Tree, &payload);
            std::fs::write(dir.join("tree.img"), bytes).unwrap();
            survives("tree", || match Tree::read(&dir) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            });
        }
    }
    eprintln!("trees: {refused} refused, {ok} decoded");

    let mut stores = Vec::new();
    find(&fixtures(), "pages.img", &mut stores);
    // And one in today's format (chunk headers with their own checksum).
    let current = scratch.0.join("current-pages");
    std::fs::create_dir_all(&current).unwrap();
    let mut w = PageWriter::create(&current).unwrap();
    for (i, addr) in [0x1000u64, 0x7f00_0000_0000].into_iter().enumerate() {
        let raw: Vec<u8> = (0..3 * PAGE).map(|b| (b * (i + 3) % 251) as u8).collect();
        w.write(&Chunk::compress(addr, &raw)).unwrap();
    }
    w.finish().unwrap();
    stores.push(current.join("pages.img"));
    let (mut ok, mut refused) = (0u64, 0u64);
    let mut out = vec![0u8; MAX_CHUNK_PAGES as usize * PAGE];
    for s in &stores {
        let original = std::fs::read(s).unwrap();
        for _ in 0..rounds / 10 {
            let mut payload = original[HEADER_LEN..].to_vec();
            mutate(&mut payload, &mut rng);
            let bytes = with_header(&original, FileKind::Pages, &payload);
            std::fs::write(dir.join("pages.img"), bytes).unwrap();
            survives("page store", || match PageStore::open(&dir) {
                Ok(store) => {
                    for c in store.chunks() {
                        let n = (c.npages as usize * PAGE).min(out.len());
                        match store.decompress_into(c, &mut out[..n]) {
                            Ok(()) => ok += 1,
                            Err(_) => refused += 1,
                        }
                    }
                }
                Err(_) => refused += 1,
            });
        }
    }
    eprintln!("page stores: {refused} refused, {ok} chunks decompressed");
}
