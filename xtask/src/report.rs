//! The bench summary: the ratios that catch regressions, from the benches'
//! JSON files, as `summary.json` and `summary.md`, and `--check` against a
//! baseline.
//!
//! Every figure compared is a ratio of two things measured in the same run
//! (ours against memcpy or the disk, tracked against untracked), never an
//! absolute time: these machines are shared and noisy, and a baseline from
//! one machine must stay meaningful on another.

use std::{collections::BTreeMap, path::Path};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One compared figure.
#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub better: Better,
    pub what: String,
    /// Least worsening that counts as a regression for this metric, when it
    /// is noisier than the run's threshold allows for.
    pub noise: f64,
}

fn read(dir: &Path, file: &str) -> Result<Option<Value>> {
    let p = dir.join(file);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?,
    ))
}

/// Adds metric `name` to `out` when `value` is a number.
fn push(out: &mut Vec<Metric>, name: &str, value: Option<f64>, better: Better, what: &str) {
    if let Some(v) = value.filter(|v| v.is_finite()) {
        // The disk rate (buffered write + fsync) varies 3x between runs here.
        let noise = if name.ends_with("dump_over_disk") {
            2.0
        } else {
            0.0
        };
        out.push(Metric {
            name: name.into(),
            value: v,
            better,
            what: what.into(),
            noise,
        });
    }
}

/// The metrics found in the bench outputs in `dir`.
pub fn metrics(dir: &Path) -> Result<Vec<Metric>> {
    let mut out = Vec::new();
    for each in [ebpf, dump_restore, criu, redis, scaling, incremental] {
        each(dir, &mut out)?;
    }
    Ok(out)
}

/// eBPF costs against no programs.
fn ebpf(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    if let Some(e) = read(dir, "ebpf-overhead.json")? {
        let m = &e["median_ns"];
        let ratio = |a: &str, b: &str| Some(m[a].as_f64()? / m[b].as_f64()?);
        push(
            out,
            "ebpf.syscall_untracked_over_none",
            ratio("syscall/untracked", "syscall/none"),
            Better::Lower,
            "a syscall with the programs loaded, process untracked / no programs",
        );
        push(
            out,
            "ebpf.syscall_logged_over_none",
            ratio("logged-syscall/tracked", "logged-syscall/none"),
            Better::Lower,
            "a logged syscall, tracked / no programs",
        );
        push(
            out,
            "ebpf.wp_fault_tracked_over_none",
            ratio("wp-fault/tracked", "wp-fault/none"),
            Better::Lower,
            "a write fault on a uffd-wp page, tracked / no programs",
        );
    }
    Ok(())
}

/// Full dump and restore rates against the machine's limits.
fn dump_restore(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    if let Some(d) = read(dir, "dump-restore.json")? {
        let memcpy = d["memcpy_gb_s"].as_f64();
        let disk = d["disk_write_fsync_gb_s"].as_f64();
        let cores = d["cores"].as_u64().unwrap_or(1);
        if let Some(med) = d["median"].as_object() {
            for (key, m) in med {
                if !key.ends_with(&format!("/{cores}w")) {
                    continue;
                }
                let size = key.split('/').next().unwrap_or(key);
                push(
                    out,
                    &format!("dump.{size}.dump_over_disk"),
                    m["dump_gb_s"].as_f64().zip(disk).map(|(a, b)| a / b),
                    Better::Higher,
                    &format!("full dump GB/s / buffered write+fsync GB/s, {size}, all cores"),
                );
                push(
                    out,
                    &format!("dump.{size}.restore_over_memcpy"),
                    m["restore_gb_s"].as_f64().zip(memcpy).map(|(a, b)| a / b),
                    Better::Higher,
                    &format!("restore GB/s / memcpy GB/s, {size}, all cores"),
                );
            }
        }
    }
    Ok(())
}

/// Full dump and restore times against CRIU's, when it ran.
fn criu(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    if let Some(d) = read(dir, "dump-restore.json")? {
        let cores = d["cores"].as_u64().unwrap_or(1);
        for (size, c) in d["criu"].as_object().into_iter().flatten() {
            let ours = &d["median"][format!("{size}/{cores}w")];
            for (what, key) in [("dump", "dump_s"), ("restore", "restore_s")] {
                push(
                    out,
                    &format!("criu.{size}.{what}_ours_over_criu"),
                    ours[key].as_f64().zip(c[key].as_f64()).map(|(a, b)| a / b),
                    Better::Lower,
                    &format!("our full {what} time / CRIU's, same workload and run, {size}"),
                );
            }
        }
    }
    Ok(())
}

/// redis-server's requests per second, tracked against untracked.
fn redis(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    if let Some(r) = read(dir, "redis.json")? {
        push(
            out,
            "redis.requests_tracked_over_untracked",
            r["requests_per_s"]["ratio"].as_f64(),
            Better::Higher,
            "redis-benchmark requests/s against redis-server, tracked / untracked (same run)",
        );
    }
    Ok(())
}

