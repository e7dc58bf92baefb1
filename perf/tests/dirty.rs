//! Dirty trackers attached to another process: exactly the pages it writes
//! come back, from every backend this machine has, and attaching uffd-wp
//! leaves its descriptor table untouched.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    ops::Range,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use cr_ebpf_dirty_tracker::{soft_dirty, Backend, Tracker};

const PAGEWRITER: &str = env!("CARGO_BIN_EXE_pagewriter");
const PAGE: u64 = 4096;
const PAGES: u64 = 64;

/// A running `pagewriter` with `PAGES` pages at `base`.
struct Writer {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    pid: i32,
    base: u64,
}

impl Writer {
    fn spawn() -> Self {
        let mut cmd = Command::new(PAGEWRITER);
        cmd.arg(PAGES.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        cr_ebpf_perf::workload(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        let input = child.stdin.take().unwrap();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        let base = u64::from_str_radix(line.trim().strip_prefix("ready 0x").unwrap(), 16).unwrap();
        Self {
            child,
            input,
            output,
            pid,
            base,
        }
    }

    fn range(&self) -> Range<u64> {
        self.base..self.base + PAGES * PAGE
    }

    fn page(&self, i: u64) -> Range<u64> {
        self.base + i * PAGE..self.base + (i + 1) * PAGE
    }

    /// Has the writer write `pages` (each with a new value) and waits until
    /// it did.
    fn write(&mut self, pages: &[u64]) {
        let list: Vec<String> = pages.iter().map(u64::to_string).collect();
        writeln!(self.input, "w {}", list.join(" ")).unwrap();
        self.input.flush().unwrap();
        let mut ok = String::new();
        self.output.read_line(&mut ok).unwrap();
        assert_eq!(ok.trim(), "ok");
    }

    fn finish(mut self) {
        writeln!(self.input, "q").unwrap();
        drop(self.input);
        assert!(self.child.wait().unwrap().success());
    }
}

/// The page ranges of `pages`, sorted, deduplicated and merged as a scan
/// returns them.
fn expected(w: &Writer, pages: &[u64]) -> Vec<Range<u64>> {
    let mut sorted = pages.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<Range<u64>> = Vec::new();
    for p in sorted {
        let r = w.page(p);
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn attached_tracker_sees_exactly_the_pages_another_process_writes() {
    if !cr_ebpf_perf::privileged("attached_tracker_sees_exactly_the_pages_another_process_writes") {
        return;
    }
    let mut w = Writer::spawn();
    let range = w.range();
    let fds_before: Vec<String> = fd_links(w.pid);

    let tracker = cr_ebpf_dirty_tracker::attach::attach(w.pid).expect("attach");
    assert_eq!(
        fd_links(w.pid),
        fds_before,
        "no descriptor left in the target"
    );
    tracker.register(range.clone()).expect("register");
    let write = |w: &mut Writer, pages: &[u64]| -> Vec<Range<u64>> {
        w.write(pages);
        let mut found = Vec::new();
        tracker.scan(range.clone(), &mut found).expect("scan");
        found
    };
    assert_eq!(
        write(&mut w, &[]),
        vec![],
        "nothing written since registration"
    );
    assert_eq!(
        write(&mut w, &[3, 7, 40]),
        vec![w.page(3), w.page(7), w.page(40)]
    );
    assert_eq!(write(&mut w, &[]), vec![], "the scan re-protected them");
    assert_eq!(
        write(&mut w, &[7, 8]),
        vec![w.page(7).start..w.page(8).end],
        "adjacent pages merge"
    );
    w.finish();
}

/// uffd-wp (attached), soft-dirty (where the kernel has it) and hashing
/// track the same range of the same process through the common
/// [`Tracker`] interface; a scripted sequence of writes must come back
/// identically from each, equal to the pages written.
#[test]
fn every_backend_reports_exactly_the_written_pages() {
    if !cr_ebpf_perf::privileged("every_backend_reports_exactly_the_written_pages") {
        return;
    }
    let mut w = Writer::spawn();
    let range = w.range();
    let mut backends = vec![Backend::UffdWp];
    match soft_dirty::probe() {
        Ok(_) => backends.push(Backend::SoftDirty),
        Err(e) => eprintln!("soft-dirty not compared, unavailable here: {e}"),
    }
    backends.push(Backend::Hashing);
    let mut trackers: Vec<Tracker> = backends
        .iter()
        .map(|&b| {
            let mut t = cr_ebpf_dirty_tracker::for_process(w.pid, b)
                .unwrap_or_else(|e| panic!("{b} tracker for pid {}: {e:?}", w.pid));
            assert_eq!(t.backend(), b);
            t.register(range.clone())
                .unwrap_or_else(|e| panic!("{b} register: {e:?}"));
            t
        })
        .collect();

    let rounds: Vec<Vec<u64>> = vec![
        vec![],
        vec![3, 7, 40],
        vec![],
        vec![7, 8],                      // adjacent pages, one re-written
        vec![7],                         // the same page again, new value
        vec![7, 7, 7],                   // several writes to it in one round
        vec![0, 63],                     // first and last page of the range
        vec![10, 11, 12, 13, 20],        // a run and a single page
        vec![6, 4, 5],                   // out of order, merged
        vec![],                          // empty round
        (0..PAGES).collect(),            // everything
        (0..PAGES).step_by(2).collect(), // every other page
        vec![],
    ];
    for (n, pages) in rounds.iter().enumerate() {
        w.write(pages);
        let want = expected(&w, pages);
        let found: Vec<(Backend, Vec<Range<u64>>)> = trackers
            .iter_mut()
            .map(|t| {
                let mut v = Vec::new();
                t.scan(range.clone(), &mut v)
                    .unwrap_or_else(|e| panic!("{} scan in round {n}: {e:?}", t.backend()));
                (t.backend(), v)
            })
            .collect();
        for (b, v) in &found {
            assert_eq!(
                v, &want,
                "round {n} wrote pages {pages:?}: {b} disagrees (all backends: {found:x?})"
            );
        }
    }
    for t in &mut trackers {
        t.unregister(range.clone()).expect("unregister");
    }
    w.finish();
}

fn fd_links(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            format!(
                "{} {}",
                e.file_name().to_string_lossy(),
                std::fs::read_link(e.path()).unwrap().display()
            )
        })
        .collect();
    v.sort();
    v
}
