//! Running syscalls inside a frozen process, to ask what only the process
//! itself can ask (its signal handlers, timers, `clear_child_tid`, ...).
//!
//! No code is added to the process: the `syscall` instruction of its own
//! vDSO (the kernel's fallback path) is borrowed, and outputs go to a
//! scratch area below the thread's stack pointer (below the red zone),
//! whose previous contents are put back afterwards.

use crate::{sys, TraceError, Tracee};

/// Injects syscalls into the threads of one frozen process.
pub struct Injector {
    pid: i32,
    insn: u64,
    /// An `rt_sigreturn` trampoline in the process, for injections that
    /// survive cr-ebpf's death (see `guarded.rs`); `None`: plain ones.
    trampoline: Option<u64>,
}

/// Most bytes of executable memory read looking for a trampoline.
const TRAMPOLINE_BUDGET: usize = 64 << 20;

/// Bytes read at once while looking for an instruction sequence.
const PIECE: usize = 256 << 10;

/// The first address of `needle` in `a..b` of process `pid`, read piece
/// by piece (stopping where it is found), taking what is read from
/// `budget`.
fn find(pid: i32, a: u64, b: u64, needle: &[u8], budget: &mut usize) -> Option<u64> {
    let finder = memchr::memmem::Finder::new(needle);
    let mut buf = vec![0u8; PIECE];
    let mut at = a;
    while at < b && *budget > 0 {
        let len = ((b - at) as usize).min(PIECE).min(*budget);
        *budget = budget.saturating_sub(len);
        let piece = &mut buf[..len];
        sys::read_memory(pid, at, piece).ok()?;
        if let Some(i) = finder.find(piece) {
            return Some(at + i as u64);
        }
        if at + len as u64 >= b {
            break;
        }
        // Overlapping the next piece by what a match could straddle.
        let step = (len.saturating_sub(needle.len() - 1)).max(1);
        at += step as u64;
    }
    None
}

/// Distance below the stack pointer of the scratch area (well past the
/// 128-byte red zone).
const SCRATCH_BELOW_SP: u64 = 4096;
/// Largest output a call may ask for.
pub const SCRATCH_MAX: usize = 2048;

impl Injector {
    /// Finds a `syscall` instruction in the process's vDSO (or, failing
    /// that, in its other executable mappings), and an `rt_sigreturn`
    /// trampoline (libc's first).
    pub fn new(pid: i32) -> Result<Self, TraceError> {
        let path = format!("/proc/{pid}/maps");
        let maps =
            std::fs::read_to_string(&path).map_err(|source| TraceError::Proc { path, source })?;
        // (start, end, rank): the vDSO first, then libc, then the rest.
        let mut candidates: Vec<(u64, u64, u8)> = Vec::new();
        for line in maps.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 || f[1].as_bytes().get(2) != Some(&b'x') {
                continue;
            }
            let Some((a, b)) = f[0].split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            let name = f.get(5).copied().unwrap_or("");
            if name == "[vsyscall]" {
                continue;
            }
            let rank = match name {
                "[vdso]" => 0,
                n if n.contains("/libc") => 1,
                _ => 2,
            };
            candidates.push((a, b, rank));
        }
        candidates.sort_by_key(|c| c.2);
        let mut insn = None;
        let mut trampoline = None;
        let mut budget = TRAMPOLINE_BUDGET;
        for (a, b, _) in candidates {
            if insn.is_some() && (trampoline.is_some() || budget == 0) {
                break;
            }
            if insn.is_none() {
                insn = find(pid, a, b, &[0x0f, 0x05], &mut budget);
            }
            if trampoline.is_none() {
                trampoline = crate::guarded::TRAMPOLINES
                    .iter()
                    .find_map(|t| find(pid, a, b, t, &mut budget));
            }
        }
        let insn = insn.ok_or_else(|| TraceError::Unexpected {
            tid: pid,
            what: "no syscall instruction found in the process's executable memory".into(),
        })?;
        Ok(Self {
            pid,
            insn,
            trampoline,
        })
    }

    /// Whether the instructions this injector borrows are still where it
    /// found them: false once the process replaced its program (an
    /// `execve` since [`Injector::new`]), when an injection would run
    /// whatever now lies there. Ask it of a stopped process, before each
    /// injection, when the injector outlives a stop.
    pub fn intact(&self) -> bool {
        let at = |addr: u64, want: &[u8]| {
            let mut b = vec![0u8; want.len()];
            sys::read_memory(self.pid, addr, &mut b).is_ok() && b == want
        };
        at(self.insn, &[0x0f, 0x05])
            && self.trampoline.is_none_or(|t| {
                crate::guarded::TRAMPOLINES
                    .iter()
                    .any(|pattern| at(t, pattern))
            })
    }

    /// Address of the `rt_sigreturn` trampoline injections go through, if
    /// the process has one.
    pub fn trampoline(&self) -> Option<u64> {
        self.trampoline
    }

    /// Address of the borrowed `syscall` instruction.
    pub fn insn(&self) -> u64 {
        self.insn
    }

    /// Runs syscall `nr` in thread `t` with plain arguments: through the
    /// process's `rt_sigreturn` trampoline when it has one, so that the
    /// thread returns to its own context even if cr-ebpf dies meanwhile.
    pub fn call(&self, t: &Tracee, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
        self.call_until(t, nr, args, crate::Step::Done)
    }

    /// [`Injector::call`] that stops after step `until` of a guarded
    /// injection (see [`Tracee::inject_guarded_until`]); for fault-injection
    /// tests. Without a trampoline, a plain injection.
    pub fn call_until(
        &self,
        t: &Tracee,
        nr: i64,
        args: [u64; 6],
        until: crate::Step,
    ) -> Result<i64, TraceError> {
        if let Some(tr) = self.trampoline {
            // Below the scratch area of `call_out`.
            let below = SCRATCH_BELOW_SP + 64;
            if let Some(r) = t.inject_guarded_until(self.pid, tr, below, nr, args, until)? {
                return Ok(r);
            }
        }
        t.inject_syscall(self.insn, nr, args)
    }

    /// Runs syscall `nr` in thread `t`; `args` receives the address of a
    /// zeroed scratch area of `out_len` bytes; returns the result and the
    /// scratch contents afterwards. The scratch memory is restored.
    pub fn call_out(
        &self,
        t: &Tracee,
        nr: i64,
        out_len: usize,
        args: impl FnOnce(u64) -> [u64; 6],
    ) -> Result<(i64, Vec<u8>), TraceError> {
        assert!(out_len <= SCRATCH_MAX);
        let sp = t.regs()?.rsp;
        let scratch = (sp - SCRATCH_BELOW_SP) & !15;
        let mut saved = vec![0u8; out_len];
        sys::read_memory(self.pid, scratch, &mut saved)?;
        sys::write_memory(self.pid, scratch, &vec![0u8; out_len])?;
        let ret = self.call(t, nr, args(scratch));
        let mut out = vec![0u8; out_len];
        let read = sys::read_memory(self.pid, scratch, &mut out);
        sys::write_memory(self.pid, scratch, &saved)?;
        let ret = ret?;
        read?;
        Ok((ret, out))
    }
}
