//! Content comparison with the chain, for checkpoints taken without a
//! dirty tracker (a standalone `snapshot`).

use std::{collections::HashMap, path::Path};

use cr_ebpf_image::{Chain, ImageError};
use rayon::prelude::*;

use super::{image_io, PAGE};
use crate::pages::union_runs;

/// A 64-bit hash of one page's contents.
pub fn page_hash(page: &[u8]) -> u64 {
    cr_ebpf_dirty_tracker::hashing::page_hash(page)
}

/// The content of the newest checkpoint, as page hashes.
pub(super) struct Baseline {
    pub(super) hashes: HashMap<u64, u64>,
}

impl Baseline {
    pub(super) fn load(dir: &Path, pool: &rayon::ThreadPool) -> Result<Self, ImageError> {
        let chain = Chain::open(dir)?;
        chain.read_ahead();
        let per_fill: Result<Vec<Vec<(u64, u64)>>, ImageError> = pool.install(|| {
            chain
                .fills()
                .par_iter()
                .map_init(Vec::new, |buf, f| {
                    let mut out = Vec::new();
                    chain.read(
                        f,
                        buf,
                        |addr, bytes| {
                            for (i, p) in bytes.chunks_exact(PAGE as usize).enumerate() {
                                out.push((addr + i as u64 * PAGE, page_hash(p)));
                            }
                            Ok(())
                        },
                        |e| image_io("reading", dir.display().to_string(), e),
                    )?;
                    Ok(out)
                })
                .collect()
        });
        Ok(Self {
            hashes: per_fill?.into_iter().flatten().collect(),
        })
    }

    /// The pages of `start..end` the chain stores, as runs.
    pub(super) fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut pages: Vec<u64> = self
            .hashes
            .keys()
            .copied()
            .filter(|&a| a >= start && a < end)
            .collect();
        pages.sort_unstable();
        union_runs(pages.into_iter().map(|p| (p, 1)).collect(), Vec::new())
    }
}
