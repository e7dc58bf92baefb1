//! `track --metrics ADDR`: the service's counters in Prometheus' text
//! format, served over plain HTTP (`GET /metrics`, any path answers).

use std::fmt::Write as _;

use cr_ebpf_checkpoint::CheckpointReport;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Upper bounds of the freeze histogram's buckets, in seconds.
const FREEZE_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What the service counted since it started.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    checkpoints: u64,
    failures: u64,
    pages: u64,
    bytes: u64,
    /// Freezes at or under each bound of [`FREEZE_BUCKETS`].
    freeze_le: [u64; FREEZE_BUCKETS.len()],
    freeze_sum: f64,
}

impl Metrics {
    /// Counts checkpoint `r`.
    pub(super) fn taken(&mut self, r: &CheckpointReport) {
        self.count(r.pages, r.page_bytes, r.freeze);
    }

    fn count(&mut self, pages: u64, bytes: u64, freeze: std::time::Duration) {
        self.checkpoints += 1;
        self.pages += pages;
        self.bytes += bytes;
        let s = freeze.as_secs_f64();
        self.freeze_sum += s;
        for (n, le) in self.freeze_le.iter_mut().zip(FREEZE_BUCKETS) {
            *n += u64::from(s <= le);
        }
    }

    /// Counts a checkpoint that failed (the process left running).
    pub(super) fn failed(&mut self) {
        self.failures += 1;
    }

    /// The exposition: these counters, the processes tracked now and the
    /// fault records the ring buffer lost.
    pub(super) fn render(&self, processes: usize, lost_faults: u64) -> String {
        let mut o = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            "cr_ebpf_checkpoints_total",
            "counter",
            "Checkpoints taken.",
            self.checkpoints.to_string(),
        );
        one(
            "cr_ebpf_checkpoint_failures_total",
            "counter",
            "Checkpoints that failed or were refused (the process left running).",
            self.failures.to_string(),
        );
        one(
            "cr_ebpf_pages_total",
            "counter",
            "Pages stored by the checkpoints.",
            self.pages.to_string(),
        );
        one(
            "cr_ebpf_bytes_total",
            "counter",
            "Bytes of page stores written (on disk).",
            self.bytes.to_string(),
        );
        one(
            "cr_ebpf_tracked_processes",
            "gauge",
            "Processes of the tracked tree.",
            processes.to_string(),
        );
        one(
            "cr_ebpf_lost_fault_records_total",
            "counter",
            "Write-fault records the ring buffer could not hold (pages then found by the dirty tracker).",
            lost_faults.to_string(),
        );
        let name = "cr_ebpf_freeze_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} How long each checkpoint held the processes frozen.\n# TYPE {name} histogram"
        );
        for (n, le) in self.freeze_le.iter().zip(FREEZE_BUCKETS) {
            let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", self.checkpoints);
        let _ = writeln!(o, "{name}_sum {}", self.freeze_sum);
        let _ = writeln!(o, "{name}_count {}", self.checkpoints);
        o
    }
}

/// Answers one HTTP request on `stream` with `body` (the request itself is
/// read up to its blank line and otherwise ignored).
pub(super) async fn answer(mut stream: tokio::net::TcpStream, body: String) {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 << 10 {
        match tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => req.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_checkpoints_and_freezes() {
        let mut m = Metrics::default();
        m.count(10, 100, std::time::Duration::from_millis(1));
        m.count(10, 100, std::time::Duration::from_millis(30));
        m.failed();
        let t = m.render(3, 7);
        assert!(t.contains("cr_ebpf_checkpoints_total 2\n"), "{t}");
        assert!(t.contains("cr_ebpf_checkpoint_failures_total 1\n"));
        assert!(t.contains("cr_ebpf_pages_total 20\n"));
        assert!(t.contains("cr_ebpf_tracked_processes 3\n"));
        assert!(t.contains("cr_ebpf_lost_fault_records_total 7\n"));
        assert!(
            t.contains("cr_ebpf_freeze_seconds_bucket{le=\"0.001\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("cr_ebpf_freeze_seconds_bucket{le=\"0.02\"} 1\n"));
        assert!(t.contains("cr_ebpf_freeze_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(t.contains("cr_ebpf_freeze_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("cr_ebpf_freeze_seconds_count 2\n"));
    }
}
