//! The last 15 minutes, one sample a second, in memory: requests, errors, refusals, tokens and a
//! latency histogram per second — what the console's overview charts (`GET /admin/stats`), with
//! no Prometheus server needed.
//!
//! A fixed ring of [`SECONDS`] slots, each tagged with the Unix second it holds. Recording is a
//! few relaxed atomic adds on the slot of the current second; the first writer of a new second
//! claims the slot (a compare-exchange to a "being cleared" mark), clears it and tags it, while
//! any other writer of that second waits the few nanoseconds that takes. Nothing runs in the
//! background: a second nobody wrote reads as zeros.
//!
//! Edge cases: a sample more than [`SECONDS`] old by the time it is written (a request that took
//! over 15 minutes is recorded when it ends, so this only happens if the clock jumps back) is
//! dropped; a clock that jumps forward leaves the skipped seconds empty; the current second is not
//! reported until it is over, so a chart's last point never shows a second half-counted.
//! Latency buckets are a factor √2 apart from 100 µs to ~20 minutes; quantiles are interpolated
//! within a bucket on a log scale, so they are within a few percent of the true figure.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many seconds the ring holds: the overview's 15 minutes.
pub const SECONDS: usize = 900;

/// Latency buckets: bucket 0 is below [`FIRST_EDGE_MICROS`], bucket `k` ends at
/// `FIRST_EDGE_MICROS * 2^(k/2)`, the last one is open-ended.
const BUCKETS: usize = 48;
const FIRST_EDGE_MICROS: f64 = 100.0;

/// The tag of a slot that a writer is clearing.
const CLEARING: u64 = u64::MAX;

pub struct Timeline {
    slots: Box<[Slot]>,
}

struct Slot {
    /// The Unix second this slot holds, or [`CLEARING`]; 0 for never used.
    second: AtomicU64,
    requests: AtomicU32,
    /// Answers with a 5xx status: the gateway or its upstream failed.
    errors: AtomicU32,
    /// Answers with a 4xx status the gateway or the upstream gave (auth, limits, validation),
    /// besides 499 (the client left).
    refused: AtomicU32,
    tokens: AtomicU64,
    latency: [AtomicU32; BUCKETS],
}

/// How one request ended, as the timeline counts it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub status: u16,
    /// Its duration, when it counts toward latency (it reached the upstream).
    pub latency: Option<Duration>,
}

