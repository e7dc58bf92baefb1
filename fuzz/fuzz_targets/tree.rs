//! A tree image's payload behind a valid header, read.
#![no_main]

use cr_ebpf_image::{
    file::{self, FileKind},
    tree::{Tree, TREE_FILE},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-fuzz-tree-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    file::write_whole(&dir.join(TREE_FILE), FileKind::Tree, data).expect("writing the tree");
    let _ = Tree::read(&dir);
});
