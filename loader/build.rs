//! Builds the eBPF object from `../ebpf` and leaves it in `OUT_DIR` for
//! `include_bytes_aligned!`.
//!
//! The eBPF crate is compiled with the Debian toolchain under `/usr`
//! (`rustc-web`, which ships the library source that `-Z build-std=core`
//! needs) and linked by `bpf-linker`. `cargo xtask setup` installs both.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let toolchain_dir = std::env::var("CR_EBPF_BPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    println!("cargo:rerun-if-env-changed=CR_EBPF_BPF_TOOLCHAIN");
    let src = std::path::Path::new(&toolchain_dir).join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        return Err(anyhow!(
            "the eBPF build needs the Rust library source at {}; run `cargo xtask setup` \
             (installs Debian's rustc-web and rust-web-src) first",
            src.display()
        ));
    }
    let ebpf = aya_build::Package {
        name: "cr-ebpf-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain_dir))
        .context("building the eBPF programs (is bpf-linker installed? `cargo xtask setup`)")
}
