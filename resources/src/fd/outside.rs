//! Which pipes and FIFOs processes outside a checkpoint hold: every
//! `/proc/PID/fd` of the machine but the checkpointed processes' (and
//! ours), read once per checkpoint and only when a pipe end or FIFO of the
//! checkpoint needs it. A pipe whose other end nobody holds can be restored
//! with that end closed; one an outside process holds cannot.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

/// The pipes (by link, `pipe:[N]`) and FIFOs (by device and inode) held by
/// processes outside the checkpoint, with one such process each.
#[derive(Debug, Default)]
pub struct Outside {
    pipes: HashMap<String, i32>,
    fifos: HashMap<(u64, u64), i32>,
    /// A process whose descriptors could not be read (not for being gone).
    unreadable: Option<i32>,
}

impl Outside {
    /// Reads the descriptors of every process but `inside` and ourselves;
    /// FIFOs are found (a `stat` of each path) only if `fifos`.
    pub fn scan(inside: &[i32], fifos: bool) -> Self {
        let me = std::process::id() as i32;
        let mut out = Self::default();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return out;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me || inside.contains(&pid) {
                continue;
            }
            let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
                Ok(fds) => fds,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    out.unreadable.get_or_insert(pid);
                    continue;
                }
                Err(_) => continue, // gone
            };
            for e in fds.flatten() {
                let Ok(link) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let link = link.display().to_string();
                if link.starts_with("pipe:") {
                    out.pipes.entry(link).or_insert(pid);
                } else if fifos && link.starts_with('/') {
                    if let Ok(m) = std::fs::metadata(e.path()) {
                        if m.mode() & libc::S_IFMT == libc::S_IFIFO {
                            out.fifos.entry((m.dev(), m.ino())).or_insert(pid);
                        }
                    }
                }
            }
        }
        out
    }

    /// Why the pipe `link` may be held outside: a process that holds it,
    /// or one whose descriptors could not be read.
    pub fn pipe(&self, link: &str) -> Option<String> {
        self.pipes
            .get(link)
            .map(|p| format!("held by process {p}"))
            .or_else(|| self.unknown())
    }

    /// Why the FIFO `(dev, ino)` may be held outside.
    pub fn fifo(&self, dev: u64, ino: u64) -> Option<String> {
        self.fifos
            .get(&(dev, ino))
            .map(|p| format!("held by process {p}"))
            .or_else(|| self.unknown())
    }

    fn unknown(&self) -> Option<String> {
        self.unreadable
            .map(|p| format!("perhaps held by process {p}, whose descriptors cannot be read"))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;
    use crate::fd::testing;

    #[test]
    fn a_pipe_held_by_another_process_is_found_and_ours_are_not() {
        let (r, _w) = testing::pipe();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", r.as_raw_fd()))
            .unwrap()
            .display()
            .to_string();
        assert_eq!(Outside::scan(&[], false).pipe(&link), None, "ours");
        // A child holding a duplicate of the read end.
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(r.try_clone().unwrap()))
            .spawn()
            .unwrap();
        let found = Outside::scan(&[], false).pipe(&link);
        let inside = Outside::scan(&[child.id() as i32], false).pipe(&link);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, Some(format!("held by process {}", child.id())));
        assert_eq!(inside, None, "a process inside does not count");
    }
}
