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

/// `--keep-for` of `track` and `run`: an age, `None` for `forever`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepFor(pub Option<std::time::Duration>);

/// Parses `--keep-for`: a duration (as [`parse_duration`], above zero), or
/// `forever`.
pub fn keep_for_or_forever(s: &str) -> Result<KeepFor, String> {
    if s == "forever" {
        return Ok(KeepFor(None));
    }
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!(
            "{s:?}: the newest is always kept (forever, or an age above 0)"
        )),
        d => Ok(KeepFor(Some(d))),
    }
}

/// `N`, `NK`, `NM` or `NG` bytes.
pub fn size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (like 1048576, 512K, 64M, 1G)"))
}

/// Parses `500ms`, `1s`, `2.5s`, `1m`, `2h`, `7d`, or a bare number of
/// seconds (at most 30 days).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 500ms, 1s, 2.5s, 1m)"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        "d" => v * 86400.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m, h, d)")),
    };
    if !(0.0..=30.0 * 86400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
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
        assert_eq!(keep_for_or_forever("forever"), Ok(KeepFor(None)));
        assert_eq!(
            keep_for_or_forever("7d"),
            Ok(KeepFor(Some(std::time::Duration::from_secs(7 * 86400))))
        );
        assert!(keep_for_or_forever("0").is_err());
        assert!(keep_for_or_forever("31d").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(std::time::Duration::from_secs(1)));
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("2.5"),
            Ok(std::time::Duration::from_millis(2500))
        );
        assert_eq!(parse_duration("1m"), Ok(std::time::Duration::from_secs(60)));
        assert_eq!(
            parse_duration("1h"),
            Ok(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            parse_duration("7d"),
            Ok(std::time::Duration::from_secs(7 * 86400))
        );
        assert!(parse_duration("31d").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
