//! SVG charts of a bench run: small, dependency-free line and bar charts
//! drawn from the benches' JSON files, written next to them.
//!
//! Charts show absolute numbers from one machine and one run (the summary's
//! ratios are what regressions are judged by); each names its source file.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::Value;

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f",
];

/// One line of a [`LineChart`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart of lines with markers; either axis may be logarithmic.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// An axis mapping values to pixels.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool, from: f64, to: f64) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil().max(lo.log10() + 1.0));
        } else {
            lo = lo.min(0.0);
            hi = if hi > lo { hi * 1.08 } else { lo + 1.0 };
        }
        Self {
            lo,
            hi,
            log,
            from,
            to,
        }
    }

    fn pos(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        self.from + f * (self.to - self.from)
    }

    /// Tick values: decades on a log axis, about five round steps otherwise.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.log10() as i32, self.hi.log10() as i32);
            return (a..=b).map(|e| 10f64.powi(e)).collect();
        }
        let raw = (self.hi - self.lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(raw);
        let mut v = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        while v <= self.hi + step * 1e-9 {
            out.push(v);
            v += step;
        }
        out
    }
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 && v % 1000.0 == 0.0 {
        format!("{}k", v / 1000.0)
    } else if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn frame(svg: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        (LEFT + W - RIGHT) / 2.0,
        escape(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        escape(y_label),
    );
}

fn axes(svg: &mut String, x: &Axis, y: &Axis, x_ticks: &[(f64, String)]) {
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    for t in y.ticks() {
        let py = y.pos(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            label(t)
        );
    }
    for (t, name) in x_ticks {
        let px = x.pos(*t);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{y0}" x2="{px:.1}" y2="{}" stroke="#333"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 5.0,
            y0 + 18.0,
            escape(name)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>"##
    );
}

fn legend(svg: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 18.0;
        let x = W - RIGHT + 14.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 10.0,
            COLOURS[i % COLOURS.len()],
            x + 18.0,
            y,
            escape(name)
        );
    }
}

impl LineChart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1));
        let x = Axis::new(xs.clone(), self.log_x, LEFT + 20.0, W - RIGHT - 20.0);
        let y = Axis::new(ys, self.log_y, H - BOTTOM, TOP);
        let mut x_values: Vec<f64> = xs.filter(|v| v.is_finite()).collect();
        x_values.sort_by(f64::total_cmp);
        x_values.dedup();
        // Every distinct x as a tick when there are few and they do not
        // crowd each other, else the axis' own.
        let crowded = self.log_x && x.hi / x.lo > 1000.0;
        let ticks: Vec<f64> = if x_values.len() <= 8 && !crowded {
            x_values
        } else {
            x.ticks()
        };
        let x_ticks: Vec<(f64, String)> = ticks.into_iter().map(|t| (t, label(t))).collect();
        let mut svg = String::new();
        frame(&mut svg, &self.title, &self.x_label, &self.y_label);
        axes(&mut svg, &x, &y, &x_ticks);
        for (i, s) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(px, py)| format!("{:.1},{:.1}", x.pos(px), y.pos(py)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                pts.join(" ")
            );
            if pts.len() <= 30 {
                for p in &pts {
                    let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(
                        svg,
                        r#"<circle cx="{cx}" cy="{cy}" r="3.5" fill="{colour}"/>"#
                    );
                }
            }
        }
        let names: Vec<String> = self.series.iter().map(|s| s.name.clone()).collect();
        legend(&mut svg, &names);
        svg.push_str("</svg>\n");
        svg
    }
}

/// Groups of bars (one bar per series in each group), with optional
/// horizontal reference lines (e.g. the machine's memcpy rate).
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub series: Vec<String>,
    /// (group label, one value per series; NaN for none).
    pub groups: Vec<(String, Vec<f64>)>,
    pub references: Vec<(String, f64)>,
}

impl BarChart {
    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let values = self
            .groups
            .iter()
            .flat_map(|g| g.1.iter().copied())
            .chain(self.references.iter().map(|r| r.1));
        let y = Axis::new(values, false, H - BOTTOM, TOP);
        let n = self.groups.len().max(1) as f64;
        let slot = (W - RIGHT - LEFT) / n;
        let x = Axis {
            lo: 0.0,
            hi: n,
            log: false,
            from: LEFT,
            to: W - RIGHT,
        };
        let x_ticks: Vec<(f64, String)> = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (i as f64 + 0.5, g.0.clone()))
            .collect();
        let mut svg = String::new();
        frame(&mut svg, &self.title, "", &self.y_label);
        axes(&mut svg, &x, &y, &x_ticks);
        let k = self.series.len().max(1) as f64;
        let bar = slot * 0.8 / k;
        for (gi, (_, vals)) in self.groups.iter().enumerate() {
            for (si, v) in vals.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let px = LEFT + gi as f64 * slot + slot * 0.1 + si as f64 * bar;
                let py = y.pos(*v);
                let _ = writeln!(
                    svg,
                    r#"<rect x="{px:.1}" y="{py:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{:.3}</title></rect>"#,
                    bar * 0.92,
                    (H - BOTTOM - py).max(0.0),
                    COLOURS[si % COLOURS.len()],
                    v
                );
            }
        }
        for (name, v) in &self.references {
            let py = y.pos(*v);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#000" stroke-dasharray="5,4"/><text x="{}" y="{:.1}">{} {:.2}</text>"##,
                W - RIGHT,
                LEFT + 6.0,
                py - 4.0,
                escape(name),
                v
            );
        }
        legend(&mut svg, &self.series);
        svg.push_str("</svg>\n");
        svg
    }
}

