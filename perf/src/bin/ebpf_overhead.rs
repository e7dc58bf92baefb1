//! What the eBPF log costs a process, measured side by side in one run.
//!
//! Per syscall (a tight loop of one syscall):
//! * `none`: no programs loaded;
//! * `untracked`: programs loaded, this process not tracked;
//! * `tracked-filtered`: tracked, syscall not in the filter (`getppid`);
//! * `tracked-logged`: tracked, syscall logged (`umask`, one record each).
//!   The `none` baseline for it is `umask` with no programs loaded.
//!
//! Per write fault, `none`, `untracked`, `tracked`: the first write to a
//! fresh page (includes allocating it: noisy), and a write to a present page
//! write-protected by uffd-wp (the fault tracked processes take between
//! checkpoints; no allocation: the stable figure).
//!
//! Configurations are interleaved in rounds (programs loaded and unloaded
//! each round) and medians reported, so machine noise hits all alike.
//! Writes JSON with every sample to `--out`.
//!
//! Usage: `ebpf-overhead [--quick] [--out FILE]`

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Context as _, Result};
use cr_ebpf_loader::{EventStream, Tracer, TracerOptions};

const PAGE: usize = 4096;

fn getppid_loop(n: u64) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: plain syscall.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn umask_loop(n: u64) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: plain syscall; the mask stays 0o022.
        unsafe { libc::syscall(libc::SYS_umask, 0o022) };
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// ns per first write to a fresh anonymous page.
fn fault_loop(pages: usize) -> f64 {
    // SAFETY: a fresh private mapping, written and unmapped here.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as *mut u8;
        assert!(p as isize != -1, "mmap failed");
        let t = Instant::now();
        for i in 0..pages {
            p.add(i * PAGE).write_volatile(1);
        }
        let ns = t.elapsed().as_nanos() as f64 / pages as f64;
        libc::munmap(p.cast(), pages * PAGE);
        ns
    }
}

fn measure_without_programs(
    samples: &mut BTreeMap<&'static str, Vec<f64>>,
    calls: u64,
    fault_pages: usize,
    wp: &mut WpRegion,
) {
    samples
        .entry("wp-fault/none")
        .or_default()
        .push(wp.write_all(fault_pages));
    samples
        .entry("syscall/none")
        .or_default()
        .push(getppid_loop(calls));
    samples
        .entry("logged-syscall/none")
        .or_default()
        .push(umask_loop(calls));
    samples
        .entry("fault/none")
        .or_default()
        .push(fault_loop(fault_pages));
}

/// A populated region under uffd-wp: every timed write is a write fault on
/// a present, write-protected page that the kernel resolves by itself, the
/// fault a tracked process takes after each checkpoint. No page allocation
/// happens, so this is far less noisy than first-touch faults.
struct WpRegion {
    map: cr_ebpf_dirty_tracker::sys::AnonMapping,
    tracker: cr_ebpf_dirty_tracker::uffd_wp::WpTracker,
    found: Vec<std::ops::Range<u64>>,
}

impl WpRegion {
    fn new(pages: usize) -> Result<Self> {
        let map = cr_ebpf_dirty_tracker::sys::AnonMapping::new(pages * PAGE)?;
        for i in 0..pages {
            map.write_byte(i * PAGE, 1);
        }
        let tracker = cr_ebpf_dirty_tracker::uffd_wp::WpTracker::for_self()?;
        tracker.register(map.addr()..map.addr() + map.len() as u64)?;
        Ok(Self {
            map,
            tracker,
            found: Vec::new(),
        })
    }

    /// ns per write to a protected page; re-protects afterwards (untimed).
    fn write_all(&mut self, pages: usize) -> f64 {
        let t = Instant::now();
        for i in 0..pages {
            self.map.write_byte(i * PAGE, 2);
        }
        let ns = t.elapsed().as_nanos() as f64 / pages as f64;
        self.found.clear();
        let range = self.map.addr()..self.map.addr() + (pages * PAGE) as u64;
        self.tracker
            .scan(range, &mut self.found)
            .expect("PAGEMAP_SCAN re-protects the region");
        ns
    }
}

