//! The memory layout of a process being built: the stub's own mappings
//! cleared (but the trampoline, the vDSO and what it inherited to keep),
//! the vDSO moved to its recorded place, the recorded mappings made.

use std::os::fd::AsFd as _;

use cr_ebpf_image::{
    MappingKind, MAP_DROPPABLE, MAP_GROWSDOWN, MAP_MAYWRITE, MAP_NORESERVE, MAP_SHARED,
};
use cr_ebpf_resources::{
    advice,
    proc::MapEntry,
    sys::{Sys, PAGE},
};

use super::Build;
use crate::{
    stub::{overlaps, TRAMPOLINE_LEN},
    RestoreError,
};

/// Everything of the stub goes but the trampoline and the vDSO.
pub(super) fn clear(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (s, tramp) = (b.s, b.tramp);
    let is_special = |e: &MapEntry| {
        matches!(
            e.kind(),
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        )
    };
    for e in &b.stub_maps {
        if overlaps((e.start, e.end), (tramp, tramp + TRAMPOLINE_LEN)) || is_special(e) {
            continue;
        }
        for (start, end) in crate::inherit::outside((e.start, e.end), &b.kept) {
            s.call("munmap", libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])?;
        }
    }

    Ok(())
}

/// The vDSO and its data pages to the recorded addresses (through a free
/// area first, in case the two layouts overlap).
pub(super) fn vdso(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (s, m, vdso_tmp) = (b.s, b.m, b.vdso_tmp);
    let specials: Vec<&MapEntry> = b
        .stub_maps
        .iter()
        .filter(|e| matches!(e.kind(), MappingKind::Vdso | MappingKind::Vvar))
        .collect();
    let lo = specials.iter().map(|e| e.start).min().unwrap_or(0);
    for e in &specials {
        let len = e.end - e.start;
        let want = m.mappings.iter().find(|x| x.path == e.path);
        match want {
            Some(w) if w.end - w.start != len => {
                return Err(RestoreError::NotSupported(format!(
                    "{} is {} pages on this kernel, {} in the image (taken on another kernel?)",
                    e.path,
                    len / PAGE,
                    (w.end - w.start) / PAGE
                )));
            }
            _ => {}
        }
        s.call(
            "mremap",
            libc::SYS_mremap,
            [
                e.start,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                vdso_tmp + (e.start - lo),
                0,
            ],
        )?;
    }
    for e in &specials {
        let len = e.end - e.start;
        let at = vdso_tmp + (e.start - lo);
        match m.mappings.iter().find(|x| x.path == e.path) {
            Some(w) => {
                s.call(
                    "mremap",
                    libc::SYS_mremap,
                    [
                        at,
                        len,
                        len,
                        (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                        w.start,
                        0,
                    ],
                )?;
            }
            None => {
                s.call("munmap", libc::SYS_munmap, [at, len, 0, 0, 0, 0])?;
            }
        }
    }

    Ok(())
}

/// The recorded mappings, writable where pages will be filled; shared
/// memory from the objects made for the restore.
pub(super) fn map(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let (s, m) = (b.s, b.m);
    // Shared memory objects, with their contents, for the mappings and
    // memfd descriptors that refer to them.
    let shm = &b.natives.shmem;

    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for x in &m.mappings {
        if matches!(
            x.kind,
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall
        ) {
            continue;
        }
        let len = x.end - x.start;
        let prot = if x.pages_stored > 0 {
            x.prot | rw
        } else {
            x.prot
        };
        if b.kept.contains(&(x.start, x.end)) {
            crate::inherit::keep(s, x, prot, &m.cow)?;
            continue;
        }
        let mut share = if x.flags & MAP_SHARED != 0 {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        if x.flags & MAP_NORESERVE != 0 {
            share |= libc::MAP_NORESERVE;
        }
        let sysv = x.kind == MappingKind::Shmem
            && m.shmem
                .iter()
                .any(|o| o.id == x.inode && o.kind == cr_ebpf_image::ShmemKind::SysV);
        let got_addr = if sysv && x.offset > 0 {
            // The rest of a segment attached at a lower address.
            s.call(
                "mprotect",
                libc::SYS_mprotect,
                [x.start, len, prot as u64, 0, 0, 0],
            )?;
            x.start as i64
        } else if sysv {
            let mut flags = 0;
            if x.prot & libc::PROT_WRITE as u32 == 0 {
                flags |= libc::SHM_RDONLY;
            }
            if x.prot & libc::PROT_EXEC as u32 != 0 {
                flags |= libc::SHM_EXEC;
            }
            s.call(
                "shmat",
                libc::SYS_shmat,
                [x.inode, x.start, flags as u64, 0, 0, 0],
            )?
        } else if x.kind == MappingKind::Shmem {
            let ours = shm.get(&x.inode).ok_or_else(|| {
                RestoreError::stub(format!("shared memory at {:#x} was not rebuilt", x.start))
            })?;
            let fd = s.adopt(ours.as_fd())?;
            map_fd(s, x, prot, share, fd)?
        } else if x.kind == MappingKind::File {
            let mut path = x.path.clone().into_bytes();
            path.push(0);
            if path.len() as u64 > PAGE {
                return Err(RestoreError::NotSupported(format!(
                    "path longer than a page: {}",
                    x.path
                )));
            }
            let at = s.put(0, &path)?;
            let writes = x.prot & libc::PROT_WRITE as u32 != 0 || x.flags & MAP_MAYWRITE != 0;
            let mode = if share & libc::MAP_SHARED != 0 && writes {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = s.call(
                "openat",
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as u64,
                    at,
                    (mode | libc::O_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                ],
            )?;
            map_fd(s, x, prot, share, fd)?
        } else {
            let share = if x.flags & MAP_DROPPABLE != 0 {
                advice::MMAP_DROPPABLE | (share & libc::MAP_NORESERVE)
            } else {
                share
            };
            let mut flags = share | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
            if x.flags & MAP_GROWSDOWN != 0 {
                flags |= libc::MAP_GROWSDOWN;
            }
            s.call(
                "mmap",
                libc::SYS_mmap,
                [x.start, len, prot as u64, flags as u64, u64::MAX, 0],
            )?
        };
        if got_addr as u64 != x.start {
            return Err(RestoreError::stub(format!(
                "mapping {:#x} landed at {got_addr:#x}",
                x.start
            )));
        }
    }

    Ok(())
}

/// Maps the recorded mapping `x` from the stub's descriptor `fd` (closed
/// afterwards, whatever happens).
fn map_fd(
    s: &dyn Sys,
    x: &cr_ebpf_image::MappingInfo,
    prot: u32,
    share: i32,
    fd: i64,
) -> Result<i64, RestoreError> {
    let r = s.call(
        "mmap",
        libc::SYS_mmap,
        [
            x.start,
            x.end - x.start,
            prot as u64,
            (share | libc::MAP_FIXED) as u64,
            fd as u64,
            x.offset,
        ],
    );
    s.call("close", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
    r
}
