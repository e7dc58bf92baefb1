//! A workload for the rseq tests: it registers its own rseq area (run it
//! with `GLIBC_TUNABLES=glibc.pthread.rseq=0`) and spends nearly all its
//! time inside one long restartable sequence. Preempted there, it is
//! aborted to the handler, as the kernel guarantees; a sequence that runs
//! to its end with the area's `rseq_cs` cleared under it means the kernel
//! stopped guarding it (the loss a checkpoint must not cause): it writes
//! `bad` into the control directory (its first argument) and exits 3.
//! Otherwise it writes `status` there: `aborted completed`.

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::arch::asm;

    const RSEQ_SIG: u32 = 0x5305_3053;

    #[repr(C, align(32))]
    struct Area {
        cpu_id_start: u32,
        cpu_id: u32,
        rseq_cs: u64,
        flags: u32,
        rest: [u32; 3],
    }
    let ctl = std::path::PathBuf::from(std::env::args().nth(1).expect("a control directory"));
    let area = Box::leak(Box::new(Area {
        cpu_id_start: 0,
        cpu_id: u32::MAX,
        rseq_cs: 0,
        flags: 0,
        rest: [0; 3],
    }));
    let p: *mut Area = area;
    // SAFETY: registering an area that lives as long as the process.
    let r = unsafe { libc::syscall(libc::SYS_rseq, p, 32u32, 0, RSEQ_SIG) };
    assert_eq!(r, 0, "rseq: {}", std::io::Error::last_os_error());
    let (mut aborted, mut completed) = (0u64, 0u64);
    loop {
        let seen: u64;
        let abort: u64;
        // SAFETY: the sequence only writes the area's rseq_cs and its own
        // registers; its descriptor and abort handler are in sections of
        // their own, as rseq wants.
        unsafe {
            asm!(
                ".pushsection __rseq_cs_crebpf, \"aw\"",
                ".balign 32",
                "72:",
                ".long 0, 0",
                ".quad 73f, (74f - 73f), 75f",
                ".popsection",
                "lea {t}, [rip + 72b]",
                "73:",
                "mov qword ptr [{a} + 8], {t}",
                "mov {n}, 20000000",
                "76:",
                "dec {n}",
                "jnz 76b",
                "mov {s}, qword ptr [{a} + 8]",
                "74:",
                "xor {b:e}, {b:e}",
                "jmp 77f",
                ".pushsection __rseq_failure_crebpf, \"ax\"",
                ".byte 0x0f, 0xb9, 0x3d",
                ".long 0x53053053",
                "75:",
                "mov {b:e}, 1",
                "xor {s:e}, {s:e}",
                "jmp 77f",
                ".popsection",
                "77:",
                a = in(reg) p,
                t = out(reg) _,
                n = out(reg) _,
                s = out(reg) seen,
                b = out(reg) abort,
            );
        }
        if abort == 1 {
            aborted += 1;
        } else if seen == 0 {
            std::fs::write(ctl.join("bad"), "a sequence ended with rseq_cs cleared").unwrap();
            std::process::exit(3);
        } else {
            completed += 1;
        }
        let tmp = ctl.join("status.tmp");
        std::fs::write(&tmp, format!("{aborted} {completed}")).unwrap();
        std::fs::rename(&tmp, ctl.join("status")).unwrap();
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("rseq_loop is for x86_64");
    std::process::exit(2);
}
