//! eBPF: BTF, JIT, tracefs, every program loaded and attached, and events
//! from every tracepoint delivered through the ring buffer.

use std::{ffi::CString, os::fd::AsRawFd, time::Duration};

use cr_ebpf_loader::{tracefs, Event, Tracer, TracerOptions};
use nix::{
    sys::wait::waitpid,
    unistd::{fork, pipe, read, write, ForkResult},
};

use super::Check;

const GROUP: &str = "eBPF";

pub fn checks() -> Vec<Check> {
    let mut out = vec![
        Check::new(GROUP, "BTF", false, btf()),
        Check::new(GROUP, "BPF JIT", false, jit()),
    ];
    let tracefs = tracefs::find()
        .map(|p| format!("mounted at {}", p.display()))
        .ok_or_else(|| {
            "not mounted: run `mount -t tracefs nodev /sys/kernel/tracing` or `cargo xtask setup`"
                .to_string()
        });
    out.push(Check::new(GROUP, "tracefs", true, tracefs));

    let (mut tracer, statuses) = match Tracer::probe(&TracerOptions::default()) {
        Ok(t) => t,
        Err(e) => {
            out.push(Check::new(
                GROUP,
                "load the eBPF object",
                true,
                Err(crate::error_chain(&e)),
            ));
            return out;
        }
    };
    let mut all_attached = true;
    for s in &statuses {
        all_attached &= s.result.is_ok();
        out.push(Check::new(
            GROUP,
            format!("program {} on {}", s.program, s.tracepoint),
            true,
            match &s.result {
                Ok(()) => Ok("loaded and attached".into()),
                Err(e) => Err(crate::error_chain(e)),
            },
        ));
    }
    let delivery = if all_attached {
        live_delivery(&mut tracer)
    } else {
        Err("skipped: not every program attached".into())
    };
    out.push(Check::new(
        GROUP,
        "ring buffer delivers every kind of event",
        true,
        delivery,
    ));
    out
}

fn btf() -> Result<String, String> {
    let p = std::path::Path::new("/sys/kernel/btf/vmlinux");
    match std::fs::metadata(p) {
        Ok(m) => Ok(format!("{} ({} KiB)", p.display(), m.len() / 1024)),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

fn jit() -> Result<String, String> {
    match std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable") {
        Ok(v) if v.trim() != "0" => Ok(format!("enabled (bpf_jit_enable = {})", v.trim())),
        Ok(_) => Err("bpf_jit_enable = 0: programs run interpreted (slower)".into()),
        Err(e) => Err(format!("/proc/sys/net/core/bpf_jit_enable: {e}")),
    }
}

/// Tracks a scripted child and requires an event from every tracepoint:
/// a syscall, a user and a kernel write fault, a fork, an exit and an exec.
fn live_delivery(tracer: &mut Tracer) -> Result<String, String> {
    let true_path = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("no /bin/true to exec")?;
    let prog = CString::new(true_path).map_err(|e| e.to_string())?;
    let zero = CString::new("/dev/zero").map_err(|e| e.to_string())?;
    let (go_rd, go_wr) = pipe().map_err(|e| format!("pipe: {e}"))?;

    // SAFETY: forked before any runtime thread exists; the child only makes
    // syscalls on data prepared before the fork, then execs or exits.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(go_wr);
            let mut b = [0u8; 1];
            let _ = read(go_rd.as_raw_fd(), &mut b);
            // SAFETY: raw syscalls on memory this child owns; see above.
            unsafe {
                let mut fds = [0; 2];
                libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC);
                libc::close(fds[0]);
                libc::close(fds[1]);
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as *mut u8;
                page.write_volatile(1);
                let z = libc::open(zero.as_ptr(), libc::O_RDONLY);
                libc::read(z, page.add(4096).cast(), 4096);
                let g = libc::fork();
                if g == 0 {
                    libc::_exit(0);
                }
                libc::waitpid(g, std::ptr::null_mut(), 0);
                let argv = [prog.as_ptr(), std::ptr::null()];
                libc::execv(prog.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
        }
        ForkResult::Parent { child } => child,
    };
    drop(go_rd);
    let result = (|| {
        tracer
            .track(child.as_raw() as u32)
            .map_err(|e| crate::error_chain(&e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let mut events = tracer.events().map_err(|e| crate::error_chain(&e))?;
            write(&go_wr, b"g").map_err(|e| format!("starting the child: {e}"))?;
            collect(&mut events, child.as_raw() as u32).await
        })
    })();
    drop(go_wr);
    let _ = waitpid(child, None);
    result
}

async fn collect(events: &mut cr_ebpf_loader::EventStream, pid: u32) -> Result<String, String> {
    let (mut syscall, mut user_fault, mut kernel_fault, mut fork, mut exit, mut exec) =
        (false, false, false, false, false, false);
    let mut total = 0;
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.next_batch(&mut batch)).await {
            Err(_) => break,
            Ok(r) => {
                r.map_err(|e| format!("reading the ring buffer: {e}"))?;
            }
        }
        let mut done = false;
        for e in batch.drain(..) {
            let e = e.map_err(|e| e.to_string())?;
            total += 1;
            match &e {
                Event::Syscall(s) if s.name == Some("pipe2") => syscall = true,
                Event::Fault(f) if f.kernel => kernel_fault = true,
                Event::Fault(_) => user_fault = true,
                Event::Fork(f) if !f.thread => fork = true,
                Event::Exec(_) => exec = true,
                Event::Exit(x) if x.origin.tgid != pid => exit = true,
                Event::Exit(x) if x.group_dead == Some(true) => done = true,
                _ => {}
            }
        }
        if done {
            break;
        }
    }
    let missing: Vec<&str> = [
        (syscall, "syscall (raw_syscalls)"),
        (user_fault, "user write fault"),
        (kernel_fault, "kernel write fault"),
        (fork, "fork"),
        (exit, "exit"),
        (exec, "exec"),
    ]
    .iter()
    .filter(|(seen, _)| !seen)
    .map(|(_, n)| *n)
    .collect();
    if missing.is_empty() {
        Ok(format!(
            "{total} events from a test child: syscall, user and kernel write faults, fork, exit, exec"
        ))
    } else {
        Err(format!(
            "no {} event arrived from a test child ({total} events seen)",
            missing.join(", ")
        ))
    }
}
