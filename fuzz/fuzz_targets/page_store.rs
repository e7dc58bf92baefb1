//! A page store's payload behind a valid header (the whole-store checksum
//! recomputed, as a crafted image would), opened and every chunk
//! decompressed.
#![no_main]

use cr_ebpf_image::{
    file::{self, FileKind},
    pages::{PageStore, PAGE},
    PAGES_FILE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-fuzz-pages-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    file::write_whole(&dir.join(PAGES_FILE), FileKind::Pages, data).expect("writing the store");
    if let Ok(store) = PageStore::open(&dir) {
        let mut out = Vec::new();
        for c in store.chunks() {
            out.resize(c.npages as usize * PAGE, 0);
            let _ = store.decompress_into(c, &mut out);
        }
        let _ = store.verify();
    }
});