/// Runs `f` in chunks that fit the ring buffer, draining between chunks
/// (untimed), and returns the mean ns per call over all chunks.
fn chunked(
    events: &mut EventStream,
    total: u64,
    chunk: u64,
    mut f: impl FnMut(u64) -> f64,
) -> (f64, usize) {
    let mut sum = 0.0;
    let mut done = 0;
    let mut seen = 0;
    let mut sink = Vec::new();
    while done < total {
        let n = chunk.min(total - done);
        sum += f(n) * n as f64;
        done += n;
        seen += events.drain(&mut sink);
        sink.clear();
    }
    (sum / total as f64, seen)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = cr_ebpf_perf::arg_value(&args, "--out");
    let rounds = if quick { 4 } else { 10 };
    let calls: u64 = if quick { 200_000 } else { 1_000_000 };
    let fault_pages = if quick { 4096 } else { 16384 };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("ebpf-overhead loads eBPF programs: run it as root");
    }
    let me = std::process::id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();

    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut logged_events = 0usize;
    let mut lost = 0u64;
    // Warm up code paths and the allocator.
    getppid_loop(calls / 10);
    umask_loop(calls / 10);
    fault_loop(256);
    let mut wp = WpRegion::new(fault_pages)?;
    wp.write_all(fault_pages);

    for round in 0..rounds {
        eprint!("round {}/{rounds}\r", round + 1);
        // Alternate the order each round so that drift (caches, page
        // allocator state) does not favour one configuration.
        let none_first = round % 2 == 0;
        if none_first {
            measure_without_programs(&mut samples, calls, fault_pages, &mut wp);
        }
        let mut tracer = Tracer::load(&TracerOptions::default()).context("loading the programs")?;
        let mut events = tracer.events()?;
        let untracked = |samples: &mut BTreeMap<&str, Vec<f64>>, wp: &mut WpRegion| {
            samples
                .entry("wp-fault/untracked")
                .or_default()
                .push(wp.write_all(fault_pages));
            samples
                .entry("syscall/untracked")
                .or_default()
                .push(getppid_loop(calls));
            samples
                .entry("fault/untracked")
                .or_default()
                .push(fault_loop(fault_pages));
        };
        if none_first {
            untracked(&mut samples, &mut wp);
        }
        tracer.track(me)?;
        samples
            .entry("syscall/tracked-filtered")
            .or_default()
            .push(getppid_loop(calls));
        let (ns, seen) = chunked(&mut events, calls, 8192, umask_loop);
        logged_events += seen;
        samples
            .entry("logged-syscall/tracked")
            .or_default()
            .push(ns);
        let (ns, _) = chunked(&mut events, fault_pages as u64, 8192, |n| {
            fault_loop(n as usize)
        });
        samples.entry("fault/tracked").or_default().push(ns);
        let (ns, _) = chunked(&mut events, fault_pages as u64, 8192, |n| {
            wp.write_all(n as usize)
        });
        samples.entry("wp-fault/tracked").or_default().push(ns);
        lost += tracer.losses()?.iter().map(|l| l.dropped).sum::<u64>();
        tracer.untrack(me)?;
        if !none_first {
            untracked(&mut samples, &mut wp);
        }
        drop(events);
        drop(tracer);
        if !none_first {
            measure_without_programs(&mut samples, calls, fault_pages, &mut wp);
        }
    }
    eprintln!();

    let med: BTreeMap<&str, f64> = samples
        .iter()
        .map(|(k, v)| (*k, cr_ebpf_perf::median(v)))
        .collect();
    let delta = |a: &str, b: &str| med[a] - med[b];
    let ratio = |a: &str, b: &str| med[a] / med[b];
    println!("eBPF log overhead (medians of {rounds} interleaved rounds, ns per operation)");
    println!("{:<34} {:>10}", "configuration", "ns/op");
    for (k, v) in &med {
        println!("{k:<34} {v:>10.1}");
    }
    println!();
    println!(
        "syscall, untracked process:       {:+7.1} ns ({:.3}x of no programs)",
        delta("syscall/untracked", "syscall/none"),
        ratio("syscall/untracked", "syscall/none")
    );
    println!(
        "syscall, tracked but filtered:    {:+7.1} ns ({:.3}x)",
        delta("syscall/tracked-filtered", "syscall/none"),
        ratio("syscall/tracked-filtered", "syscall/none")
    );
    println!(
        "syscall, tracked and logged:      {:+7.1} ns ({:.3}x of the same syscall, no programs)",
        delta("logged-syscall/tracked", "logged-syscall/none"),
        ratio("logged-syscall/tracked", "logged-syscall/none")
    );
    println!(
        "first write to a page, untracked: {:+7.1} ns ({:.3}x)",
        delta("fault/untracked", "fault/none"),
        ratio("fault/untracked", "fault/none")
    );
    println!(
        "first write to a page, tracked:   {:+7.1} ns ({:.3}x)",
        delta("fault/tracked", "fault/none"),
        ratio("fault/tracked", "fault/none")
    );
    println!(
        "write to a uffd-wp page, untracked:{:+7.1} ns ({:.3}x)",
        delta("wp-fault/untracked", "wp-fault/none"),
        ratio("wp-fault/untracked", "wp-fault/none")
    );
    println!(
        "write to a uffd-wp page, tracked:  {:+7.1} ns ({:.3}x)",
        delta("wp-fault/tracked", "wp-fault/none"),
        ratio("wp-fault/tracked", "wp-fault/none")
    );
    println!("records delivered while logging: {logged_events}, lost: {lost}");

    if let Some(path) = out {
        let json = serde_json::json!({
            "bench": "ebpf-overhead",
            "rounds": rounds,
            "calls_per_sample": calls,
            "fault_pages_per_sample": fault_pages,
            "median_ns": med,
            "samples_ns": samples,
            "records_delivered": logged_events,
            "records_lost": lost,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {path}"))?;
        println!("results written to {path}");
    }
    Ok(())
}
