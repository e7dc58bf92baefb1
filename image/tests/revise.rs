//! Page stores revised after they were written (a dump that stored pages
//! while the process ran): chunks patched in place, replaced, dropped, and
//! the padding they leave read as nothing.

use std::{collections::BTreeMap, path::PathBuf};

use cr_ebpf_image::{
    pages::{Chunk, PageStore, PageWriter, PAGE},
    PAGES_FILE, PAGES_INDEX_FILE,
};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("cr-ebpf-revise-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// `n` pages that lz4 cannot shrink.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n * PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `n` pages that compress.
fn text(n: usize, byte: u8) -> Vec<u8> {
    (0..n * PAGE)
        .map(|i| byte.wrapping_add((i / 64) as u8))
        .collect()
}

/// Every page of the store at `dir`, by address, each chunk checked.
fn pages_of(dir: &std::path::Path) -> BTreeMap<u64, Vec<u8>> {
    let store = PageStore::open(dir).unwrap();
    store
        .verify()
        .expect("the payload checksum covers the revised store");
    let mut all = BTreeMap::new();
    for c in store.chunks() {
        let mut out = vec![0u8; c.npages as usize * PAGE];
        store.decompress_into(c, &mut out).unwrap();
        for (k, p) in out.chunks(PAGE).enumerate() {
            let a = c.vaddr + (k * PAGE) as u64;
            assert!(all.insert(a, p.to_vec()).is_none(), "{a:#x} stored twice");
        }
    }
    all
}

fn set(expect: &mut BTreeMap<u64, Vec<u8>>, at: u64, bytes: &[u8]) {
    for (k, p) in bytes.chunks(PAGE).enumerate() {
        expect.insert(at + (k * PAGE) as u64, p.to_vec());
    }
}

/// A store of four chunks, then revised: a chunk stored as it is patched
/// in place, a compressed one patched (re-made at the end), one with pages
/// no longer stored (split), one dropped, and one left alone.
fn write_revised(dir: &std::path::Path) -> BTreeMap<u64, Vec<u8>> {
    let (a, b, c, d, e) = (
        noise(8, 1),
        text(8, 3),
        noise(4, 2),
        text(2, 9),
        noise(1, 5),
    );
    let mut w = PageWriter::create(dir).unwrap();
    let sa = w.write(&Chunk::compress(0x10_0000, &a)).unwrap();
    let sb = w.write(&Chunk::compress(0x20_0000, &b)).unwrap();
    let sc = w.write(&Chunk::compress(0x30_0000, &c)).unwrap();
    let sd = w.write(&Chunk::compress(0x40_0000, &d)).unwrap();
    w.write(&Chunk::compress(0x50_0000, &e)).unwrap();
    let new_a0 = noise(1, 55);
    let new_a3 = noise(1, 77);
    let new_a7 = noise(1, 66);
    let new_b1 = text(1, 200);
    let new_c3 = noise(1, 99);
    // The first and last pages too, one twice (the last patch wins).
    let stale = noise(1, 44);
    let patches: [(u32, &[u8]); 4] = [(7, &stale), (3, &new_a3), (0, &new_a0), (7, &new_a7)];
    w.revise(sa, &|_| true, &patches).unwrap();
    w.revise(sb, &|_| true, &[(1, &new_b1)]).unwrap();
    w.revise(sc, &|k| k == 0 || k == 3, &[(3, &new_c3)])
        .unwrap();
    w.revise(sd, &|_| false, &[]).unwrap();
    let (pages, _) = w.finish().unwrap();
    let mut expect = BTreeMap::new();
    set(&mut expect, 0x10_0000, &a);
    set(&mut expect, 0x10_0000, &new_a0);
    set(&mut expect, 0x10_0000 + 3 * PAGE as u64, &new_a3);
    set(&mut expect, 0x10_0000 + 7 * PAGE as u64, &new_a7);
    set(&mut expect, 0x20_0000, &b);
    set(&mut expect, 0x20_0000 + PAGE as u64, &new_b1);
    set(&mut expect, 0x30_0000, &c[..PAGE]);
    set(&mut expect, 0x30_0000 + 3 * PAGE as u64, &new_c3);
    set(&mut expect, 0x50_0000, &e);
    assert_eq!(pages, expect.len() as u64, "pages reported");
    expect
}

#[test]
fn a_revised_store_holds_each_page_once_as_revised() {
    let d = tempdir("revised");
    let expect = write_revised(&d.0);
    assert_eq!(pages_of(&d.0), expect, "with pages.idx");
    std::fs::remove_file(d.0.join(PAGES_INDEX_FILE)).unwrap();
    assert_eq!(pages_of(&d.0), expect, "headers walked");
}

/// The offset of the first padding in the store at `dir`, walking it.
fn first_pad(b: &[u8]) -> usize {
    let mut pos = 32;
    loop {
        let count = u32::from_le_bytes(b[pos + 8..pos + 12].try_into().unwrap());
        let len = u32::from_le_bytes(b[pos + 12..pos + 16].try_into().unwrap()) as usize;
        if count == cr_ebpf_image::pages::PAD {
            return pos;
        }
        pos += 28 + len;
    }
}

fn refused(dir: &std::path::Path, edit: impl Fn(&mut Vec<u8>)) -> String {
    let p = dir.join(PAGES_FILE);
    let mut b = std::fs::read(&p).unwrap();
    edit(&mut b);
    std::fs::write(&p, &b).unwrap();
    PageStore::open(dir).err().expect("refused").to_string()
}

fn reseal(b: &mut [u8], at: usize) {
    let h = crc32fast::hash(&b[at..at + 24]);
    b[at + 24..at + 28].copy_from_slice(&h.to_le_bytes());
}

#[test]
fn padding_is_refused_where_it_cannot_be() {
    // In a store of format 1.12, which had no padding: a page count out of
    // bounds.
    let d = tempdir("pad-old");
    write_revised(&d.0);
    std::fs::remove_file(d.0.join(PAGES_INDEX_FILE)).unwrap();
    let e = refused(&d.0, |b| {
        b[10..12].copy_from_slice(&12u16.to_le_bytes());
        let h = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&h.to_le_bytes());
    });
    assert!(e.contains("bad chunk"), "{e}");
    // With an address (its header's checksum made again).
    let d = tempdir("pad-addr");
    write_revised(&d.0);
    std::fs::remove_file(d.0.join(PAGES_INDEX_FILE)).unwrap();
    let e = refused(&d.0, |b| {
        let at = first_pad(b);
        b[at] = 0x10;
        reseal(b, at);
    });
    assert!(e.contains("bad padding"), "{e}");
    // Longer than what follows it.
    let d = tempdir("pad-long");
    write_revised(&d.0);
    std::fs::remove_file(d.0.join(PAGES_INDEX_FILE)).unwrap();
    let e = refused(&d.0, |b| {
        let at = first_pad(b);
        b[at + 12..at + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(b, at);
    });
    assert!(e.contains("bad padding"), "{e}");
}

/// A store with space reserved for more than it gets, large chunks (written
/// from where they are) between small ones (buffered), a large one patched
/// in place: it ends exactly where its payload does and reads back as
/// written.
#[test]
fn a_store_reserved_for_more_than_it_holds_ends_with_its_payload() {
    let d = tempdir("reserved");
    let (small, large, text8, large2) = (noise(1, 3), noise(64, 4), text(8, 7), noise(256, 8));
    let mut w = PageWriter::create(&d.0).unwrap();
    w.reserve(1 + 64 + 8 + 256 + 500, 40);
    w.write(&Chunk::compress(0x1000, &small)).unwrap();
    let sl = w.write(&Chunk::compress(0x10_0000, &large)).unwrap();
    w.write(&Chunk::compress(0x20_0000, &text8)).unwrap();
    w.write(&Chunk::compress(0x30_0000, &large2)).unwrap();
    let patch = noise(1, 9);
    w.flush_all().unwrap();
    w.revise(sl, &|_| true, &[(63, &patch)]).unwrap();
    w.finish().unwrap();
    let mut expect = BTreeMap::new();
    set(&mut expect, 0x1000, &small);
    set(&mut expect, 0x10_0000, &large);
    set(&mut expect, 0x10_0000 + 63 * PAGE as u64, &patch);
    set(&mut expect, 0x20_0000, &text8);
    set(&mut expect, 0x30_0000, &large2);
    assert_eq!(pages_of(&d.0), expect);
    let len = std::fs::metadata(d.0.join(PAGES_FILE)).unwrap().len();
    let raw = (1 + 64 + 256) * PAGE as u64;
    assert!(len > raw && len < raw + 8 * PAGE as u64, "{len} bytes");
}

/// A store written past the page cache (`O_DIRECT`, blocks of 4 MiB by two
/// threads): chunks across block boundaries, a last block not a whole
/// number of pages, then revised (a chunk patched in place, a compressed
/// one made again at the end, written the usual way) and read back.
#[test]
fn a_store_written_past_the_page_cache_reads_back_as_written() {
    let d = tempdir("direct");
    let mut w = PageWriter::create(&d.0).unwrap();
    w.reserve(6 * 256, 8);
    let direct = w.write_direct();
    if std::env::var_os("CI").is_some() {
        assert!(direct, "O_DIRECT refused where the tests run");
    } else if !direct {
        eprintln!(
            "note: {} does not take O_DIRECT; the buffered path was tested",
            d.0.display()
        );
    }
    let mut expect = BTreeMap::new();
    let mut slots = Vec::new();
    for i in 0..5u64 {
        let raw = noise(256, 100 + i);
        let at = 0x100_0000 * (i + 1);
        slots.push(w.write(&Chunk::compress(at, &raw)).unwrap());
        set(&mut expect, at, &raw);
        let small = text(3, i as u8);
        w.write(&Chunk::compress(at + 0x80_0000, &small)).unwrap();
        set(&mut expect, at + 0x80_0000, &small);
    }
    let compressed = w.write(&Chunk::compress(0x9000_0000, &text(5, 1))).unwrap();
    set(&mut expect, 0x9000_0000, &text(5, 1));
    w.flush_all().unwrap();
    let (p1, p2) = (noise(1, 7), text(1, 99));
    w.revise(slots[2], &|_| true, &[(255, &p1)]).unwrap();
    w.revise(compressed, &|_| true, &[(4, &p2)]).unwrap();
    set(&mut expect, 0x300_0000 + 255 * PAGE as u64, &p1);
    set(&mut expect, 0x9000_0000 + 4 * PAGE as u64, &p2);
    w.finish().unwrap();
    assert_eq!(pages_of(&d.0), expect, "with pages.idx");
    std::fs::remove_file(d.0.join(PAGES_INDEX_FILE)).unwrap();
    assert_eq!(pages_of(&d.0), expect, "headers walked");
}

/// A store written through the page cache while that is fast, past it
/// once it proves slow: here "slow" is every rate (the switch comes after
/// the first 32 MiB, at an end that is not page-aligned) or none; read
/// back the same either way.
#[test]
fn a_store_that_goes_past_the_page_cache_midway_reads_back_as_written() {
    for (name, slow_below) in [("adapt-slow", f64::INFINITY), ("adapt-fast", 0.0)] {
        let d = tempdir(name);
        let mut w = PageWriter::create(&d.0).unwrap();
        w.write_adaptive(slow_below);
        let mut expect = BTreeMap::new();
        for i in 0..40u64 {
            // A small compressed chunk between large ones: ends not aligned.
            let raw = noise(256, 500 + i);
            let at = 0x100_0000 * (i + 1);
            w.write(&Chunk::compress(at, &raw)).unwrap();
            set(&mut expect, at, &raw);
            let small = text(2, i as u8);
            w.write(&Chunk::compress(at + 0x80_0000, &small)).unwrap();
            set(&mut expect, at + 0x80_0000, &small);
        }
        let direct = w.is_direct();
        if slow_below == 0.0 {
            assert!(!direct, "{name}: went past the page cache");
        } else if std::env::var_os("CI").is_some() {
            assert!(direct, "{name}: stayed in the page cache");
        }
        w.finish().unwrap();
        assert_eq!(pages_of(&d.0), expect, "{name}");
    }
}
