//! A bound on how long a dump holds a process frozen.
//!
//! The thread that froze a process is its ptrace tracer: only it can let
//! the process go, and a dump stuck in a call that never returns (a thread
//! in uninterruptible sleep, a hung disk or file system) never would. When
//! the bound passes, the watchdog removes the dump's network lock, says
//! what the dump was doing, and ends this program: the kernel then lets go
//! of every frozen thread, which returns to its own context (injected calls
//! go through the process's rt_sigreturn trampoline, see
//! `cr_ebpf_tracee`), and nothing is published (the image is written
//! under a temporary name that the next run cleans up).

use std::{
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use crate::ConnectionLock;

/// What the dump under way is doing, for the watchdog's message.
static PHASE: Mutex<String> = Mutex::new(String::new());

/// Environment variable of fault-injection tests: a dump entering a phase
/// whose description contains its value stalls there for ever.
pub const STALL_ENV: &str = "CR_EBPF_FAULT_STALL";

/// Records what the dump does now.
pub(crate) fn phase(what: impl Into<String>) {
    let what = what.into();
    if let Ok(stall) = std::env::var(STALL_ENV) {
        if !stall.is_empty() && what.contains(&stall) {
            *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = what;
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    if std::env::var_os("CR_EBPF_PHASE_TIMES").is_some() {
        static T0: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let t0 = T0.get_or_init(std::time::Instant::now);
        eprintln!("phase {:8.1} ms {what}", t0.elapsed().as_secs_f64() * 1e3);
    }
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = what;
}

/// The network lock to remove when the watchdog fires.
type LockSlot = Arc<Mutex<Option<(Arc<dyn ConnectionLock>, String)>>>;

/// A running watchdog; dropping it (or [`Watchdog::disarm`]) stops it.
pub(crate) struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    lock: LockSlot,
}

impl Watchdog {
    /// Ends the program if not disarmed within `limit` after process `pid`
    /// was frozen.
    pub(crate) fn start(pid: i32, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let lock: LockSlot = Arc::default();
        let slot = lock.clone();
        std::thread::Builder::new()
            .name("dump-watchdog".into())
            .spawn(move || {
                if rx.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
                let what = PHASE.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some((l, name)) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    l.unlock(&name);
                }
                eprintln!(
                    "cr-ebpf: error: the dump held process {pid} frozen for {:.1} s, the limit \
                     (--freeze-limit), stuck {what}: giving up, the process runs on and \
                     nothing is published",
                    limit.as_secs_f64()
                );
                // Ending the program detaches every frozen thread.
                std::process::exit(1);
            })
            .expect("starting the dump watchdog");
        Self {
            done: Some(tx),
            lock,
        }
    }

    /// The network lock `name` was taken: removed if the watchdog fires.
    pub(crate) fn holds(&self, lock: Arc<dyn ConnectionLock>, name: String) {
        *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some((lock, name));
    }

    /// The image is published (or the dump failed and let go): the
    /// process is no longer held for the watchdog's sake.
    pub(crate) fn disarm(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}
