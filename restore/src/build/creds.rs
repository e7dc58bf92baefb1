//! The `creds` phase: every thread's credentials and seccomp state, once
//! everything that needs privilege is done (see the creds module of the
//! resources crate for the order). Filters every thread has go first,
//! synchronised from the main thread; then each other thread gets its own
//! credentials, and the main thread last.

use cr_ebpf_resources::{
    process::creds,
    sys::{Injected, PAGE},
};

use super::Build;
use crate::RestoreError;

pub(super) fn creds(b: &mut Build<'_>) -> Result<(), RestoreError> {
    let threads = &b.m.threads;
    // An older image: its credentials are ours (checked before the start).
    let Some(main) = threads.first().and_then(|t| t.creds.as_ref()) else {
        return Ok(());
    };
    let from = creds::ours()?;
    let shared = creds::shared_filters(threads);
    creds::install_filters(b.s, &main.seccomp_filters[..shared], true)?;
    for ((t, _, _), info) in b.others.iter().zip(&threads[1..]) {
        let c = info.creds.as_ref().ok_or_else(|| {
            RestoreError::NotSupported(format!("thread {} without credentials", info.tid))
        })?;
        let s = Injected::new(t, b.pid, b.tramp, b.tramp + PAGE);
        creds::restore(&s, c, &from, shared)?;
    }
    creds::restore(b.s, main, &from, shared)
}
