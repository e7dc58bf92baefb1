//! Pages a process shared with its parent (copy-on-write since a fork, the
//! image's COW runs) are shared again: the parent's memory is built first,
//! the child's stub is made from the parent's, and the child keeps the
//! mappings it inherited that hold such pages. In those, the pages it
//! shared stay, every other page is dropped (`MADV_DONTNEED`: zero for
//! anonymous memory, the file's own page for a private file mapping) and
//! its own stored pages are filled over them as usual.

use cr_ebpf_image::{
    CowRun, Manifest, MappingInfo, MappingKind, MAP_DROPPABLE, MAP_GROWSDOWN, MAP_NORESERVE,
    MAP_SHARED,
};
use cr_ebpf_resources::sys::{Sys, PAGE};

use crate::RestoreError;

/// Flags a kept mapping must have as its parent's mapping has them.
const SAME_FLAGS: u32 = MAP_SHARED | MAP_GROWSDOWN | MAP_NORESERVE | MAP_DROPPABLE;

/// The mappings of `child` to keep from its parent's stub: those holding
/// pages shared with the parent. Each must lie inside one private mapping
/// of `parent` of the same kind, file and offset, and flags (a damaged or
/// crafted image otherwise).
pub(crate) fn kept(child: &Manifest, parent: &Manifest) -> Result<Vec<(u64, u64)>, RestoreError> {
    let mut out = Vec::new();
    for x in &child.mappings {
        let shares = child
            .cow
            .iter()
            .any(|r| x.start <= r.start && r.start < x.end);
        if !shares {
            continue;
        }
        if !parent.mappings.iter().any(|p| covers(p, x)) {
            return Err(RestoreError::NotSupported(format!(
                "process {} shares pages at {:#x} with its parent {}, whose image has no \
                 such mapping there (a damaged image?)",
                child.process.pid, x.start, parent.process.pid
            )));
        }
        out.push((x.start, x.end));
    }
    Ok(out)
}

/// Whether the parent's mapping `p` is where the child's `x` came from.
fn covers(p: &MappingInfo, x: &MappingInfo) -> bool {
    p.start <= x.start
        && x.end <= p.end
        && p.kind == x.kind
        && p.path == x.path
        && (p.flags ^ x.flags) & SAME_FLAGS == 0
        && x.flags & (MAP_SHARED | MAP_DROPPABLE) == 0
        && matches!(
            x.kind,
            MappingKind::Anon | MappingKind::Heap | MappingKind::Stack | MappingKind::File
        )
        && (x.kind != MappingKind::File || p.offset + (x.start - p.start) == x.offset)
}

/// The parts of `range` outside every range of `kept`.
pub(crate) fn outside(range: (u64, u64), kept: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut inside: Vec<(u64, u64)> = kept
        .iter()
        .filter(|k| k.0 < range.1 && range.0 < k.1)
        .copied()
        .collect();
    inside.sort_unstable();
    let mut out = Vec::new();
    let mut at = range.0;
    for (s, e) in inside {
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < range.1 {
        out.push((at, range.1));
    }
    out
}

/// The kept mapping `x` with protection `prot` while it is filled, and
/// only the pages it shares with the parent (runs `cow`) left in it.
pub(crate) fn keep(
    s: &dyn Sys,
    x: &MappingInfo,
    prot: u32,
    cow: &[CowRun],
) -> Result<(), RestoreError> {
    let len = x.end - x.start;
    s.call(
        "mprotect",
        libc::SYS_mprotect,
        [x.start, len, prot as u64, 0, 0, 0],
    )?;
    let shared: Vec<(u64, u64)> = cow
        .iter()
        .map(|r| (r.start, r.start + r.pages * PAGE))
        .collect();
    for (start, end) in outside((x.start, x.end), &shared) {
        s.call(
            "madvise",
            libc::SYS_madvise,
            [start, end - start, libc::MADV_DONTNEED as u64, 0, 0, 0],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cr_ebpf_resources::sys::fake::Recording;

    use super::*;

    fn anon(start: u64, pages: u64) -> MappingInfo {
        MappingInfo {
            start,
            end: start + pages * PAGE,
            prot: 3,
            kind: MappingKind::Anon,
            ..MappingInfo::default()
        }
    }

    #[test]
    fn ranges_outside_the_kept_ones() {
        let kept = [(0x3000, 0x5000), (0x8000, 0x9000)];
        assert_eq!(
            outside((0x1000, 0xa000), &kept),
            [(0x1000, 0x3000), (0x5000, 0x8000), (0x9000, 0xa000)]
        );
        assert_eq!(outside((0x3000, 0x5000), &kept), []);
        assert_eq!(outside((0x5000, 0x6000), &kept), [(0x5000, 0x6000)]);
    }

    #[test]
    fn a_kept_mapping_drops_every_page_but_the_shared_ones() {
        let rec = Recording::new();
        let x = anon(0x10000, 8);
        let cow = [CowRun {
            start: 0x12000,
            pages: 2,
        }];
        keep(&rec, &x, 3, &cow).unwrap();
        let dropped: Vec<(u64, u64)> = rec.calls("madvise").iter().map(|a| (a[0], a[1])).collect();
        assert_eq!(dropped, [(0x10000, 0x2000), (0x14000, 0x4000)]);
        assert_eq!(rec.calls("mprotect")[0][..3], [0x10000, 0x8000, 3]);
    }

    #[test]
    fn shared_pages_need_the_parents_mapping_there() {
        let mut child = Manifest {
            mappings: vec![anon(0x10000, 8), anon(0x40000, 2)],
            cow: vec![CowRun {
                start: 0x11000,
                pages: 1,
            }],
            ..Manifest::default()
        };
        let parent = Manifest {
            mappings: vec![anon(0xf000, 16)],
            ..Manifest::default()
        };
        assert_eq!(kept(&child, &parent).unwrap(), [(0x10000, 0x18000)]);
        child.cow[0].start = 0x40000;
        let err = kept(&child, &parent).unwrap_err();
        assert!(err.to_string().contains("no such mapping"), "{err}");
    }
}
