//! The one typed layer of questions a checkpoint asks a frozen process
//! that only the process itself can answer: syscalls injected into its
//! stopped main thread with an output buffer ([`Ask::call_out`]), and its
//! pending signals. [`Frozen`] asks a real process; [`Scripted`] answers
//! from a script, so a kind's save side can be unit-tested.

use std::cell::RefCell;

use cr_ebpf_tracee::{Injector, Tracee};

use crate::SaveError;

/// Questions to a frozen process.
pub trait Ask {
    /// Runs syscall `nr` in the process; `args` gets the address of a
    /// zeroed buffer of `out_len` bytes; returns the result and the buffer.
    fn call_out(
        &self,
        nr: i64,
        out_len: usize,
        args: &dyn Fn(u64) -> [u64; 6],
    ) -> Result<(i64, Vec<u8>), SaveError>;

    /// The signals pending for the whole process, as `siginfo_t`s (left
    /// pending).
    fn pending_signals(&self) -> Result<Vec<Vec<u8>>, SaveError>;

    /// The signal of the job-control stop the process is in (`SIGSTOP`,
    /// `SIGTSTP`, `SIGTTIN`, `SIGTTOU`), or 0 when it was running when it
    /// was frozen.
    fn job_stop(&self) -> i32;
}

/// [`Ask`] through ptrace, in the stopped main thread `main` of `pid`.
pub struct Frozen<'a> {
    /// The process.
    pub pid: i32,
    /// Its injector.
    pub injector: &'a Injector,
    /// Its stopped main thread.
    pub main: &'a Tracee,
}

impl Ask for Frozen<'_> {
    fn call_out(
        &self,
        nr: i64,
        out_len: usize,
        args: &dyn Fn(u64) -> [u64; 6],
    ) -> Result<(i64, Vec<u8>), SaveError> {
        self.injector
            .call_out(self.main, nr, out_len, args)
            .map_err(|source| SaveError::Trace {
                pid: self.pid,
                source,
            })
    }

    fn pending_signals(&self) -> Result<Vec<Vec<u8>>, SaveError> {
        self.main
            .pending_signals(true)
            .map_err(|source| SaveError::Trace {
                pid: self.pid,
                source,
            })
    }

    fn job_stop(&self) -> i32 {
        self.main.job_stop().map_or(0, |s| s as i32)
    }
}

/// Address of the buffer [`Scripted`] hands out.
pub const SCRIPTED_BUFFER: u64 = 0x7ff0_0000_0000;

/// How [`Scripted`] answers one syscall: its result and buffer, from the
/// arguments.
type Answer = Box<dyn Fn([u64; 6]) -> (i64, Vec<u8>)>;

/// An [`Ask`] that answers from a script: for each syscall number, a
/// function of the arguments giving the result and the buffer's contents;
/// every call is recorded.
#[derive(Default)]
pub struct Scripted {
    answers: Vec<(i64, Answer)>,
    /// Pending signals to report.
    pub pending: Vec<Vec<u8>>,
    /// The job-control stop signal to report.
    pub job_stop: i32,
    asked: RefCell<Vec<(i64, [u64; 6])>>,
}

impl Scripted {
    /// Answers syscall `nr` with `f(args)`; unscripted calls fail with `ENOSYS`.
    pub fn answer(mut self, nr: i64, f: impl Fn([u64; 6]) -> (i64, Vec<u8>) + 'static) -> Self {
        self.answers.push((nr, Box::new(f)));
        self
    }

    /// Reports `signo` as the job-control stop.
    pub fn stopped_by(mut self, signo: i32) -> Self {
        self.job_stop = signo;
        self
    }

    /// Every call made: (number, arguments).
    pub fn asked(&self) -> Vec<(i64, [u64; 6])> {
        self.asked.borrow().clone()
    }
}

impl Ask for Scripted {
    fn call_out(
        &self,
        nr: i64,
        out_len: usize,
        args: &dyn Fn(u64) -> [u64; 6],
    ) -> Result<(i64, Vec<u8>), SaveError> {
        let a = args(SCRIPTED_BUFFER);
        self.asked.borrow_mut().push((nr, a));
        let (ret, mut out) = match self.answers.iter().find(|(n, _)| *n == nr) {
            Some((_, f)) => f(a),
            None => (-(libc::ENOSYS as i64), Vec::new()),
        };
        out.resize(out_len, 0);
        Ok((ret, out))
    }

    fn pending_signals(&self) -> Result<Vec<Vec<u8>>, SaveError> {
        Ok(self.pending.clone())
    }

    fn job_stop(&self) -> i32 {
        self.job_stop
    }
}
