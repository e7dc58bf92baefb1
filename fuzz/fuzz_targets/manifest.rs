//! A manifest's payload, decoded as the format minor its first byte picks
//! (the file checksum is what a crafted image recomputes: the decoder
//! itself must refuse what is wrong, never panic, hang or exhaust memory).
#![no_main]

use cr_ebpf_image::{file::HEADER_LEN, Manifest, FORMAT_MINOR};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, payload)) = data.split_first() else {
        return;
    };
    let minor = u16::from(first) % (FORMAT_MINOR + 1);
    if let Ok(m) = Manifest::decode_version(payload, HEADER_LEN as u64, minor) {
        // What decodes is written again and reads back the same.
        let again = m.encode();
        let back = Manifest::decode(&again, HEADER_LEN as u64).expect("re-encoded manifest");
        assert_eq!(back, m);
    }
});
