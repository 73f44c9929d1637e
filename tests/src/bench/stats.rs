//! Order statistics of measured samples.

/// The `q`-quantile (0.0 ..= 1.0) of `samples`, nearest-rank on the sorted
/// values; `None` when there are no samples.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// The median of `samples` (nearest rank, so always one of the samples).
pub fn median(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.5)
}

/// Median, quartiles, smallest and largest of the per-run values of one
/// figure.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Median of the runs.
    pub median: f64,
    /// First quartile of the runs.
    pub q1: f64,
    /// Third quartile of the runs.
    pub q3: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Number of runs.
    pub runs: usize,
}

impl Summary {
    /// Summarizes per-run values; `None` when there are none.
    pub fn of(runs: &[f64]) -> Option<Self> {
        Some(Summary {
            median: median(runs)?,
            q1: quantile(runs, 0.25)?,
            q3: quantile(runs, 0.75)?,
            min: runs.iter().copied().fold(f64::INFINITY, f64::min),
            max: runs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs: runs.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let samples = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&samples), Some(3.0));
        assert_eq!(quantile(&samples, 0.0), Some(1.0));
        assert_eq!(quantile(&samples, 1.0), Some(5.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&hundred, 0.99), Some(99.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn summary_spans_the_runs() {
        let summary = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((summary.median, summary.min, summary.max), (2.0, 1.0, 3.0));
        assert_eq!(summary.runs, 3);
        let summary = Summary::of(&(1..=8).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!((summary.q1, summary.median, summary.q3), (2.0, 4.0, 6.0));
        assert!(Summary::of(&[]).is_none());
    }
}
