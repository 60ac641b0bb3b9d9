//! Samples and their summary (min / median / max), per metric.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One measured quantity over the recorded runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metric {
    /// "ms", "bytes", "pages" or "count".
    pub unit: &'static str,
    pub samples: Vec<f64>,
}

/// min, median and max of a metric's samples.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Metric {
    /// The summary, or None without samples.
    pub fn summary(&self) -> Option<Summary> {
        summarize(&self.samples)
    }
}

/// min / median / max; the median of an even count is the mean of the two
/// middle samples. NaN samples are ignored.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

/// Metrics of one scenario on one target, in insertion-independent order.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Metrics(pub BTreeMap<String, Metric>);

impl Metrics {
    /// Adds a sample to `name` (created with `unit` on first use).
    pub fn push(&mut self, name: &str, unit: &'static str, value: f64) {
        self.0
            .entry(name.to_string())
            .or_insert_with(|| Metric {
                unit,
                samples: Vec::new(),
            })
            .samples
            .push(value);
    }

    /// Adds a duration sample in milliseconds.
    pub fn push_ms(&mut self, name: &str, d: Duration) {
        self.push(name, "ms", ms(d));
    }

    pub fn get(&self, name: &str) -> Option<&Metric> {
        self.0.get(name)
    }
}

/// A duration in (fractional) milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_even_and_empty() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 4.0));
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[f64::NAN]).is_none());
    }

    #[test]
    fn metrics_accumulate_per_name() {
        let mut m = Metrics::default();
        m.push_ms("pause", Duration::from_micros(1500));
        m.push_ms("pause", Duration::from_millis(2));
        m.push("bytes", "bytes", 10.0);
        let pause = m.get("pause").unwrap();
        assert_eq!(pause.unit, "ms");
        assert_eq!(pause.samples, vec![1.5, 2.0]);
        assert_eq!(m.get("bytes").unwrap().samples, vec![10.0]);
        assert!(m.get("nope").is_none());
    }
}
