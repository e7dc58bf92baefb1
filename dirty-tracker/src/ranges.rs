//! Small helpers on page ranges shared by the backends.

use std::ops::Range;

/// Appends `r` to `out`, extending the last range instead when `r` starts
/// where it ends (the "merged adjacent" shape every backend's scan returns).
pub fn push_merged(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => out.push(r),
    }
}

/// Whether both ends of `range` are multiples of `page` and it is not
/// reversed.
pub fn page_aligned(range: &Range<u64>, page: u64) -> bool {
    range.start.is_multiple_of(page) && range.end.is_multiple_of(page) && range.start <= range.end
}

/// Adds `r` to `set` (sorted, disjoint, adjacent ranges merged).
pub fn insert(set: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    // Ranges touching or overlapping `r` are absorbed into it.
    let first = set.partition_point(|s| s.end < r.start);
    let last = set.partition_point(|s| s.start <= r.end);
    let mut merged = r;
    if first < last {
        merged.start = merged.start.min(set[first].start);
        merged.end = merged.end.max(set[last - 1].end);
    }
    set.splice(first..last, [merged]);
}

/// Removes `r` from `set` (sorted, disjoint), splitting ranges it cuts.
pub fn remove(set: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    let first = set.partition_point(|s| s.end <= r.start);
    let last = set.partition_point(|s| s.start < r.end);
    if first >= last {
        return;
    }
    let mut keep = Vec::with_capacity(2);
    if set[first].start < r.start {
        keep.push(set[first].start..r.start);
    }
    if set[last - 1].end > r.end {
        keep.push(r.end..set[last - 1].end);
    }
    set.splice(first..last, keep);
}

/// The first address of `r` that `set` (sorted, disjoint, merged) does not
/// cover, if any.
pub fn first_uncovered(set: &[Range<u64>], r: &Range<u64>) -> Option<u64> {
    if r.is_empty() {
        return None;
    }
    let i = set.partition_point(|s| s.end <= r.start);
    match set.get(i) {
        Some(s) if s.start <= r.start => (s.end < r.end).then_some(s.end),
        _ => Some(r.start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_insert_remove_cover() {
        let mut s = Vec::new();
        insert(&mut s, 10..20);
        insert(&mut s, 30..40);
        insert(&mut s, 0..5);
        assert_eq!(s, vec![0..5, 10..20, 30..40]);
        insert(&mut s, 20..30);
        assert_eq!(s, vec![0..5, 10..40], "adjacent ranges merge");
        insert(&mut s, 3..12);
        assert_eq!(s, vec![0..40]);
        insert(&mut s, 50..50);
        assert_eq!(s, vec![0..40], "empty insert is a no-op");
        remove(&mut s, 10..20);
        assert_eq!(s, vec![0..10, 20..40]);
        remove(&mut s, 5..25);
        assert_eq!(s, vec![0..5, 25..40]);
        remove(&mut s, 100..200);
        assert_eq!(s, vec![0..5, 25..40]);
        assert_eq!(first_uncovered(&s, &(0..5)), None);
        assert_eq!(first_uncovered(&s, &(26..40)), None);
        assert_eq!(first_uncovered(&s, &(0..6)), Some(5));
        assert_eq!(first_uncovered(&s, &(6..7)), Some(6));
        assert_eq!(first_uncovered(&s, &(24..30)), Some(24));
        assert_eq!(first_uncovered(&s, &(30..41)), Some(40));
        assert_eq!(first_uncovered(&s, &(7..7)), None);
        remove(&mut s, 0..40);
        assert!(s.is_empty());
    }

    #[test]
    fn merges_only_adjacent() {
        let mut v = Vec::new();
        push_merged(&mut v, 0..4);
        push_merged(&mut v, 4..8);
        push_merged(&mut v, 12..16);
        push_merged(&mut v, 16..20);
        push_merged(&mut v, 24..28);
        assert_eq!(v, vec![0..8, 12..20, 24..28]);
    }

    #[test]
    fn alignment() {
        assert!(page_aligned(&(4096..8192), 4096));
        assert!(page_aligned(&(4096..4096), 4096));
        assert!(!page_aligned(&(4096..8193), 4096));
        assert!(!page_aligned(&(1..4096), 4096));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 8192..4096;
        assert!(!page_aligned(&reversed, 4096));
    }
}