/// The incremental freeze against the number of threads, mappings,
/// descriptors and processes.
fn scaling(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    if let Some(sc) = read(dir, "scaling.json")? {
        let med = &sc["median"];
        let base = med["base: 1 threads, 10 mappings, 10 fds"]["incremental_freeze_ms"].as_f64();
        for (name, key) in [
            ("threads64", "threads: 64 threads, 10 mappings, 10 fds"),
            ("mappings10k", "mappings: 1 threads, 10000 mappings, 10 fds"),
            ("fds10k", "fds: 1 threads, 10 mappings, 10000 fds"),
            (
                "processes16",
                "processes: 1 threads, 10 mappings, 10 fds, 16 processes",
            ),
        ] {
            push(
                out,
                &format!("scaling.{name}_freeze_over_base"),
                med[key]["incremental_freeze_ms"]
                    .as_f64()
                    .zip(base)
                    .map(|(a, b)| a / b),
                Better::Lower,
                &format!("incremental freeze with {key} / with 1 thread, 10 mappings, 10 fds"),
            );
        }
    }
    Ok(())
}

/// Throughput and freeze of every incremental-bench run.
fn incremental(dir: &Path, out: &mut Vec<Metric>) -> Result<()> {
    let mut incr: Vec<(String, Value)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    (n.starts_with("incremental") && n.ends_with(".json")).then_some(n)
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| Some((n.clone(), read(dir, &n).ok()??)))
        .collect();
    incr.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in incr {
        let load = match v["load"].as_str() {
            None | Some("memory") => String::new(),
            Some(l) => format!("{l}."),
        };
        let tag = format!(
            "{load}{}MiB.{}permille",
            v["mib"].as_u64().unwrap_or(0),
            v["write_rate_permille_per_s"].as_f64().unwrap_or(0.0)
        );
        push(
            out,
            &format!("incremental.{tag}.throughput_tracked_over_untracked"),
            v["throughput"]["ratio"].as_f64(),
            Better::Higher,
            "the workload's own throughput, tracked / untracked (same run)",
        );
        // The median: with 20-60 checkpoints the p99 is one or two samples,
        // too noisy on a shared VM to compare against a threshold.
        let copy_s = v["size_kib"]["median"]
            .as_f64()
            .zip(v["memcpy_gb_s"].as_f64())
            .map(|(kib, gbs)| kib * 1024.0 / (gbs * 1e9));
        push(
            out,
            &format!("incremental.{tag}.freeze_p50_over_memcpy"),
            v["freeze_ms"]["p50"]
                .as_f64()
                .zip(copy_s)
                .map(|(ms, s)| ms / 1e3 / s),
            Better::Lower,
            "freeze p50 / memcpy time of the median checkpoint's bytes",
        );
    }
    Ok(())
}

/// Whether the CRIU at `criu` can checkpoint on this kernel (`criu check`),
/// as the report states it. A CRIU that cannot is reported, not an error:
/// Debian's 3.17 stops at "Unexpected rt vDSO area bounds" on 6.18.
pub fn criu_status(criu: Option<&Path>) -> Value {
    let Some(criu) = criu else {
        return json!({"status": "not compared (pass --criu PATH)"});
    };
    let out = std::process::Command::new(criu).arg("check").output();
    match out {
        Err(e) => json!({
            "path": criu.display().to_string(),
            "status": format!("cannot run {}: {e}", criu.display()),
        }),
        Ok(o) if o.status.success() => json!({
            "path": criu.display().to_string(),
            "status": "criu check passed",
            "pre_dump": pre_dump_status(criu),
        }),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            // The most telling line: the first that is not a bare exit status.
            let why = text
                .lines()
                .find(|l| !l.contains("exited, status"))
                .unwrap_or("no output")
                .trim()
                .to_string();
            json!({
                "path": criu.display().to_string(),
                "status": format!("does not work on this kernel: `criu check` failed: {why}"),
            })
        }
    }
}

/// Whether this CRIU can make a pre-dump chain here (`criu pre-dump`
/// needs the kernel's soft-dirty bits, which not every kernel has). The
/// benches compare full dumps; a chain of CRIU's is not run.
fn pre_dump_status(criu: &Path) -> String {
    let out = std::process::Command::new(criu)
        .args(["check", "--feature", "mem_dirty_track"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            "possible on this kernel (not compared: the benches run full dumps)".into()
        }
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            let why = text
                .lines()
                .find(|l| l.contains("Dirty tracking"))
                .or_else(|| text.lines().last())
                .unwrap_or("no output")
                .trim()
                .to_string();
            format!("not possible on this kernel (`criu check --feature mem_dirty_track`: {why})")
        }
        Err(e) => format!("not checked: {e}"),
    }
}

