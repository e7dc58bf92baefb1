//! Backend: the kernel's soft-dirty bits (`/proc/PID/clear_refs` 4 and
//! pagemap bit 55). Only on kernels built with `CONFIG_MEM_SOFT_DIRTY`; the
//! scanning side is not implemented yet, only the probe that tells whether
//! this kernel has it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;

use crate::sys;

/// Pagemap bit: the page was written since soft-dirty bits were last cleared.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Tells whether soft-dirty tracking works: clears the bits, checks a written
/// page is clean, writes it, and checks it became dirty.
pub fn probe() -> Result<String, String> {
    let page = sys::page_size() as usize;
    let map = sys::AnonMapping::new(page).map_err(|e| format!("mmap: {e}"))?;
    map.write_byte(0, 1);
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| format!("clearing soft-dirty bits: {e}"))?;
    let clean = sys::pagemap_entry(&pagemap, map.addr()).map_err(|e| e.to_string())?;
    map.write_byte(0, 2);
    let dirty = sys::pagemap_entry(&pagemap, map.addr()).map_err(|e| e.to_string())?;
    match (clean & PM_SOFT_DIRTY != 0, dirty & PM_SOFT_DIRTY != 0) {
        (false, true) => Ok("clear_refs 4 clears and a write sets pagemap bit 55".into()),
        (_, false) => Err(
            "a written page never shows pagemap bit 55 (kernel without CONFIG_MEM_SOFT_DIRTY)"
                .into(),
        ),
        (true, true) => Err("clear_refs 4 does not clear pagemap bit 55".into()),
    }
}
