//! Workload programs (`src/bin/`) and regression benches of cr-ebpf, plus
//! small helpers their tests and benches share.

/// Whether a privileged test may run here. Outside CI a missing privilege
/// skips the test with a printed reason; with `CI=true` it is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let why = format!("{test} needs root (eBPF, ptrace)");
    if in_ci() {
        panic!("{why}, and CI=true: a missing capability is a failure in CI");
    }
    eprintln!("SKIPPED {test}: {why}; run the tests as root (`cargo xtask test`)");
    false
}

/// Whether we run under CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The xorshift64 step the workloads use for their seeded patterns.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Median of samples (the benches report medians).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
