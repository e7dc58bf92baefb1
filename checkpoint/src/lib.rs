//! The checkpoint side: freeze a process, collect what it can see of
//! itself, read its memory on all cores, and publish an image atomically.
//!
//! Covered so far: every thread's registers and FPU state and signal mask;
//! the memory map with the pages that differ from their backing (anonymous
//! memory, copy-on-write copies of file pages); mm fields, auxv and exe.
//! File descriptors, signal handlers, timers and the rest of issue-level
//! state come next (see `docs/IMAGE.md` for what the format holds).

mod compact;
mod dump;
mod fds;
mod incremental;
mod maps;
mod proc;
mod state;

pub use compact::{clean_leftovers, compact, retain, CompactReport, RetainReport};
pub use dump::{dump, DumpError, DumpOptions, DumpReport};
pub use incremental::{
    monotonic_ns, page_hash, CheckpointReport, Method, Phases, PrecopyReport, Session,
    SessionOptions,
};
pub use maps::{parse_maps, MapEntry};
pub use state::{Changes, Queries};
