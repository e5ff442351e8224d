//! Open-loop arrival times, as vLLM's `bench serve` draws them: gaps are Gamma-distributed with
//! shape = burstiness and scale = 1 / (rate · burstiness), so the mean gap is always 1 / rate and
//! the gaps' coefficient of variation is 1 / √burstiness. Burstiness 1 is a Poisson process
//! (exponential gaps); below 1 arrivals come in bursts, above 1 they are more even.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// The arrival offsets (seconds from the start) of an open-loop run. The first request goes at
/// 0, as in vLLM, so a run does not open with an idle gap.
#[derive(Debug, Clone)]
pub struct ArrivalTimes {
    rng: StdRng,
    /// `None` for an infinite rate: every request at once.
    gaps: Option<Gamma<f64>>,
    next: f64,
}

impl ArrivalTimes {
    /// `rate` in requests per second (`f64::INFINITY` for all at once), `burstiness` > 0.
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> Result<Self, String> {
        if rate.is_nan() || rate <= 0.0 {
            return Err(format!("the request rate must be positive, not {rate}"));
        }
        if !burstiness.is_finite() || burstiness <= 0.0 {
            return Err(format!("the burstiness must be positive, not {burstiness}"));
        }
        let gaps = if rate.is_infinite() {
            None
        } else {
            Some(Gamma::new(burstiness, 1.0 / (rate * burstiness)).map_err(|e| e.to_string())?)
        };
        Ok(Self {
            rng: StdRng::seed_from_u64(seed),
            gaps,
            next: 0.0,
        })
    }
}

impl Iterator for ArrivalTimes {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        let at = self.next;
        if let Some(gaps) = &self.gaps {
            self.next += gaps.sample(&mut self.rng);
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(times: &[f64]) -> Vec<f64> {
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn mean_and_cv(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    /// Variance / mean of the number of arrivals per window: 1 for a Poisson process.
    fn index_of_dispersion(times: &[f64], window: f64) -> f64 {
        let windows = (times.last().unwrap() / window).floor() as usize;
        let mut counts = vec![0.0f64; windows];
        for t in times {
            let i = (t / window) as usize;
            if i < windows {
                counts[i] += 1.0;
            }
        }
        let n = counts.len() as f64;
        let mean = counts.iter().sum::<f64>() / n;
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0);
        var / mean
    }

    #[test]
    fn poisson_arrivals_pass_the_dispersion_check() {
        let rate = 20.0;
        let times: Vec<f64> = ArrivalTimes::new(rate, 1.0, 42)
            .unwrap()
            .take(20_000)
            .collect();
        assert_eq!(times[0], 0.0);
        let (mean, cv) = mean_and_cv(&gaps(&times));
        // Standard errors at n = 20 000: mean ±0.7 %, CV ±0.7 %; bounds are about 4 sigma.
        assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.04, "inter-arrival CV {cv}");
        // ~1000 one-second windows of ~20 arrivals: the index's standard error is ~4.5 %.
        let dispersion = index_of_dispersion(&times, 1.0);
        assert!(
            (dispersion - 1.0).abs() < 0.2,
            "index of dispersion {dispersion}"
        );
    }

    #[test]
    fn burstiness_sets_the_coefficient_of_variation_and_keeps_the_rate() {
        for (burstiness, expected_cv) in [(0.25, 2.0), (4.0, 0.5)] {
            let times: Vec<f64> = ArrivalTimes::new(10.0, burstiness, 7)
                .unwrap()
                .take(20_000)
                .collect();
            let (mean, cv) = mean_and_cv(&gaps(&times));
            assert!(
                (mean * 10.0 - 1.0).abs() < 0.05,
                "b={burstiness}: mean {mean}"
            );
            assert!(
                (cv / expected_cv - 1.0).abs() < 0.06,
                "b={burstiness}: CV {cv}, expected {expected_cv}"
            );
            let dispersion = index_of_dispersion(&times, 2.0);
            // Bursty arrivals are over-dispersed, even ones under-dispersed.
            if burstiness < 1.0 {
                assert!(dispersion > 2.0, "b={burstiness}: {dispersion}");
            } else {
                assert!(dispersion < 0.5, "b={burstiness}: {dispersion}");
            }
        }
    }

    #[test]
    fn a_seed_fixes_the_schedule() {
        let a: Vec<f64> = ArrivalTimes::new(5.0, 1.0, 3).unwrap().take(50).collect();
        let b: Vec<f64> = ArrivalTimes::new(5.0, 1.0, 3).unwrap().take(50).collect();
        let c: Vec<f64> = ArrivalTimes::new(5.0, 1.0, 4).unwrap().take(50).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_infinite_rate_sends_everything_at_once() {
        let times: Vec<f64> = ArrivalTimes::new(f64::INFINITY, 1.0, 0)
            .unwrap()
            .take(5)
            .collect();
        assert_eq!(times, vec![0.0; 5]);
        assert!(ArrivalTimes::new(0.0, 1.0, 0).is_err());
        assert!(ArrivalTimes::new(1.0, 0.0, 0).is_err());
    }
}
