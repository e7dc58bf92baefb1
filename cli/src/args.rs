//! Checks of option values shared by several commands.

/// Most worker threads a command takes.
pub const THREADS_CAP: usize = 1024;

/// `--threads N`: 0 (all cores) to [`THREADS_CAP`].
pub fn threads(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n > THREADS_CAP {
        return Err(format!(
            "{n} threads: at most {THREADS_CAP} (0 uses every core)"
        ));
    }
    Ok(n)
}

/// `--keep K`: at least 1 (the newest checkpoint is always kept).
pub fn keep(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 {
        return Err("0: at least the newest checkpoint is kept (--keep 1 or more)".into());
    }
    Ok(n)
}

/// `--keep` of `track`: how many checkpoints, `None` for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<usize>);

/// Parses `--keep` of `track`: a count of checkpoints, or `all`.
pub fn keep_or_all(s: &str) -> Result<Keep, String> {
    if s == "all" {
        return Ok(Keep(None));
    }
    keep(s).map(|n| Keep(Some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_and_keep_counts_are_bounded() {
        assert_eq!(threads("0"), Ok(0));
        assert_eq!(threads("1024"), Ok(1024));
        assert!(threads("100000").unwrap_err().contains("at most 1024"));
        assert!(threads("-1").is_err());
        assert_eq!(keep("3"), Ok(3));
        assert!(keep("0").unwrap_err().contains("at least"));
        assert_eq!(keep_or_all("all"), Ok(Keep(None)));
        assert_eq!(keep_or_all("20"), Ok(Keep(Some(20))));
        assert!(keep_or_all("0").is_err());
    }
}
