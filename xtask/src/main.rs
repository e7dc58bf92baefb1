//! Project tasks. `cargo xtask setup | test | demo | bench`.
//!
//! Every task first runs `setup`, which installs what building the eBPF
//! programs needs on a fresh Debian machine (see `setup.rs`), so the README's
//! two commands, `cargo xtask demo` and `cargo xtask test`, work from a clean
//! clone.

mod plot;
mod report;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "cr-ebpf project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (Debian rustc-web, bpf-linker) and mount tracefs.
    Setup,
    /// Set up, then run lints and the whole test suite (privileged tests need root).
    Test,
    /// Set up, build, and run the built-in demo.
    Demo,
    /// Set up, build in release mode, and run the benches; results go to `results/`.
    Bench {
        /// Fewer rounds, for a quick smoke run.
        #[arg(long)]
        quick: bool,
        /// Where to write the results.
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// Compare the ratios with this `summary.json` (e.g. `perf/baseline.json`)
        /// and fail when one got worse by more than the threshold.
        #[arg(long)]
        check: Option<PathBuf>,
        /// How much worse a ratio may get before `--check` fails (fraction).
        #[arg(long, default_value_t = 0.25)]
        threshold: f64,
        /// Do not run the benches: summarise (and check) what `--out` holds.
        #[arg(long)]
        summarize_only: bool,
        /// A CRIU binary to compare with (its `check` decides whether it can run here).
        #[arg(long)]
        criu: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace root")?;
    setup::ensure()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Test => test(),
        Task::Demo => demo(),
        Task::Bench {
            summarize_only: true,
            out,
            check,
            threshold,
            ..
        } => summarize(&out, check.as_deref(), threshold),
        Task::Bench {
            quick,
            out,
            check,
            threshold,
            criu,
            ..
        } => bench(quick, &out, check.as_deref(), threshold, criu.as_deref()),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails with its status.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test() -> Result<()> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if ci {
            bail!("CI=true but not running as root: the privileged tests cannot run");
        }
        eprintln!(
            "note: not root: privileged tests (eBPF, ptrace) will be SKIPPED; run as root for the full suite"
        );
    }
    // The gigabyte tests write a few GiB of images: say what there is, so a
    // run that meets a full disk is read as such.
    for (what, dir) in [
        ("here", std::path::PathBuf::from(".")),
        ("temp", std::env::temp_dir()),
    ] {
        eprintln!(
            "disk: {} MiB free {what} ({})",
            free_mib(&dir),
            dir.display()
        );
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The default members: everything but the eBPF crate, which only builds
    // for the BPF target (through loader/build.rs).
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    run(cargo().args(["build", "--all-targets"]))?;
    if root {
        // What the kernel offers, for the log; fails the run if the core is missing.
        run(Command::new("target/debug/cr-ebpf").arg("check"))?;
    }
    let (passed, failed) = run_tests(cargo().args(["test", "--no-fail-fast"]))?;
    if root {
        // Smoke run of the benches (debug build: the numbers mean nothing, the
        // runs and the summary must not fail).
        let out = std::env::temp_dir().join(format!("cr-ebpf-bench-{}", std::process::id()));
        std::fs::create_dir_all(&out)?;
        let smoke = (|| -> Result<()> {
            run(Command::new("target/debug/ebpf-overhead")
                .arg("--quick")
                .arg("--out")
                .arg(out.join("ebpf-overhead.json")))?;
            run(Command::new("target/debug/dump-restore")
                .arg("--quick")
                .arg("--out")
                .arg(out.join("dump-restore.json")))?;
            run(Command::new("target/debug/incremental-bench")
                .arg("--quick")
                .arg("--out")
                .arg(out.join("incremental-quick.json")))?;
            run(Command::new("target/debug/incremental-bench")
                .args(["--quick", "--load", "syscalls", "--mib", "32"])
                .arg("--out")
                .arg(out.join("incremental-syscalls-quick.json")))?;
            run(Command::new("target/debug/scaling-bench")
                .arg("--quick")
                .arg("--out")
                .arg(out.join("scaling.json")))?;
            run(Command::new("target/debug/redis-bench")
                .arg("--quick")
                .arg("--out")
                .arg(out.join("redis.json")))?;
            summarize(&out, None, 0.25)
        })();
        let _ = std::fs::remove_dir_all(&out);
        smoke?;
    }
    let long = std::env::var("CR_EBPF_LONG").is_ok_and(|v| v == "1");
    if long && failed == 0 {
        fuzz()?;
    }
    println!("summary: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} test(s) failed");
    }
    Ok(())
}

/// MiB free to an unprivileged writer on the file system holding `dir`.
fn free_mib(dir: &std::path::Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: a zeroed statvfs is a valid value of this plain C struct.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `v` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut v) } != 0 {
        return 0;
    }
    (v.f_bavail as u64 * v.f_frsize as u64) >> 20
}

/// The libFuzzer targets of `fuzz/` (long mode): each runs for
/// `CR_EBPF_FUZZ_SECONDS` (default 120) from its corpus in the repository,
/// which grows with what the run finds new. Needs the nightly toolchain
/// and cargo-fuzz (installed here when missing).
fn fuzz() -> Result<()> {
    const TARGETS: [&str; 4] = ["header", "manifest", "tree", "page_store"];
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    let seconds = std::env::var("CR_EBPF_FUZZ_SECONDS").unwrap_or_else(|_| "120".into());
    for t in TARGETS {
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", t])
            .arg(format!("corpus/{t}"))
            .args(["--", "-rss_limit_mb=2048", "-timeout=10"])
            .arg(format!("-max_total_time={seconds}"))
            .current_dir("fuzz"))?;
    }
    Ok(())
}

