//! Installs what the build needs, idempotently; a no-op taking milliseconds
//! when everything is present.
//!
//! * Debian's `rustc-web`, `cargo-web` and `rust-web-src` (a rustc that
//!   ships the library source `-Z build-std=core` needs for the eBPF target;
//!   the rustup toolchains here have no `rust-src`), with `llvm-22-dev`
//!   (`llvm-config` and the `libLLVM.so` link), `libpolly-22-dev` and
//!   `libzstd-dev` for building bpf-linker against LLVM 22.
//! * `bpf-linker` 0.13.0 built against LLVM 22.
//! * tracefs mounted at `/sys/kernel/tracing`.
//! * Debian's `redis-server` and `redis-tools`: the real service the tests
//!   and benches checkpoint under its own load tool; `tmux`, the terminal
//!   multiplexer the terminal tests checkpoint with a shell inside.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Context as _, Result};

use crate::run as sh;

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    let start = Instant::now();
    debian_rust()?;
    bpf_linker()?;
    tracefs()?;
    services()?;
    let took = start.elapsed();
    if took.as_secs() >= 1 {
        eprintln!("setup: done in {:.1} s", took.as_secs_f64());
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn debian_rust() -> Result<()> {
    let present = Path::new(RUST_SRC).exists()
        && Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists()
        && Path::new(LLVM_PREFIX).join("bin/llvm-config").exists();
    if present {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the eBPF build needs Debian's rustc-web and rust-web-src; as root run: \
             apt-get update && apt-get install -y {}",
            APT_PACKAGES.join(" ")
        );
    }
    eprintln!("setup: installing {} from Debian", APT_PACKAGES.join(" "));
    sh(Command::new("apt-get").arg("update"))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(APT_PACKAGES))?;
    if !Path::new(RUST_SRC).exists() {
        bail!("apt installed rust-web-src but {RUST_SRC} is still missing");
    }
    Ok(())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_version().is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    sh(crate::cargo()
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    let v = bpf_linker_version()
        .context("bpf-linker was installed but is not on PATH (add ~/.cargo/bin to PATH)")?;
    eprintln!("setup: {v}");
    Ok(())
}

/// Services the tests run as Debian runs them (redis, and nginx, memcached
/// and PostgreSQL 15 in their default configurations under their own
/// users), tmux for the terminal tests and Go for a Go service's test.
const SERVICE_PACKAGES: &[&str] = &[
    "redis-server",
    "redis-tools",
    "tmux",
    "nginx",
    "memcached",
    "postgresql-15",
    "golang-go",
];

fn services() -> Result<()> {
    let present = [
        "/usr/bin/redis-server",
        "/usr/bin/redis-benchmark",
        "/usr/bin/redis-cli",
        "/usr/bin/tmux",
        "/usr/sbin/nginx",
        "/usr/bin/memcached",
        "/usr/lib/postgresql/15/bin/postgres",
        "/usr/bin/go",
    ]
    .iter()
    .all(|p| Path::new(p).exists());
    if present {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "setup: the service and terminal tests and benches need {}; as root run: apt-get install -y {}",
            SERVICE_PACKAGES.join(" "),
            SERVICE_PACKAGES.join(" ")
        );
        return Ok(());
    }
    eprintln!(
        "setup: installing {} from Debian",
        SERVICE_PACKAGES.join(" ")
    );
    // Installing a service's package starts it, unless the machine's
    // policy says not to (as container images do); the tests run their
    // own on the default ports, so the install is told not to meanwhile.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cr-ebpf setup: no service starts while it installs\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = sh(Command::new("apt-get").arg("update")).and_then(|()| {
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(SERVICE_PACKAGES))
    });
    if ours {
        std::fs::remove_file(policy)?;
    }
    installed
}

fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "setup: tracefs is not mounted and we are not root; \
             as root run: mount -t tracefs nodev /sys/kernel/tracing"
        );
        return Ok(());
    }
    sh(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
