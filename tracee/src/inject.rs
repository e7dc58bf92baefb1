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
}

/// Distance below the stack pointer of the scratch area (well past the
/// 128-byte red zone).
const SCRATCH_BELOW_SP: u64 = 4096;
/// Largest output a call may ask for.
pub const SCRATCH_MAX: usize = 2048;

impl Injector {
    /// Finds a `syscall` instruction in the process's vDSO (or, failing
    /// that, in its other executable mappings).
    pub fn new(pid: i32) -> Result<Self, TraceError> {
        let path = format!("/proc/{pid}/maps");
        let maps =
            std::fs::read_to_string(&path).map_err(|source| TraceError::Proc { path, source })?;
        let mut candidates: Vec<(u64, u64, bool)> = Vec::new();
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
            let vdso = f.get(5) == Some(&"[vdso]");
            if f.get(5) == Some(&"[vsyscall]") {
                continue;
            }
            candidates.push((a, b, vdso));
        }
        candidates.sort_by_key(|c| !c.2);
        for (a, b, _) in candidates {
            let len = ((b - a) as usize).min(8 << 20);
            let mut buf = vec![0u8; len];
            if sys::read_memory(pid, a, &mut buf).is_err() {
                continue;
            }
            if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(Self {
                    pid,
                    insn: a + i as u64,
                });
            }
        }
        Err(TraceError::Unexpected {
            tid: pid,
            what: "no syscall instruction found in the process's executable memory".into(),
        })
    }

    /// Address of the borrowed `syscall` instruction.
    pub fn insn(&self) -> u64 {
        self.insn
    }

    /// Runs syscall `nr` in thread `t` with plain arguments.
    pub fn call(&self, t: &Tracee, nr: i64, args: [u64; 6]) -> Result<i64, TraceError> {
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
