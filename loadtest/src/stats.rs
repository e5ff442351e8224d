//! Summary statistics as vLLM reports them (numpy's defaults: linear-interpolated percentiles,
//! population standard deviation).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// `None` for no values. `scale` multiplies every statistic (1e3 for seconds → ms).
pub fn summarize(values: &[f64], scale: f64) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = values.iter().map(|v| v * scale).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    Some(Summary {
        count: sorted.len(),
        mean,
        std,
        min: sorted[0],
        p50: percentile(&sorted, 50.0),
        p90: percentile(&sorted, 90.0),
        p99: percentile(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// numpy's default ("linear") percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy() {
        // np.percentile([1,2,3,4,10], [50, 90, 99]) = [3.0, 7.6, 9.76]; np.std = 3.1622776601683795
        let s = summarize(&[4.0, 1.0, 10.0, 3.0, 2.0], 1.0).unwrap();
        assert_eq!((s.count, s.min, s.max, s.p50), (5, 1.0, 10.0, 3.0));
        assert!((s.p90 - 7.6).abs() < 1e-12);
        assert!((s.p99 - 9.76).abs() < 1e-12);
        assert!((s.mean - 4.0).abs() < 1e-12);
        assert!((s.std - 3.1622776601683795).abs() < 1e-12);
        assert_eq!(summarize(&[0.5], 1e3).unwrap().p99, 500.0);
        assert!(summarize(&[], 1.0).is_none());
    }
}
