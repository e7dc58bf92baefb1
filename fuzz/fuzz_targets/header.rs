//! A component file's 32-byte header, as each kind of file.
#![no_main]

use cr_ebpf_image::file::{parse_header, FileKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [FileKind::Manifest, FileKind::Pages, FileKind::Tree] {
        let _ = parse_header("fuzz", data, kind);
    }
});