/// The last `seconds` complete seconds, one entry per second in each series, oldest first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    /// The Unix second of the first entry.
    pub start: u64,
    pub step_seconds: u64,
    pub requests: Vec<u32>,
    pub errors: Vec<u32>,
    pub refused: Vec<u32>,
    pub tokens: Vec<u64>,
    /// Median latency of the second's requests that reached the upstream, in milliseconds;
    /// `null` for a second without any.
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
    /// The whole span at once (its quantiles over every request in it).
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Totals {
    pub seconds: u64,
    pub requests: u64,
    pub errors: u64,
    pub refused: u64,
    pub tokens: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            slots: (0..SECONDS).map(|_| Slot::default()).collect(),
        }
    }

    /// Counts a request that just ended.
    pub fn record(&self, sample: Sample) {
        self.record_at(now_second(), sample);
    }

    /// Counts tokens charged just now.
    pub fn record_tokens(&self, tokens: u64) {
        self.record_tokens_at(now_second(), tokens);
    }

    /// The last `seconds` (at most [`SECONDS`]) complete seconds.
    pub fn series(&self, seconds: usize) -> Series {
        self.series_at(now_second(), seconds)
    }

    fn record_at(&self, second: u64, sample: Sample) {
        let Some(slot) = self.slot(second) else {
            return;
        };
        slot.requests.fetch_add(1, Ordering::Relaxed);
        match sample.status {
            500.. => slot.errors.fetch_add(1, Ordering::Relaxed),
            crate::http::CLIENT_CLOSED_REQUEST => 0,
            400..=499 => slot.refused.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        if let Some(latency) = sample.latency {
            slot.latency[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_tokens_at(&self, second: u64, tokens: u64) {
        if let Some(slot) = self.slot(second) {
            slot.tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    /// The slot of `second`, claimed and cleared first if it still holds an older second.
    fn slot(&self, second: u64) -> Option<&Slot> {
        let slot = &self.slots[index_of(second)];
        let mut spins = 0u32;
        loop {
            let held = slot.second.load(Ordering::Acquire);
            if held == second {
                return Some(slot);
            }
            if held == CLEARING {
                // Another writer is clearing it: a few dozen stores.
                spins += 1;
                if spins.is_multiple_of(64) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            if held > second {
                return None;
            }
            if slot
                .second
                .compare_exchange(held, CLEARING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.clear();
                slot.second.store(second, Ordering::Release);
                return Some(slot);
            }
        }
    }

    fn series_at(&self, now: u64, seconds: usize) -> Series {
        let seconds = seconds.clamp(1, SECONDS);
        let start = now.saturating_sub(seconds as u64);
        let mut series = Series {
            start,
            step_seconds: 1,
            requests: Vec::with_capacity(seconds),
            errors: Vec::with_capacity(seconds),
            refused: Vec::with_capacity(seconds),
            tokens: Vec::with_capacity(seconds),
            p50_ms: Vec::with_capacity(seconds),
            p99_ms: Vec::with_capacity(seconds),
            totals: Totals {
                seconds: seconds as u64,
                requests: 0,
                errors: 0,
                refused: 0,
                tokens: 0,
                p50_ms: None,
                p99_ms: None,
            },
        };
        let mut whole = [0u64; BUCKETS];
        for second in start..now {
            let slot = &self.slots[index_of(second)];
            let mut latency = [0u64; BUCKETS];
            let (requests, errors, refused, tokens) =
                if slot.second.load(Ordering::Acquire) == second {
                    for (count, bucket) in latency.iter_mut().zip(&slot.latency) {
                        *count = u64::from(bucket.load(Ordering::Relaxed));
                    }
                    (
                        slot.requests.load(Ordering::Relaxed),
                        slot.errors.load(Ordering::Relaxed),
                        slot.refused.load(Ordering::Relaxed),
                        slot.tokens.load(Ordering::Relaxed),
                    )
                } else {
                    (0, 0, 0, 0)
                };
            for (total, count) in whole.iter_mut().zip(&latency) {
                *total += count;
            }
            series.requests.push(requests);
            series.errors.push(errors);
            series.refused.push(refused);
            series.tokens.push(tokens);
            series.p50_ms.push(quantile_ms(&latency, 0.50));
            series.p99_ms.push(quantile_ms(&latency, 0.99));
            let totals = &mut series.totals;
            totals.requests += u64::from(requests);
            totals.errors += u64::from(errors);
            totals.refused += u64::from(refused);
            totals.tokens += tokens;
        }
        series.totals.p50_ms = quantile_ms(&whole, 0.50);
        series.totals.p99_ms = quantile_ms(&whole, 0.99);
        series
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            second: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            errors: AtomicU32::new(0),
            refused: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl Slot {
    fn clear(&self) {
        for counter in [&self.requests, &self.errors, &self.refused]
            .into_iter()
            .chain(&self.latency)
        {
            counter.store(0, Ordering::Relaxed);
        }
        self.tokens.store(0, Ordering::Relaxed);
    }
}

fn now_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn index_of(second: u64) -> usize {
    (second % SECONDS as u64) as usize
}

/// The upper edge of bucket `k`, in microseconds.
fn edge_micros(k: usize) -> f64 {
    FIRST_EDGE_MICROS * 2f64.powf(k as f64 / 2.0)
}

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros < FIRST_EDGE_MICROS {
        return 0;
    }
    // micros in [edge(k-1), edge(k)) ⇔ k - 1 <= 2·log2(micros / first) < k.
    let k = (2.0 * (micros / FIRST_EDGE_MICROS).log2()).floor() as usize + 1;
    k.min(BUCKETS - 1)
}

/// The `q` quantile of a histogram, in milliseconds; `None` when it is empty.
fn quantile_ms(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the sample sought, 1-based: the median of 1 sample is that sample.
    let rank = (q * total as f64).ceil().max(1.0);
    let mut below = 0u64;
    for (k, &count) in buckets.iter().enumerate() {
        if count == 0 || ((below + count) as f64) < rank {
            below += count;
            continue;
        }
        let within = (rank - below as f64) / count as f64;
        let micros = match k {
            0 => FIRST_EDGE_MICROS * within,
            _ if k == BUCKETS - 1 => edge_micros(k - 1),
            _ => {
                let (low, high) = (edge_micros(k - 1), edge_micros(k));
                low * (high / low).powf(within)
            }
        };
        // Three decimals: 0.412 ms, not 0.41200000000000003.
        return Some((micros).round() / 1000.0);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000;

    fn answered(status: u16, millis: u64) -> Sample {
        Sample {
            status,
            latency: Some(Duration::from_millis(millis)),
        }
    }

    #[test]
    fn each_second_is_counted_in_its_own_entry_and_the_current_one_is_left_out() {
        let timeline = Timeline::new();
        for _ in 0..3 {
            timeline.record_at(T, answered(200, 10));
        }
        timeline.record_at(T + 1, answered(502, 20));
        timeline.record_at(T + 1, answered(429, 0));
        timeline.record_at(T + 1, answered(499, 0));
        timeline.record_tokens_at(T + 1, 42);
        timeline.record_at(T + 2, answered(200, 10));
        let series = timeline.series_at(T + 2, 3);
        assert_eq!(series.start, T - 1, "three complete seconds before T+2");
        assert_eq!(series.requests, [0, 3, 3], "T+2 is not over yet");
        assert_eq!(series.errors, [0, 0, 1]);
        assert_eq!(series.refused, [0, 0, 1], "499 is the client leaving");
        assert_eq!(series.tokens, [0, 0, 42]);
        assert_eq!(series.p50_ms[0], None, "no request, no latency");
        assert_eq!(series.totals.requests, 6);
        assert_eq!(series.totals.tokens, 42);
    }

    #[test]
    fn a_slot_reused_fifteen_minutes_later_starts_from_zero() {
        let timeline = Timeline::new();
        timeline.record_at(T, answered(200, 10));
        timeline.record_at(T + SECONDS as u64, answered(200, 10));
        let series = timeline.series_at(T + SECONDS as u64 + 1, SECONDS);
        assert_eq!(series.totals.requests, 1, "the old second is gone");
        assert_eq!(series.requests.last(), Some(&1));
        // A sample older than the slot's second is dropped, not added to the newer one.
        timeline.record_at(T, answered(200, 10));
        assert_eq!(
            timeline
                .series_at(T + SECONDS as u64 + 1, SECONDS)
                .totals
                .requests,
            1
        );
    }

    #[test]
    fn quantiles_land_within_a_bucket_of_the_true_figure() {
        let timeline = Timeline::new();
        for millis in 1..=100 {
            timeline.record_at(T, answered(200, millis));
        }
        let series = timeline.series_at(T + 1, 1);
        let p50 = series.p50_ms[0].expect("a median");
        let p99 = series.p99_ms[0].expect("a p99");
        assert!((40.0..=60.0).contains(&p50), "p50 near 50 ms: {p50}");
        assert!((80.0..=120.0).contains(&p99), "p99 near 99 ms: {p99}");
        assert_eq!(series.totals.p50_ms, Some(p50), "one second: the same");
    }

    #[test]
    fn buckets_cover_microseconds_to_minutes() {
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert_eq!(bucket_of(Duration::from_micros(100)), 1);
        assert_eq!(bucket_of(Duration::from_micros(141)), 1);
        assert_eq!(bucket_of(Duration::from_micros(142)), 2);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
        let mut one = [0u64; BUCKETS];
        one[bucket_of(Duration::from_secs(3600))] = 1;
        assert!(
            quantile_ms(&one, 0.5).expect("a figure") > 600_000.0,
            "the open bucket reports its lower edge, ~20 minutes"
        );
    }

    #[test]
    fn writers_on_many_threads_lose_no_count() {
        let timeline = std::sync::Arc::new(Timeline::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let timeline = timeline.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        timeline.record_at(T + i / 2500, answered(200, 1));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no panic");
        }
        let series = timeline.series_at(T + 4, 4);
        assert_eq!(series.requests, [10_000; 4], "every count kept");
    }
}
