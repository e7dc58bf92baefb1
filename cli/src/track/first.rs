//! What `track` does before its first checkpoint.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::Service;

/// Before the first checkpoint: trackers for the descendants, the memory
/// pre-copied and the state collected while the processes run, so that
/// its freeze is bounded by what changed, like the later ones'.
pub(super) fn prepare(svc: &mut Service) -> Result<()> {
    if !svc.precopy {
        // Its descendants get trackers of their own.
        svc.session.follow(Duration::ZERO);
    } else {
        // The base too: copied while the processes run (each descendant
        // given a tracker first), so its freeze only covers the pages
        // written meanwhile.
        svc.session.follow(Duration::ZERO);
        let p = svc
            .session
            .prime()
            .context("pre-copying the process's memory")?;
        eprintln!(
            "cr-ebpf: pre-copied {} pages in {:.0} ms while the process ran",
            p.pages,
            p.took.as_secs_f64() * 1e3
        );
    }
    // What the first checkpoint would collect frozen, collected now, each
    // injected question in a stop of its own: the log runs already, so
    // what changes meanwhile is asked again at the freeze.
    let w = svc.session.warm_up();
    svc.log.ours_of = w
        .windows
        .iter()
        .map(|&(p, a, b)| (p as u32, a, b))
        .collect();
    if w.stops > 0 {
        eprintln!(
            "cr-ebpf: collected its state while it ran ({} questions, each in a stop of at most {:.2} ms)",
            w.stops,
            w.worst_stop.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
