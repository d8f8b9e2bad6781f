//! Percentiles, medians and per-round differences of bench figures.
//!
//! Percentiles are nearest-rank (the smallest value with at least p % of the values at or below
//! it) of sorted input; NaN stands for "no value" and is skipped by the medians, so that a round
//! without a figure does not move them. An empty input gives NaN.

/// The index of the nearest-rank `p`-th percentile (0–100) among `len` sorted values.
fn rank(len: usize, p: f64) -> Option<usize> {
    if len == 0 {
        return None;
    }
    // p is within 0..=100, so the product is within 0..=len.
    let rank = ((p / 100.0) * len as f64).ceil() as usize;
    Some(rank.clamp(1, len) - 1)
}

/// The `p`-th percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    rank(sorted.len(), p).map_or(f64::NAN, |i| sorted[i])
}

/// The `p`-th percentile of sorted nanoseconds, in ms.
pub fn percentile_ms(sorted_ns: &[u64], p: f64) -> f64 {
    rank(sorted_ns.len(), p).map_or(f64::NAN, |i| sorted_ns[i] as f64 / 1e6)
}

/// The median, NaNs skipped (the mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The largest value, NaNs skipped.
pub fn max_of(values: impl IntoIterator<Item = f64>) -> f64 {
    values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold(f64::NAN, f64::max)
}

/// The smallest value, NaNs skipped.
pub fn min_of(values: impl IntoIterator<Item = f64>) -> f64 {
    values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold(f64::NAN, f64::min)
}

/// Median over rounds of `row − base`, round by round.
pub fn added(row: &[f64], base: &[f64]) -> f64 {
    median(row.iter().zip(base).map(|(r, b)| r - b))
}

/// `row / base`, round by round.
pub fn ratios(row: &[f64], base: &[f64]) -> Vec<f64> {
    row.iter().zip(base).map(|(r, b)| r / b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 5.0, "p50 of 1..=10");
        assert_eq!(percentile(&values, 99.0), 10.0, "p99 of 1..=10");
        assert_eq!(percentile(&values, 0.0), 1.0, "p0 is the smallest");
        assert!(percentile(&[], 50.0).is_nan(), "no values, no percentile");
        assert_eq!(
            percentile_ms(&[1_000_000, 3_000_000], 100.0),
            3.0,
            "ns to ms"
        );
    }

    #[test]
    fn medians_skip_missing_values() {
        assert_eq!(median([3.0, f64::NAN, 1.0, 2.0]), 2.0, "odd count");
        assert_eq!(median([4.0, 1.0]), 2.5, "even count");
        assert!(median([f64::NAN]).is_nan(), "nothing left");
        assert_eq!(added(&[5.0, 7.0, 9.0], &[1.0, 2.0, 3.0]), 5.0, "per round");
        assert_eq!(
            median(ratios(&[2.0, 3.0, 8.0], &[1.0, 1.0, 2.0])),
            3.0,
            "per round"
        );
    }
}
