//! Value types of the command line: durations, integer distributions, image sizes and SLOs.
//! Each parses from and prints back to the text a user types, so reports echo settings as given.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// `2s`, `100ms`, `1.5m`, `250us`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 2s, 100ms, 1.5m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit `{other}` in `{text}`")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// A distribution of positive integers (max_tokens, prompt words): `N`, `uniform:LO:HI`
/// (inclusive) or `normal:MEAN:STD` (rounded, at least 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IntDistribution {
    Fixed(u32),
    Uniform { low: u32, high: u32 },
    Normal { mean: f64, std: f64 },
}

impl IntDistribution {
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match *self {
            Self::Fixed(n) => n,
            Self::Uniform { low, high } => rng.random_range(low..=high),
            Self::Normal { mean, std } => {
                let normal = Normal::new(mean, std).expect("validated when parsed");
                normal.sample(rng).round().clamp(1.0, u32::MAX as f64) as u32
            }
        }
    }

    pub fn mean(&self) -> f64 {
        match *self {
            Self::Fixed(n) => n as f64,
            Self::Uniform { low, high } => (low as f64 + high as f64) / 2.0,
            Self::Normal { mean, .. } => mean,
        }
    }
}

impl FromStr for IntDistribution {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split(':').collect();
        let int = |s: &str| -> Result<u32, String> {
            match s.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("`{s}` in `{text}` is not a positive integer")),
            }
        };
        let float = |s: &str| -> Result<f64, String> {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("`{s}` in `{text}` is not a non-negative number"))
        };
        match parts.as_slice() {
            [n] => Ok(Self::Fixed(int(n)?)),
            ["uniform", low, high] => {
                let (low, high) = (int(low)?, int(high)?);
                if low > high {
                    return Err(format!("`{text}`: low bound above high bound"));
                }
                Ok(Self::Uniform { low, high })
            }
            ["normal", mean, std] => {
                let (mean, std) = (float(mean)?, float(std)?);
                if mean < 1.0 {
                    return Err(format!("`{text}`: the mean must be at least 1"));
                }
                Ok(Self::Normal { mean, std })
            }
            _ => Err(format!(
                "`{text}` is not a distribution: use N, uniform:LO:HI or normal:MEAN:STD"
            )),
        }
    }
}

impl fmt::Display for IntDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Uniform { low, high } => write!(f, "uniform:{low}:{high}"),
            Self::Normal { mean, std } => write!(f, "normal:{mean}:{std}"),
        }
    }
}

/// `WIDTHxHEIGHT` of a synthetic image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

impl FromStr for ImageSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (w, h) = text
            .trim()
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("`{text}` is not WIDTHxHEIGHT"))?;
        let dim = |s: &str| match s.parse::<u32>() {
            Ok(n) if (1..=8192).contains(&n) => Ok(n),
            _ => Err(format!("`{s}` in `{text}` is not a size in 1..=8192")),
        };
        Ok(Self {
            width: dim(w)?,
            height: dim(h)?,
        })
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// The latencies an SLO can bound: vLLM's `--goodput` keys (`e2el` is vLLM's name for e2e).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SloMetric {
    Ttft,
    Tpot,
    E2e,
}

impl SloMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ttft => "ttft",
            Self::Tpot => "tpot",
            Self::E2e => "e2e",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SloTarget {
    pub metric: SloMetric,
    /// The bound, in milliseconds (inclusive).
    pub max_ms: f64,
}

/// `ttft=2s,tpot=100ms,e2e=10s`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slo(pub Vec<SloTarget>);

impl FromStr for Slo {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut targets: Vec<SloTarget> = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}` is not KEY=DURATION (e.g. ttft=2s)"))?;
            let metric = match key.trim().to_ascii_lowercase().as_str() {
                "ttft" => SloMetric::Ttft,
                "tpot" => SloMetric::Tpot,
                "e2e" | "e2el" => SloMetric::E2e,
                other => {
                    return Err(format!(
                        "unknown SLO `{other}`: use ttft, tpot or e2e (e2el)"
                    ))
                }
            };
            if targets.iter().any(|t| t.metric == metric) {
                return Err(format!("SLO `{key}` given twice"));
            }
            let max_ms = parse_duration(value)?.as_secs_f64() * 1e3;
            targets.push(SloTarget { metric, max_ms });
        }
        if targets.is_empty() {
            return Err("an empty SLO".into());
        }
        Ok(Self(targets))
    }
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|t| format!("{}={}ms", t.metric.as_str(), t.max_ms))
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 parsecs").is_err());
    }

    #[test]
    fn distributions_parse_print_and_stay_in_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let fixed: IntDistribution = "64".parse().unwrap();
        assert_eq!(fixed.sample(&mut rng), 64);
        let uniform: IntDistribution = "uniform:16:32".parse().unwrap();
        assert_eq!(uniform.to_string(), "uniform:16:32");
        let draws: Vec<u32> = (0..2000).map(|_| uniform.sample(&mut rng)).collect();
        assert!(draws.iter().all(|n| (16..=32).contains(n)));
        assert!(draws.contains(&16) && draws.contains(&32));
        let normal: IntDistribution = "normal:5:10".parse().unwrap();
        assert!((0..2000).all(|_| normal.sample(&mut rng) >= 1));
        for bad in ["0", "uniform:9:3", "normal:0.5:1", "gauss:1:2", "uniform:1"] {
            assert!(bad.parse::<IntDistribution>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slo_flags_read_like_vllm_goodput() {
        let slo: Slo = "ttft=2s,tpot=100ms,e2el=10".parse().unwrap();
        assert_eq!(
            slo.0,
            vec![
                SloTarget {
                    metric: SloMetric::Ttft,
                    max_ms: 2000.0
                },
                SloTarget {
                    metric: SloMetric::Tpot,
                    max_ms: 100.0
                },
                SloTarget {
                    metric: SloMetric::E2e,
                    max_ms: 10000.0
                },
            ]
        );
        assert!("ttft=1s,ttft=2s".parse::<Slo>().is_err());
        assert!("itl=1s".parse::<Slo>().is_err());
        assert!("ttft".parse::<Slo>().is_err());
    }

    #[test]
    fn image_sizes_are_width_by_height() {
        assert_eq!(
            "672x336".parse::<ImageSize>().unwrap(),
            ImageSize {
                width: 672,
                height: 336
            }
        );
        assert!("0x5".parse::<ImageSize>().is_err());
        assert!("336".parse::<ImageSize>().is_err());
    }
}