/// Writes `summary.json` and `summary.md` into `dir`.
pub fn write_summary(dir: &Path, metrics: &[Metric]) -> Result<()> {
    let mut map = BTreeMap::new();
    for m in metrics {
        map.insert(
            m.name.clone(),
            json!({
                "value": m.value,
                "better": if m.better == Better::Higher { "higher" } else { "lower" },
                "what": m.what,
            }),
        );
    }
    let mut peers = read(dir, "peers.json")?.unwrap_or(Value::Null);
    // A CRIU that passed its check but failed on the workload says so.
    if let Some(e) =
        read(dir, "dump-restore.json")?.and_then(|d| d["criu"]["error"].as_str().map(String::from))
    {
        peers["status"] = format!("criu check passed, but dumping the workload failed: {e}").into();
    }
    let p = dir.join("summary.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(&json!({ "metrics": map, "criu": peers }))?,
    )
    .with_context(|| format!("writing {}", p.display()))?;
    let mut md = String::new();
    if let Some(status) = peers["status"].as_str() {
        md.push_str(&format!("CRIU: {status}\n\n"));
    }
    if let Some(pre) = peers["pre_dump"].as_str() {
        md.push_str(&format!("CRIU pre-dump chain: {pre}\n\n"));
    }
    md.push_str("| metric | value | better | what |\n|---|---|---|---|\n");
    for m in metrics {
        md.push_str(&format!(
            "| `{}` | {:.3} | {} | {} |\n",
            m.name,
            m.value,
            if m.better == Better::Higher {
                "higher"
            } else {
                "lower"
            },
            m.what
        ));
    }
    let p = dir.join("summary.md");
    std::fs::write(&p, md).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// Compares `metrics` with the `summary.json` at `baseline`: a metric that
/// got worse by more than `threshold` (a fraction) is a regression. Metrics
/// missing on either side are listed, not failed.
pub fn check(metrics: &[Metric], baseline: &Path, threshold: f64) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(baseline)
        .with_context(|| format!("reading the baseline {}", baseline.display()))?;
    let base: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the baseline {}", baseline.display()))?;
    let Some(base) = base["metrics"].as_object() else {
        bail!("{} has no \"metrics\" object", baseline.display());
    };
    let mut worse = Vec::new();
    for m in metrics {
        let Some(b) = base.get(&m.name).and_then(|b| b["value"].as_f64()) else {
            println!("  {:<68} {:>9.3}  (not in the baseline)", m.name, m.value);
            continue;
        };
        // How much worse, as a fraction of the baseline (negative: better).
        let change = match m.better {
            Better::Higher => (b - m.value) / b,
            Better::Lower => (m.value - b) / b,
        };
        let limit = threshold.max(m.noise);
        let flag = if change > limit { "WORSE" } else { "ok" };
        println!(
            "  {:<68} {:>9.3}  baseline {:>9.3}  {:+6.1}% worse  {flag}",
            m.name,
            m.value,
            b,
            change * 100.0
        );
        if change > limit {
            worse.push(format!(
                "{}: {:.3} against {:.3} in the baseline ({:+.1}%, threshold {:.0}%)",
                m.name,
                m.value,
                b,
                change * 100.0,
                limit * 100.0
            ));
        }
    }
    Ok(worse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_flags_only_what_worsened_beyond_the_threshold() {
        let dir = std::env::temp_dir().join(format!("xtask-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = |name: &str, value, better| Metric {
            name: name.into(),
            value,
            better,
            what: String::new(),
            noise: 0.0,
        };
        let base = vec![
            m("a", 1.0, Better::Higher),
            m("b", 1.0, Better::Lower),
            m("c", 2.0, Better::Lower),
        ];
        write_summary(&dir, &base).unwrap();
        let now = vec![
            m("a", 0.7, Better::Higher), // 30% worse
            m("b", 1.1, Better::Lower),  // 10% worse
            m("c", 1.0, Better::Lower),  // better
            m("d", 5.0, Better::Lower),  // new
        ];
        let worse = check(&now, &dir.join("summary.json"), 0.25).unwrap();
        assert_eq!(worse.len(), 1, "{worse:?}");
        assert!(worse[0].starts_with("a:"));
        assert!(std::fs::read_to_string(dir.join("summary.md"))
            .unwrap()
            .contains("| `a` | 1.000 | higher |"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_criu_that_fails_its_check_is_reported_not_fatal() {
        let status = criu_status(Some(Path::new("/bin/false")));
        assert!(
            status["status"]
                .as_str()
                .unwrap()
                .starts_with("does not work on this kernel"),
            "{status}"
        );
        let status = criu_status(Some(Path::new("/nonexistent/criu")));
        assert!(status["status"].as_str().unwrap().starts_with("cannot run"));
        assert!(criu_status(None)["status"]
            .as_str()
            .unwrap()
            .starts_with("not compared"));
    }

    #[test]
    fn criu_pre_dump_is_reported_as_the_kernel_allows() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xtask-criu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let off = fake(
            "off",
            "echo 'Warn  (criu/kerndat.c:1642): something else' >&2\n\
             echo 'Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.' >&2\n\
             exit 1",
        );
        let s = pre_dump_status(&off);
        assert!(
            s.starts_with("not possible") && s.contains("Dirty tracking is OFF"),
            "{s}"
        );
        let on = fake("on", "exit 0");
        assert!(pre_dump_status(&on).starts_with("possible"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
