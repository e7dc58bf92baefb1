//! Finding tracefs and reading tracepoint layouts from it.
//!
//! The `sched_*` tracepoint records changed layout across kernel versions
//! (`comm` became a `__data_loc` string; `sched_process_exit` gained
//! `group_dead`), so their field offsets are read here at run time and handed
//! to the programs in the `CONFIG` map instead of being compiled in.

use std::path::{Path, PathBuf};

use crate::LoaderError;

/// The mount point of tracefs, if it is mounted.
pub fn find() -> Option<PathBuf> {
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        for line in mounts.lines() {
            let mut it = line.split_whitespace();
            let (_, Some(dir), Some(fstype)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if fstype == "tracefs" {
                return Some(PathBuf::from(dir));
            }
        }
    }
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The C declaration, e.g. `pid_t child_pid` or `__data_loc char[] filename`.
    pub decl: String,
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// Layout of one tracepoint, parsed from its `format` file.
#[derive(Debug, Clone, Default)]
pub struct Format {
    /// Fields, in order.
    pub fields: Vec<Field>,
}

impl Format {
    /// Reads `events/<category>/<name>/format` below `tracefs`.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, LoaderError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(LoaderError::TracepointMissing {
                    category: category.into(),
                    name: name.into(),
                    path: path.display().to_string(),
                })
            }
            Err(source) => Err(LoaderError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Parses the text of a `format` file.
    pub fn parse(text: &str) -> Self {
        let mut fields = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for (i, part) in rest.split(';').enumerate() {
                let part = part.trim();
                if i == 0 {
                    decl = Some(part.to_string());
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.trim().parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.trim().parse().ok();
                }
            }
            if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) {
                fields.push(Field { decl, offset, size });
            }
        }
        Self { fields }
    }

    /// The field whose declared name is `name`.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| {
            let ident = f.decl.rsplit(' ').next().unwrap_or("");
            let ident = ident.split('[').next().unwrap_or(ident);
            ident == name
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_18: &str = "name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;
";

    const FORK_6_1: &str = "format:
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn parses_both_fork_layouts() {
        let new = Format::parse(FORK_6_18);
        assert_eq!(new.field("child_pid").map(|f| f.offset), Some(20));
        assert_eq!(new.field("child_comm").map(|f| f.size), Some(4));
        let old = Format::parse(FORK_6_1);
        assert_eq!(old.field("child_pid").map(|f| f.offset), Some(44));
        assert_eq!(old.field("child_comm").map(|f| f.offset), Some(28));
        assert!(old.field("group_dead").is_none());
    }
}
