//! `cr-ebpf check`: probes, for real, everything the tool relies on, in the
//! spirit of `criu check`. Each probe exercises the feature (loads and
//! attaches, forks a child and seizes it, asks for a pid, moves the vDSO, ...)
//! rather than trusting a config file. Exits non-zero when something the core
//! needs is missing.

mod bpf;
mod kernel;
mod netlock;
mod privileges;

use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;

/// Options of `cr-ebpf check`.
#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one probe.
#[derive(Debug, Serialize)]
pub struct Check {
    /// Section of the report.
    pub group: &'static str,
    /// What was probed.
    pub name: String,
    /// Whether the core of cr-ebpf needs it.
    pub required: bool,
    /// `ok`, `missing` (optional, absent) or `failed` (required, absent).
    pub status: &'static str,
    /// What was seen, or why it is absent.
    pub detail: String,
}

impl Check {
    fn new(
        group: &'static str,
        name: impl Into<String>,
        required: bool,
        outcome: Result<String, String>,
    ) -> Self {
        let (status, detail) = match outcome {
            Ok(d) => ("ok", d),
            Err(d) if required => ("failed", d),
            Err(d) => ("missing", d),
        };
        Self {
            group,
            name: name.into(),
            required,
            status,
            detail,
        }
    }

    fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    kernel: String,
    machine: String,
    checks: Vec<Check>,
    dirty_tracking_backend: &'static str,
    core_ok: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    let uname = nix::sys::utsname::uname()?;
    let mut checks = Vec::new();
    checks.extend(privileges::checks());
    // Probes that fork run first, while this process has a single thread.
    checks.extend(kernel::checks());
    let detection = cr_ebpf_dirty_tracker::detect();
    let backend = detection.backend();
    checks.push(Check::new(
        "dirty memory",
        "userfaultfd WP_ASYNC + PAGEMAP_SCAN",
        false,
        detection.uffd_wp.clone(),
    ));
    checks.push(Check::new(
        "dirty memory",
        "soft-dirty bits",
        false,
        detection.soft_dirty.clone(),
    ));
    checks.push(Check::new(
        "dirty memory",
        "content hashing",
        true,
        detection.hashing.clone(),
    ));
    checks.extend(bpf::checks());
    checks.push(netlock::check());

    let core_ok = checks.iter().all(|c| !c.required || c.ok());
    let report = Report {
        kernel: uname.release().to_string_lossy().into_owned(),
        machine: uname.machine().to_string_lossy().into_owned(),
        checks,
        dirty_tracking_backend: backend.name(),
        core_ok,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if core_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_text(r: &Report) {
    println!("cr-ebpf check: kernel {} ({})", r.kernel, r.machine);
    let mut group = "";
    for c in &r.checks {
        if c.group != group {
            group = c.group;
            println!("\n{group}");
        }
        let mark = match c.status {
            "ok" => "ok     ",
            "missing" => "absent ",
            _ => "FAILED ",
        };
        println!("  {mark} {}: {}", c.name, c.detail);
    }
    println!("\ndirty-tracking backend: {}", r.dirty_tracking_backend);
    let optional_missing = r.checks.iter().filter(|c| c.status == "missing").count();
    if r.core_ok {
        println!(
            "result: everything the core needs is present ({optional_missing} optional feature(s) absent)"
        );
    } else {
        let failed: Vec<&str> = r
            .checks
            .iter()
            .filter(|c| c.status == "failed")
            .map(|c| c.name.as_str())
            .collect();
        println!("result: MISSING what the core needs: {}", failed.join("; "));
    }
}
