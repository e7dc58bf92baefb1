//! How far the long operation under way in this program has come: a
//! phase and a count of pages done out of a total. The checkpoint,
//! restore and compaction code reports into it as it writes or fills
//! pages; a command line shows it (a progress bar) when it takes long.
//! One operation at a time: a new [`start`] replaces the previous one.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

static PHASE: Mutex<String> = Mutex::new(String::new());
static TOTAL: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

/// A new phase of `total` pages (0: unknown).
pub fn start(phase: &str, total: u64) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = phase.to_string();
    DONE.store(0, Ordering::Relaxed);
    TOTAL.store(total, Ordering::Relaxed);
}

/// `pages` more done.
pub fn add(pages: u64) {
    DONE.fetch_add(pages, Ordering::Relaxed);
}

/// The phase, pages done and the total.
pub fn now() -> (String, u64, u64) {
    (
        PHASE.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        DONE.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_pages_of_the_phase() {
        super::start("writing", 10);
        super::add(3);
        super::add(4);
        assert_eq!(super::now(), ("writing".to_string(), 7, 10));
        super::start("filling", 5);
        assert_eq!(super::now(), ("filling".to_string(), 0, 5));
    }
}
