//! `tree.img`: a process tree checkpointed as a whole (format 1.2).
//!
//! An image of a tree is a directory holding `tree.img` and one image
//! directory per live process, `proc-PID/`, each as for a single process.
//! The payload: `u32` count, then per process, parents before children
//! (the root first): `i32 pid, i32 ppid` (0 for the root: its parent is
//! outside the tree), `i32 pgid, i32 sid`, `u16 state` (1 running, 2
//! zombie), `u16 0`, `i32` wait status of a zombie, `str` directory.

use std::path::Path;

use crate::{
    codec::{Dec, Enc},
    file::{self, FileKind},
    ImageError,
};

/// Name of the tree file.
pub const TREE_FILE: &str = "tree.img";
const PROCESSES_CAP: usize = 1 << 16;

/// One process of a tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeProcess {
    pub pid: i32,
    /// Its parent in the tree; 0 for the root.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// A zombie's wait status (`None`: the process runs and has an image).
    pub zombie: Option<i32>,
    /// Its image directory in the tree's, for a live process.
    pub dir: String,
    /// Format 1.9: it shares its parent's descriptor table (made with
    /// `CLONE_FILES`); the parent's image holds the descriptors.
    pub shares_files: bool,
}

/// Flag bit of a tree record: the process shares its parent's descriptor
/// table.
const SHARES_FILES: u16 = 1;

/// A process tree: the root first, parents before their children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub processes: Vec<TreeProcess>,
}

/// Whether `dir` holds a tree image.
pub fn is_tree(dir: &Path) -> bool {
    dir.join(TREE_FILE).exists()
}

impl Tree {
    fn encode(&self) -> Vec<u8> {
        let mut b = Enc::default();
        b.u32(self.processes.len() as u32);
        for p in &self.processes {
            b.i32(p.pid);
            b.i32(p.ppid);
            b.i32(p.pgid);
            b.i32(p.sid);
            b.u16(if p.zombie.is_some() { 2 } else { 1 });
            b.u16(if p.shares_files { SHARES_FILES } else { 0 });
            b.i32(p.zombie.unwrap_or(0));
            b.str(&p.dir);
        }
        b.buf
    }

    /// Writes `tree.img` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ImageError> {
        file::write_whole(&dir.join(TREE_FILE), FileKind::Tree, &self.encode())
    }

    /// Reads and checks `tree.img` in `dir`.
    pub fn read(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join(TREE_FILE);
        let payload = file::read_whole(&path, FileKind::Tree, file::MANIFEST_CAP)?;
        let corrupt = |offset, what: String| ImageError::Corrupt {
            path: path.display().to_string(),
            offset,
            what,
        };
        let mut d = Dec::new(&payload, file::HEADER_LEN as u64);
        let e = |e: crate::codec::DecErr| corrupt(e.offset, e.what);
        let n = d.u32().map_err(e)? as usize;
        if n == 0 || n > PROCESSES_CAP {
            return Err(corrupt(d.offset(), format!("{n} processes")));
        }
        let mut processes: Vec<TreeProcess> = Vec::with_capacity(n);
        for _ in 0..n {
            let at = d.offset();
            let pid = d.i32().map_err(e)?;
            let ppid = d.i32().map_err(e)?;
            let pgid = d.i32().map_err(e)?;
            let sid = d.i32().map_err(e)?;
            let state = d.u16().map_err(e)?;
            let flags = d.u16().map_err(e)?;
            if flags & !SHARES_FILES != 0 {
                return Err(corrupt(at, format!("unknown process flags {flags:#x}")));
            }
            let shares_files = flags & SHARES_FILES != 0;
            let status = d.i32().map_err(e)?;
            let dir = d.str(255, "process directory").map_err(e)?;
            let zombie = match state {
                1 => None,
                2 => Some(status),
                other => return Err(corrupt(at, format!("unknown process state {other}"))),
            };
            let root = processes.is_empty();
            let parent_known = processes
                .iter()
                .any(|q| q.pid == ppid && q.zombie.is_none());
            if pid <= 0 || (root != (ppid == 0)) || (!root && !parent_known) {
                return Err(corrupt(
                    at,
                    format!("process {pid} with parent {ppid} out of order"),
                ));
            }
            if shares_files && (root || zombie.is_some()) {
                return Err(corrupt(
                    at,
                    format!("process {pid} shares a descriptor table it cannot have"),
                ));
            }
            if processes.iter().any(|q| q.pid == pid) {
                return Err(corrupt(at, format!("process {pid} twice")));
            }
            if zombie.is_none() && (dir.is_empty() || dir.contains('/') || dir.starts_with('.')) {
                return Err(corrupt(at, format!("process directory {dir:?}")));
            }
            processes.push(TreeProcess {
                pid,
                ppid,
                pgid,
                sid,
                zombie,
                dir,
                shares_files,
            });
        }
        if processes[0].zombie.is_some() {
            return Err(corrupt(
                file::HEADER_LEN as u64,
                "the root is a zombie".into(),
            ));
        }
        if !d.done() {
            return Err(corrupt(d.offset(), "unexpected bytes at the end".into()));
        }
        Ok(Self { processes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_round_trips_and_a_disordered_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("cr-ebpf-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |pid, ppid, zombie: Option<i32>| TreeProcess {
            pid,
            ppid,
            pgid: 10,
            sid: 10,
            zombie,
            dir: if zombie.is_some() {
                String::new()
            } else {
                format!("proc-{pid}")
            },
            shares_files: ppid == 10,
        };
        let t = Tree {
            processes: vec![p(10, 0, None), p(11, 10, None), p(12, 11, Some(7 << 8))],
        };
        t.write(&dir).unwrap();
        assert_eq!(Tree::read(&dir).unwrap(), t);
        // A child before its parent.
        let bad = Tree {
            processes: vec![p(10, 0, None), p(12, 11, None), p(11, 10, None)],
        };
        bad.write(&dir).unwrap();
        assert!(Tree::read(&dir)
            .unwrap_err()
            .to_string()
            .contains("out of order"));
        // A zombie sharing a descriptor table.
        let mut bad = t.clone();
        bad.processes[2].shares_files = true;
        bad.write(&dir).unwrap();
        assert!(Tree::read(&dir)
            .unwrap_err()
            .to_string()
            .contains("shares a descriptor table"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
