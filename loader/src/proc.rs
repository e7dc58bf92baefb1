//! What /proc says about processes.

use std::collections::{HashMap, VecDeque};

/// Whether a process (thread group) with this pid exists.
pub fn exists(pid: u32) -> bool {
    pid != 0
        && std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().eq(["Tgid:", &pid.to_string()]))
            })
            .unwrap_or(false)
}

/// Parent pid from the text of `/proc/PID/stat`.
fn ppid_of_stat(stat: &str) -> Option<u32> {
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every process below `root` (children, grandchildren, ...), parents first.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(ppid_of_stat)
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(p) = queue.pop_front() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                queue.push_back(k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppid_past_odd_names() {
        assert_eq!(ppid_of_stat("42 (a) b (c)) S 7 42 42 0"), Some(7));
        assert_eq!(ppid_of_stat("1 (init) S 0 1 1"), Some(0));
        assert_eq!(ppid_of_stat("garbage"), None);
    }

    #[test]
    fn this_process_exists_and_pid_zero_does_not() {
        assert!(exists(std::process::id()));
        assert!(!exists(0));
    }
}
