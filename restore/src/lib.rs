//! The parallel restorer: reads a checkpoint chain, resolves every page to its
//! newest copy, rebuilds the process tree with its original PIDs and TIDs,
//! memory layout, registers, signals and file descriptors, then resumes it.
//!
//! Not implemented yet: this crate is the seam the restore side will fill
//! (see `docs/ARCHITECTURE.md`). It deliberately exports nothing so that no
//! caller can mistake it for a working restorer.
