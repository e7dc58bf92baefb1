//! Who we run as and which capabilities we hold.

use super::Check;

const CAPS: &[(u32, &str, bool, &str)] = &[
    (
        21,
        "CAP_SYS_ADMIN",
        true,
        "namespaces, PR_SET_MM_MAP, BPF on older kernels; without it a process under \
         seccomp is refused (its filters can neither be read nor kept from acting on \
         cr-ebpf's calls)",
    ),
    (39, "CAP_BPF", true, "loading eBPF programs and maps"),
    (38, "CAP_PERFMON", true, "attaching tracepoints"),
    (
        19,
        "CAP_SYS_PTRACE",
        true,
        "freezing and inspecting processes",
    ),
    (
        40,
        "CAP_CHECKPOINT_RESTORE",
        true,
        "clone3 set_tid, map_files",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        false,
        "TCP_REPAIR for established connections",
    ),
    (
        24,
        "CAP_SYS_RESOURCE",
        false,
        "without it: limits of another user's process are read from /proc/PID/limits; a \
         restore fails where the process had a hard limit above cr-ebpf's own; an OOM \
         score adjustment below cr-ebpf's own is refused",
    ),
];

/// Effective capability mask of this process.
fn effective_caps() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or("no CapEff line in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).map_err(|e| e.to_string())
}

pub fn checks() -> Vec<Check> {
    let uid = nix::unistd::geteuid();
    let mut out = vec![Check::new(
        "privileges",
        "root",
        false,
        if uid.is_root() {
            Ok("running as uid 0".into())
        } else {
            Err(format!("running as uid {uid}; run cr-ebpf as root"))
        },
    )];
    let caps = effective_caps();
    for &(bit, name, required, why) in CAPS {
        let outcome = match &caps {
            Ok(mask) if mask & (1 << bit) != 0 => Ok(format!("held ({why})")),
            Ok(_) => Err(format!("not held ({why})")),
            Err(e) => Err(format!("cannot read capabilities: {e}")),
        };
        out.push(Check::new("privileges", name, required, outcome));
    }
    out
}
