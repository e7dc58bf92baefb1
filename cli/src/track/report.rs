//! How `track` reports a checkpoint: one JSON object, or one line of text.

use cr_ebpf_checkpoint::CheckpointReport;

pub(super) fn report_json(r: &CheckpointReport) -> serde_json::Value {
    serde_json::json!({
        "ok": true,
        "id": r.name, "seq": r.seq, "parent": r.parent, "method": r.method.name(),
        "processes": r.processes, "new_processes": r.new_processes, "zombies": r.zombies,
        "pages": r.pages, "precopied_pages": r.precopied, "bytes": r.page_bytes,
        "size_bytes": cr_ebpf_image::images_dir::size_on_disk(&r.dir),
        "freeze_ms": r.freeze.as_secs_f64() * 1e3, "total_ms": r.total.as_secs_f64() * 1e3,
        "inherited_mappings": r.inherited, "whole_mappings": r.whole,
        "injected_queries": r.queries.injected, "reused_queries": r.queries.reused,
        "phases_ms": {
            "stop": r.phases.stop.as_secs_f64() * 1e3, "collect": r.phases.collect.as_secs_f64() * 1e3,
            "scan": r.phases.scan.as_secs_f64() * 1e3, "copy": r.phases.copy.as_secs_f64() * 1e3,
            "resume": r.phases.resume.as_secs_f64() * 1e3,
        },
    })
}

pub(super) fn report_text(r: &CheckpointReport) -> String {
    format!(
        "{} ({}{}){}: {} pages, {:.1} KiB, freeze {:.2} ms, total {:.1} ms{}",
        r.name,
        r.method.name(),
        r.parent
            .as_deref()
            .map(|p| format!(" on {p}"))
            .unwrap_or_default(),
        if r.processes + r.zombies > 1 {
            format!(
                ", {} process{}{}{}",
                r.processes,
                if r.processes == 1 { "" } else { "es" },
                if r.new_processes > 0 {
                    format!(" ({} new)", r.new_processes)
                } else {
                    String::new()
                },
                if r.zombies > 0 {
                    format!(", {} zombie(s)", r.zombies)
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        },
        r.pages,
        cr_ebpf_image::images_dir::size_on_disk(&r.dir) as f64 / 1024.0,
        r.freeze.as_secs_f64() * 1e3,
        r.total.as_secs_f64() * 1e3,
        if r.precopied > 0 {
            format!(", {} pages pre-copied", r.precopied)
        } else {
            String::new()
        }
    )
}