fn read(dir: &Path, file: &str) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(file)).ok()?).ok()
}

/// The incremental runs of the memory load in `dir`: (RSS MiB, rate ‰, json).
fn incremental_runs(dir: &Path) -> Vec<(f64, f64, Value)> {
    let mut out: Vec<(f64, f64, Value)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    (n.starts_with("incremental-") && n.ends_with(".json"))
                        .then(|| read(dir, &n))
                        .flatten()
                })
                .filter(|v| v["load"].as_str().unwrap_or("memory") == "memory")
                .filter_map(|v| {
                    Some((
                        v["mib"].as_f64()?,
                        v["write_rate_permille_per_s"].as_f64()?,
                        v,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    out
}

fn pause_series(runs: &[(f64, Value)]) -> Vec<Series> {
    let pick = |name: &str, f: &dyn Fn(&Value) -> Option<f64>| Series {
        name: name.into(),
        points: runs.iter().filter_map(|(x, v)| Some((*x, f(v)?))).collect(),
    };
    vec![
        pick("freeze p50", &|v| v["freeze_ms"]["p50"].as_f64()),
        pick("freeze p99", &|v| v["freeze_ms"]["p99"].as_f64()),
        pick("freeze max", &|v| v["freeze_ms"]["max"].as_f64()),
        pick("stall p99, tracked", &|v| {
            v["stall_ms"]["tracked"]["p99"].as_f64()
        }),
        pick("stall p99, untracked", &|v| {
            v["stall_ms"]["untracked"]["p99"].as_f64()
        }),
    ]
}

/// The incremental freeze against threads, mappings, descriptors and processes.
fn scaling_chart(dir: &Path) -> Option<(&'static str, String)> {
    let sc = read(dir, "scaling.json")?;
    let mut series = Vec::new();
    for (dim, name) in [
        ("threads", "threads"),
        ("mappings", "mappings"),
        ("fds", "descriptors"),
        ("processes", "processes"),
    ] {
        let mut points: Vec<(f64, f64)> = sc["median"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(key, m)| {
                // "threads: 8 threads, 10 mappings, 10 fds"
                let (kind, rest) = key.split_once(": ")?;
                // One process unless the key says otherwise.
                let n = match rest.split(", ").find(|p| p.ends_with(&format!(" {dim}"))) {
                    Some(p) => p.split(' ').next()?.parse::<f64>().ok()?,
                    None if dim == "processes" => 1.0,
                    None => return None,
                };
                (kind == dim || kind == "base")
                    .then(|| Some((n, m["incremental_freeze_ms"].as_f64()?)))
                    .flatten()
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push(Series {
            name: name.into(),
            points,
        });
    }
    Some((
        "scaling.svg",
        LineChart {
            title: "Incremental freeze vs threads, mappings, descriptors, processes".into(),
            x_label: "count (the others at their smallest)".into(),
            y_label: "freeze, ms".into(),
            log_x: true,
            log_y: true,
            series,
        }
        .svg(),
    ))
}

/// Full dump and restore rates with the machine's copy limits.
fn dump_restore_chart(dir: &Path) -> Option<(&'static str, String)> {
    let d = read(dir, "dump-restore.json")?;
    let mut groups = Vec::new();
    for (key, m) in d["median"].as_object().into_iter().flatten() {
        groups.push((
            key.replace("-compressible", " comp.").replace('/', " "),
            vec![
                m["dump_gb_s"].as_f64().unwrap_or(f64::NAN),
                m["restore_gb_s"].as_f64().unwrap_or(f64::NAN),
            ],
        ));
    }
    let mut references = Vec::new();
    for (name, key) in [
        ("memcpy", "memcpy_gb_s"),
        ("pvr", "process_vm_readv_gb_s"),
        ("disk", "disk_write_fsync_gb_s"),
    ] {
        if let Some(v) = d[key].as_f64() {
            references.push((name.to_string(), v));
        }
    }
    Some((
        "dump-restore.svg",
        BarChart {
            title: "Full dump and restore (size, data, workers)".into(),
            y_label: "GB/s".into(),
            series: vec!["dump".into(), "restore".into()],
            groups,
            references,
        }
        .svg(),
    ))
}

/// Draws every chart the results in `dir` allow; returns the files written.
pub fn write_all(dir: &Path) -> Result<Vec<String>> {
    let mut charts: Vec<(&str, String)> = Vec::new();
    let runs = incremental_runs(dir);
    // Pause against RSS at 1%/s, and against the write rate at 1 GiB.
    let by_rss: Vec<(f64, Value)> = runs
        .iter()
        .filter(|r| r.1 == 10.0)
        .map(|r| (r.0, r.2.clone()))
        .collect();
    if by_rss.len() >= 2 {
        charts.push((
            "pause-vs-rss.svg",
            LineChart {
                title: "Incremental checkpoint pause vs RSS (1% of pages/s)".into(),
                x_label: "resident memory, MiB".into(),
                y_label: "ms".into(),
                log_x: true,
                log_y: true,
                series: pause_series(&by_rss),
            }
            .svg(),
        ));
    }
    let gib = runs.iter().map(|r| r.0).filter(|m| *m == 1024.0).count();
    if gib >= 2 {
        let by_rate: Vec<(f64, Value)> = runs
            .iter()
            .filter(|r| r.0 == 1024.0)
            .map(|r| (r.1 / 10.0, r.2.clone()))
            .collect();
        charts.push((
            "pause-vs-rate.svg",
            LineChart {
                title: "Incremental checkpoint pause vs write rate (1 GiB)".into(),
                x_label: "pages written per second, % of RSS".into(),
                y_label: "ms".into(),
                log_x: true,
                log_y: true,
                series: pause_series(&by_rate),
            }
            .svg(),
        ));
    }
    // Every checkpoint of the longest run, in order.
    if let Some((mib, rate, v)) = runs
        .iter()
        .max_by_key(|r| r.2["freeze_ms"]["all"].as_array().map_or(0, Vec::len))
    {
        let points: Vec<(f64, f64)> = v["freeze_ms"]["all"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, f)| Some(((i + 1) as f64, f.as_f64()?)))
            .collect();
        if points.len() >= 2 {
            charts.push((
                "freeze-per-checkpoint.svg",
                LineChart {
                    title: format!(
                        "Freeze of each incremental checkpoint ({mib} MiB, {}%/s)",
                        rate / 10.0
                    ),
                    x_label: "checkpoint (after the base)".into(),
                    y_label: "freeze, ms".into(),
                    log_x: false,
                    log_y: false,
                    series: vec![Series {
                        name: "freeze".into(),
                        points,
                    }],
                }
                .svg(),
            ));
        }
    }
    charts.extend(scaling_chart(dir));
    charts.extend(dump_restore_chart(dir));
    let mut written = Vec::new();
    for (name, svg) in charts {
        let p = dir.join(name);
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        written.push(name.to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_chart_places_points_inside_the_plot_area() {
        let svg = LineChart {
            title: "t <&>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: true,
            log_y: false,
            series: vec![Series {
                name: "s".into(),
                points: vec![(10.0, 1.0), (100.0, 3.0), (1000.0, 2.0)],
            }],
        }
        .svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        let circles: Vec<(f64, f64)> = svg
            .lines()
            .filter_map(|l| {
                let cx = l.split("cx=\"").nth(1)?.split('"').next()?.parse().ok()?;
                let cy = l.split("cy=\"").nth(1)?.split('"').next()?.parse().ok()?;
                Some((cx, cy))
            })
            .collect();
        assert_eq!(circles.len(), 3);
        for (cx, cy) in &circles {
            assert!((LEFT..=W - RIGHT).contains(cx), "{cx}");
            assert!((TOP..=H - BOTTOM).contains(cy), "{cy}");
        }
        // Log x: equal ratios are equal distances; higher values are higher up.
        let d1 = circles[1].0 - circles[0].0;
        let d2 = circles[2].0 - circles[1].0;
        assert!((d1 - d2).abs() < 0.2, "{d1} {d2}");
        assert!(circles[1].1 < circles[2].1 && circles[2].1 < circles[0].1);
    }

    #[test]
    fn bars_scale_with_their_values() {
        let svg = BarChart {
            title: "b".into(),
            y_label: "GB/s".into(),
            series: vec!["a".into(), "b".into()],
            groups: vec![("g".into(), vec![1.0, 2.0])],
            references: vec![("memcpy".into(), 4.0)],
        }
        .svg();
        let heights: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<rect x") && l.contains("<title>"))
            .filter_map(|l| l.split("height=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        assert_eq!(heights.len(), 2);
        assert!((heights[1] / heights[0] - 2.0).abs() < 0.01, "{heights:?}");
        assert!(svg.contains("memcpy 4.00"));
    }
}
