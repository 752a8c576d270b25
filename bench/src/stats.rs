//! Latency samples and error counts per RPC, and their summaries.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every latency and failure seen for each RPC of one measurement.
#[derive(Debug, Default)]
pub struct Recorder {
    rpcs: BTreeMap<&'static str, Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    /// Records one call of `rpc` that took `took` and ended with `outcome`.
    pub fn record(&mut self, rpc: &'static str, took: Duration, outcome: Result<(), tonic::Code>) {
        let samples = self.rpcs.entry(rpc).or_default();
        samples.latencies.push(took);
        if let Err(code) = outcome {
            *samples.errors.entry(format!("{code:?}")).or_default() += 1;
        }
    }

    /// Adds another recorder's samples (one per worker) to this one.
    pub fn merge(&mut self, other: Recorder) {
        for (rpc, theirs) in other.rpcs {
            let ours = self.rpcs.entry(rpc).or_default();
            ours.latencies.extend(theirs.latencies);
            for (code, n) in theirs.errors {
                *ours.errors.entry(code).or_default() += n;
            }
        }
    }

    /// Calls that failed, over all RPCs.
    pub fn failures(&self) -> u64 {
        self.rpcs.values().flat_map(|s| s.errors.values()).sum()
    }

    /// Summarises each RPC over a measurement that lasted `wall`.
    pub fn summarize(self, wall: Duration) -> BTreeMap<String, RpcSummary> {
        self.rpcs.into_iter().map(|(rpc, s)| (rpc.to_owned(), RpcSummary::of(s, wall))).collect()
    }
}

/// What one RPC did during a measurement; latencies in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcSummary {
    /// Calls made.
    pub count: u64,
    /// Calls per second of wall time (all workers together).
    pub ops_per_s: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 90th percentile latency.
    pub p90_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// Slowest call.
    pub max_us: f64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
}

impl RpcSummary {
    fn of(mut s: Samples, wall: Duration) -> RpcSummary {
        s.latencies.sort_unstable();
        let at = |p: f64| percentile(&s.latencies, p);
        RpcSummary {
            count: s.latencies.len() as u64,
            ops_per_s: s.latencies.len() as f64 / wall.as_secs_f64().max(1e-9),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            max_us: at(1.0),
            errors: s.errors,
        }
    }
}

/// Nearest-rank percentile of sorted samples, in microseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // A rank within 1..=len, so the cast back can neither truncate nor wrap.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// Median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 0.5), 50.0);
        assert_eq!(percentile(&samples, 0.99), 99.0);
        assert_eq!(percentile(&samples, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