/// Runs a `cargo test` command, passing its output through, and adds up the
/// `test result:` lines of every test binary.
fn run_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("+ {}", show(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", show(cmd)))?;
    let (mut passed, mut failed) = (0, 0);
    let out = BufReader::new(child.stdout.take().context("test output")?);
    for line in out.lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("`{}` failed: {status}", show(cmd));
    }
    Ok((passed, failed))
}

/// The number just before `label` in `ok. 4 passed; 0 failed; ...`.
fn count_before(text: &str, label: &str) -> u64 {
    text.find(label)
        .and_then(|end| text[..end].rsplit([' ', '.']).next()?.parse().ok())
        .unwrap_or(0)
}

fn demo() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "cr-ebpf", "-p", "cr-ebpf-perf"]))?;
    run(Command::new("target/release/cr-ebpf-demo").arg("target/release"))
}

fn bench(
    quick: bool,
    out: &Path,
    baseline: Option<&Path>,
    threshold: f64,
    criu: Option<&Path>,
) -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "cr-ebpf-perf", "-p", "cr-ebpf"]))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The peer: whether the CRIU asked for can run on this kernel at all.
    let peer = report::criu_status(criu);
    println!("criu: {}", peer["status"].as_str().unwrap_or("?"));
    if let Some(pre) = peer["pre_dump"].as_str() {
        println!("criu pre-dump chain: {pre}");
    }
    std::fs::write(out.join("peers.json"), serde_json::to_string_pretty(&peer)?)
        .with_context(|| format!("writing {}", out.join("peers.json").display()))?;
    let with_quick = |cmd: &mut Command| {
        if quick {
            cmd.arg("--quick");
        }
    };
    let criu_works = peer["status"].as_str() == Some("criu check passed");
    for (bin, json) in [
        ("ebpf-overhead", "ebpf-overhead.json"),
        ("dump-restore", "dump-restore.json"),
        ("scaling-bench", "scaling.json"),
        ("redis-bench", "redis.json"),
    ] {
        let mut cmd = Command::new(format!("target/release/{bin}"));
        cmd.arg("--out").arg(out.join(json));
        with_quick(&mut cmd);
        if let (Some(c), true, "dump-restore") = (criu, criu_works, bin) {
            // Side by side: the same workloads, dumped and restored by CRIU too.
            cmd.arg("--criu").arg(c);
        }
        run(&mut cmd)?;
    }
    // The pause: the main scenario (1 GiB, 1% of pages per second, 60
    // checkpoints), then RSS and write rate varied with 20 checkpoints each.
    // Then the overhead on a syscall-heavy process (a third of its calls
    // logged), same rate, small RSS.
    let scenarios: &[(&str, u64, f64, u64)] = if quick {
        &[("memory", 128, 10.0, 5), ("syscalls", 64, 10.0, 5)]
    } else {
        &[
            ("memory", 1024, 10.0, 60),
            ("memory", 256, 10.0, 20),
            ("memory", 4096, 10.0, 20),
            ("memory", 1024, 1.0, 20),
            ("memory", 1024, 100.0, 20),
            ("syscalls", 256, 10.0, 20),
        ]
    };
    for &(load, mib, rate, n) in scenarios {
        let prefix = if load == "memory" {
            "incremental".to_string()
        } else {
            format!("incremental-{load}")
        };
        let mut cmd = Command::new("target/release/incremental-bench");
        cmd.args(["--mib", &mib.to_string(), "--rate", &rate.to_string()])
            .args(["--checkpoints", &n.to_string(), "--load", load])
            .arg("--out")
            .arg(out.join(format!("{prefix}-{mib}MiB-{rate}permille.json")));
        if quick {
            cmd.args(["--base-secs", "3"]);
        } else if n < 60 {
            cmd.args(["--base-secs", "8"]);
        }
        run(&mut cmd)?;
    }
    summarize(out, baseline, threshold)
}

/// Writes the summary of the bench outputs in `out` and, with a baseline,
/// fails on a ratio that got worse by more than `threshold`.
fn summarize(out: &Path, baseline: Option<&Path>, threshold: f64) -> Result<()> {
    let metrics = report::metrics(out)?;
    report::write_summary(out, &metrics)?;
    println!(
        "bench summary: {} ratios in {}",
        metrics.len(),
        out.join("summary.md").display()
    );
    let charts = plot::write_all(out)?;
    println!("charts: {}", charts.join(", "));
    if let Some(b) = baseline {
        println!("against {}:", b.display());
        let worse = report::check(&metrics, b, threshold)?;
        if !worse.is_empty() {
            bail!(
                "{} ratio(s) worse than the baseline by more than {:.0}%:\n  {}",
                worse.len(),
                threshold * 100.0,
                worse.join("\n  ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_counts_from_a_result_line() {
        let l = "ok. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.76s";
        assert_eq!(count_before(l, " passed"), 4);
        assert_eq!(count_before(l, " failed"), 1);
        assert_eq!(count_before("FAILED. 12 passed; 3 failed;", " passed"), 12);
    }
}
