//! The shape the code keeps (docs/ARCHITECTURE.md, "Resources"): no library
//! file over 700 lines, no function over 150 lines outside tests, and no
//! two modules of a crate (siblings in one folder) that import each other,
//! directly or through others.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const CRATES: &[&str] = &[
    "checkpoint",
    "cli",
    "common",
    "dirty-tracker",
    "ebpf",
    "image",
    "loader",
    "perf",
    "resources",
    "restore",
    "tracee",
    "xtask",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text of a file up to its unit tests.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).expect("readable");
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn is_fn_start(line: &str) -> Option<usize> {
    let t = line.trim_start();
    let indent = line.len() - t.len();
    let mut rest = t;
    for word in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(word).unwrap_or(rest);
    }
    rest.starts_with("fn ").then_some(indent)
}

#[test]
fn files_and_functions_stay_small() {
    let mut long = Vec::new();
    for c in CRATES {
        let mut files = Vec::new();
        rust_files(&root().join(c).join("src"), &mut files);
        for p in files {
            // The perf workloads' mains are test programs, not library code.
            let workload = p.components().any(|x| x.as_os_str() == "bin") && c == &"perf";
            let text = code(&p);
            let lines: Vec<&str> = text.lines().collect();
            if !workload && lines.len() > 700 {
                long.push(format!("{}: {} lines", p.display(), lines.len()));
            }
            let mut i = 0;
            while i < lines.len() {
                if let Some(indent) = is_fn_start(lines[i]) {
                    let end = format!("{}}}", " ".repeat(indent));
                    let j = (i + 1..lines.len())
                        .find(|&j| lines[j].trim_end() == end)
                        .unwrap_or(lines.len());
                    if !workload && j - i > 150 {
                        long.push(format!(
                            "{}:{}: a function of {} lines",
                            p.display(),
                            i + 1,
                            j - i
                        ));
                    }
                    i = j;
                }
                i += 1;
            }
        }
    }
    assert!(long.is_empty(), "too long:\n{}", long.join("\n"));
}

/// The modules of folder `dir`: name -> its files.
fn modules(dir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() && p.join("mod.rs").exists() {
            let mut files = Vec::new();
            rust_files(&p, &mut files);
            out.insert(name, files);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if !["lib", "main", "mod"].contains(&stem) {
                out.insert(stem.to_string(), vec![p]);
            }
        }
    }
    out
}

/// Identifiers named right after `root::` or inside a `use root::{...};`.
fn named_after(text: &str, root: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let key = format!("{root}::");
    let mut rest = text;
    while let Some(i) = rest.find(&key) {
        let after = &rest[i + key.len()..];
        let end = if after.starts_with('{') {
            after.find(';').unwrap_or(after.len())
        } else {
            after
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(after.len())
        };
        out.extend(ident(&after[..end]));
        rest = &after[end.min(after.len())..];
    }
    out
}

fn cycles_in(dir: &Path, root: &str, found: &mut Vec<String>) {
    let mods = modules(dir);
    let mut uses: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (m, files) in &mods {
        for p in files {
            // Files deeper in a module folder name their siblings differently;
            // only its top file speaks for the module here.
            let depth = p.strip_prefix(dir).map_or(0, |r| r.components().count());
            let top = depth == 1 || (depth == 2 && p.ends_with("mod.rs"));
            let names = named_after(&code(p), if top { root } else { "crate" });
            for o in mods.keys().filter(|o| *o != m && names.contains(*o)) {
                uses.entry(m).or_default().insert(o);
            }
        }
    }
    for start in mods.keys() {
        let mut stack = vec![(start.as_str(), vec![start.as_str()])];
        let mut seen = BTreeSet::new();
        while let Some((n, path)) = stack.pop() {
            for &next in uses.get(n).into_iter().flatten() {
                if next == start {
                    found.push(format!(
                        "{}: {} -> {start}",
                        dir.display(),
                        path.join(" -> ")
                    ));
                } else if seen.insert(next) {
                    let mut p = path.clone();
                    p.push(next);
                    stack.push((next, p));
                }
            }
        }
    }
    for m in mods.keys() {
        let sub = dir.join(m);
        if sub.is_dir() {
            cycles_in(&sub, "super", found);
        }
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let mut found = Vec::new();
    for c in CRATES {
        cycles_in(&root().join(c).join("src"), "crate", &mut found);
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn the_checks_see_a_circle_and_a_long_function() {
    let dir = std::env::temp_dir().join(format!("cr-ebpf-shape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::B;\n").unwrap();
    std::fs::write(dir.join("b.rs"), "use crate::{a::A, c};\n").unwrap();
    std::fs::write(dir.join("c.rs"), "fn f() {}\n").unwrap();
    let mut found = Vec::new();
    cycles_in(&dir, "crate", &mut found);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(is_fn_start("    pub(crate) unsafe fn x() {"), Some(4));
    assert_eq!(is_fn_start("    let f = 1;"), None);
    std::fs::remove_dir_all(&dir).unwrap();
}
