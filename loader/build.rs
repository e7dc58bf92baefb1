//! Builds the eBPF object from `../ebpf` and leaves it in `OUT_DIR` for
//! `include_bytes_aligned!`.
//!
//! The eBPF crate is compiled with the Debian toolchain under `/usr`
//! (`rustc-web`, which ships the library source that `-Z build-std=core`
//! needs) and linked by `bpf-linker`. `cargo xtask setup` installs both.
//!
//! The inner `cargo build` runs as aya-build would run it (same target,
//! flags and target directory), but its output is kept: shown only when it
//! fails, so a normal build prints nothing of it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};

/// The eBPF package and where it is.
const PACKAGE: &str = "cr-ebpf-ebpf";
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");

fn main() -> anyhow::Result<()> {
    let toolchain_dir = std::env::var("CR_EBPF_BPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    println!("cargo:rerun-if-env-changed=CR_EBPF_BPF_TOOLCHAIN");
    let src = Path::new(&toolchain_dir).join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        return Err(anyhow!(
            "the eBPF build needs the Rust library source at {}; run `cargo xtask setup` \
             (installs Debian's rustc-web and rust-web-src) first",
            src.display()
        ));
    }
    println!("cargo:rerun-if-changed={ROOT}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain_dir,
        "cargo",
        "build",
        "--package",
        PACKAGE,
    ])
    .args([
        "--bins",
        "--message-format=json",
        "--release",
        "--target",
        target,
    ])
    .args(["-Z", "build-std=core", "--target-dir"])
    .arg(&target_dir)
    // The stable rustc here takes -Z through this (as .cargo/config.toml).
    .env("RUSTC_BOOTSTRAP", "1")
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    )
    // The toolchain of rustup run, not the outer build's.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Everything it said: the compiler's messages and cargo's.
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        for rendered in stdout.lines().filter_map(rendered) {
            for line in rendered.lines() {
                println!("cargo:warning={line}");
            }
        }
        bail!(
            "building the eBPF programs failed ({}; is bpf-linker installed? `cargo xtask setup`)",
            out.status
        );
    }
    let mut copied = 0;
    for (name, exe) in stdout.lines().filter_map(executable) {
        std::fs::copy(&exe, out_dir.join(&name))
            .with_context(|| format!("copying {exe} into {}", out_dir.display()))?;
        copied += 1;
    }
    if copied == 0 {
        bail!("building the eBPF programs produced no executable");
    }
    Ok(())
}

/// A compiler message's rendered text, from one JSON line of cargo.
fn rendered(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["reason"] == "compiler-message")
        .then(|| v["message"]["rendered"].as_str().map(str::to_string))
        .flatten()
}

/// `(target name, executable)` of a built binary, from one JSON line.
fn executable(line: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["reason"] != "compiler-artifact" {
        return None;
    }
    Some((
        v["target"]["name"].as_str()?.to_string(),
        v["executable"].as_str()?.to_string(),
    ))
}
