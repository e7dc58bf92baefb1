//! A progress bar on standard error for operations that take over a
//! second (a dump's pre-copy and write, a restore's fill and a lazy
//! restore's copy, `run`'s restores, a compaction, a standalone
//! `snapshot`, `track`'s first checkpoint), fed by what the library reports
//! (`cr_ebpf_image::progress`). Off when standard error is not a terminal
//! and with `--json`.

use std::{
    io::IsTerminal as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Shown once the operation has run for this long.
const AFTER: Duration = Duration::from_secs(1);

/// A bar shown while it lives, if the operation lasts.
pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Bar {
    /// Starts watching (nothing is shown for the first second); `enabled`
    /// false (`--json`) or a standard error that is not a terminal: never.
    pub fn start(enabled: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { stop, thread: None };
        }
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let begun = Instant::now();
            while begun.elapsed() < AFTER {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let bar = indicatif::ProgressBar::new(0);
            let style = |t: &str| {
                indicatif::ProgressStyle::with_template(t)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> ")
            };
            let counted = style("{msg:>22} [{bar:40}] {percent:>3}% {pos}/{len} pages, {elapsed}");
            let uncounted = style("{msg:>22} {spinner} {elapsed}");
            let mut was_counted = None;
            while !flag.load(Ordering::Relaxed) {
                let (phase, done, total) = cr_ebpf_image::progress::now();
                if was_counted != Some(total > 0) {
                    bar.set_style(if total > 0 {
                        counted.clone()
                    } else {
                        uncounted.clone()
                    });
                    was_counted = Some(total > 0);
                }
                bar.tick();
                bar.set_length(total.max(done));
                bar.set_position(done);
                bar.set_message(phase);
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
