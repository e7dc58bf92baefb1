//! The checkpoint side: freeze a process, collect what it can see of
//! itself, read its memory on all cores, and publish an image atomically.
//!
//! Covered so far: every thread's registers and FPU state and signal mask;
//! the memory map with the pages that differ from their backing (anonymous
//! memory, copy-on-write copies of file pages); mm fields, auxv and exe.
//! File descriptors, signal handlers, timers and the rest of issue-level
//! state come next (see `docs/IMAGE.md` for what the format holds).

mod dump;
mod fds;
mod maps;
mod proc;

pub use dump::{dump, DumpError, DumpOptions, DumpReport};
pub use maps::{parse_maps, MapEntry};
