//! Empty library target: `loader` has a build-dependency on this crate so that
//! cargo rebuilds the loader (and with it the embedded eBPF object) when the
//! programs in `src/main.rs` or their dependencies change.
#![no_std]
