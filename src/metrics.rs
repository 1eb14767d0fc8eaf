//! The gate's Prometheus metrics: counters and histograms kept in atomics (cheap enough for
//! the pass-through path, which pays two clock reads and three atomic adds), gauges read from
//! the database when scraped, and the text exposition format (version 0.0.4) for `/metrics`.
//!
//! Names follow Prometheus conventions: a `stepgate_` prefix, base units (seconds), `_total`
//! on counters, and labels whose values come from small fixed sets (outcomes, error codes,
//! route templates), never from request data.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// What became of a request that took the proxy pipeline (anything outside `/_stepgate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Streamed through to the upstream untouched (including protected routes whose body no
    /// rule protects).
    Passed,
    /// Answered `step_up_required` and stored.
    Held,
    /// A confirmed change's release, forwarded to the upstream.
    Released,
    /// Refused by the gate (any 4xx, or a 5xx that is the gate's or its database's fault).
    Refused,
    /// The upstream could not be reached, timed out or answered unreadably (502/504).
    UpstreamError,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Passed,
        Outcome::Held,
        Outcome::Released,
        Outcome::Refused,
        Outcome::UpstreamError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Held => "held",
            Outcome::Released => "released",
            Outcome::Refused => "refused",
            Outcome::UpstreamError => "upstream_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which passkey ceremony a gate endpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ceremony {
    Registration,
    Confirmation,
}

impl Ceremony {
    pub fn as_str(self) -> &'static str {
        match self {
            Ceremony::Registration => "registration",
            Ceremony::Confirmation => "confirmation",
        }
    }
}

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A latency histogram in atomics. Bucket counts are per bucket (not cumulative) and summed
/// when rendered, so an observation costs one add per field.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {count}"
        );
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Counts keyed by a small set of static labels; for the paths that are not hot.
struct LabelledCounter<K: Ord>(Mutex<BTreeMap<K, u64>>);

impl<K: Ord> Default for LabelledCounter<K> {
    fn default() -> Self {
        LabelledCounter(Mutex::new(BTreeMap::new()))
    }
}

impl<K: Ord + Clone> LabelledCounter<K> {
    fn add(&self, key: K) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *map.entry(key).or_insert(0) += 1;
    }

    fn snapshot(&self) -> Vec<(K, u64)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Figures read from the database at scrape time.
#[derive(Debug, Clone, Default)]
pub struct StoredFigures {
    /// Changes per state, every state listed (zero included).
    pub changes_by_state: Vec<(&'static str, i64)>,
    /// Webhook deliveries waiting to be sent (or retried).
    pub outbox_backlog: i64,
    /// Webhook deliveries that gave up after their last attempt.
    pub dead_letters: i64,
}

/// Every metric one gate instance keeps. Shared by all requests through [`crate::web::AppState`].
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; Outcome::ALL.len()],
    refused: LabelledCounter<&'static str>,
    upstream_errors: LabelledCounter<&'static str>,
    ceremonies: LabelledCounter<(Ceremony, &'static str)>,
    database_errors: AtomicU64,
    passthrough_latency: Histogram,
    protected_latency: Histogram,
    gate_latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// One proxy-pipeline request. `code` is the error code for refusals and upstream errors.
    pub fn record_request(&self, outcome: Outcome, code: Option<&'static str>, took: Duration) {
        self.requests[outcome.index()].fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Passed => self.passthrough_latency.observe(took),
            Outcome::Held | Outcome::Released => self.protected_latency.observe(took),
            Outcome::Refused => self.refused.add(code.unwrap_or("unknown")),
            Outcome::UpstreamError => self.upstream_errors.add(code.unwrap_or("unknown")),
        }
    }

    /// One request to a gate endpoint, by its route template (`/_stepgate/changes/{id}`).
    pub fn record_gate_request(&self, route: &str, took: Duration) {
        let histogram = {
            let mut routes = self
                .gate_latency
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            routes.entry(route.to_string()).or_default().clone()
        };
        histogram.observe(took);
    }

    /// How a passkey ceremony step ended: `"success"` or the refusal's error code.
    pub fn record_ceremony(&self, ceremony: Ceremony, outcome: &'static str) {
        self.ceremonies.add((ceremony, outcome));
    }

    /// A database operation failed (a request's, or a background task's).
    pub fn record_database_error(&self) {
        self.database_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self, outcome: Outcome) -> u64 {
        self.requests[outcome.index()].load(Ordering::Relaxed)
    }

    /// The whole exposition. `stored` is `None` when the database could not be read; the
    /// counters are still served so an outage stays visible.
    pub fn render(&self, stored: Option<&StoredFigures>) -> String {
        let mut out = String::with_capacity(8 * 1024);
        family(
            &mut out,
            "stepgate_requests_total",
            "counter",
            "Requests through the proxy pipeline, by what became of them.",
        );
        for outcome in Outcome::ALL {
            let _ = writeln!(
                out,
                "stepgate_requests_total{{outcome=\"{}\"}} {}",
                outcome.as_str(),
                self.requests(outcome)
            );
        }
        family(
            &mut out,
            "stepgate_requests_refused_total",
            "counter",
            "Proxy-pipeline requests the gate refused, by error code.",
        );
        for (reason, count) in self.refused.snapshot() {
            let _ = writeln!(
                out,
                "stepgate_requests_refused_total{{reason=\"{reason}\"}} {count}"
            );
        }
        family(
            &mut out,
            "stepgate_upstream_errors_total",
            "counter",
            "Forwards that failed on the upstream's side, by error code.",
        );
        for (reason, count) in self.upstream_errors.snapshot() {
            let _ = writeln!(
                out,
                "stepgate_upstream_errors_total{{reason=\"{reason}\"}} {count}"
            );
        }
        family(
            &mut out,
            "stepgate_ceremonies_total",
            "counter",
            "Passkey ceremony steps, by ceremony and outcome (success or the refusal's code).",
        );
        for ((ceremony, outcome), count) in self.ceremonies.snapshot() {
            let _ = writeln!(
                out,
                "stepgate_ceremonies_total{{ceremony=\"{}\",outcome=\"{outcome}\"}} {count}",
                ceremony.as_str()
            );
        }
        family(
            &mut out,
            "stepgate_database_errors_total",
            "counter",
            "Database operations that failed, from requests and background tasks.",
        );
        let _ = writeln!(
            out,
            "stepgate_database_errors_total {}",
            self.database_errors.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "stepgate_passthrough_duration_seconds",
            "histogram",
            "Time from receiving a pass-through request to the upstream's answer head.",
        );
        self.passthrough_latency
            .render(&mut out, "stepgate_passthrough_duration_seconds", "");
        family(
            &mut out,
            "stepgate_protected_duration_seconds",
            "histogram",
            "Time to answer a hold or forward a release on a protected route.",
        );
        self.protected_latency
            .render(&mut out, "stepgate_protected_duration_seconds", "");
        family(
            &mut out,
            "stepgate_gate_request_duration_seconds",
            "histogram",
            "Time to answer a request to one of the gate's own endpoints, by route template.",
        );
        let routes: Vec<(String, std::sync::Arc<Histogram>)> = {
            let routes = self
                .gate_latency
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            routes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for (route, histogram) in routes {
            let labels = format!("route=\"{}\"", escape_label(&route));
            histogram.render(&mut out, "stepgate_gate_request_duration_seconds", &labels);
        }
        if let Some(stored) = stored {
            family(
                &mut out,
                "stepgate_changes",
                "gauge",
                "Changes in the database, by state.",
            );
            for (state, count) in &stored.changes_by_state {
                let _ = writeln!(out, "stepgate_changes{{state=\"{state}\"}} {count}");
            }
            family(
                &mut out,
                "stepgate_webhook_outbox_backlog",
                "gauge",
                "Webhook deliveries waiting to be sent or retried.",
            );
            let _ = writeln!(
                out,
                "stepgate_webhook_outbox_backlog {}",
                stored.outbox_backlog
            );
            family(
                &mut out,
                "stepgate_webhook_dead_letters",
                "gauge",
                "Webhook deliveries that were given up on (see the admin API to retry them).",
            );
            let _ = writeln!(out, "stepgate_webhook_dead_letters {}", stored.dead_letters);
        }
        family(
            &mut out,
            "stepgate_database_up",
            "gauge",
            "1 when this scrape could read the database, else 0.",
        );
        let _ = writeln!(out, "stepgate_database_up {}", u8::from(stored.is_some()));
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are route templates, which contain no quotes, but escape them anyway.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let mut out = String::new();
        histogram.render(&mut out, "h", "");
        assert!(out.contains("h_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("h_count 3\n"), "{out}");
    }

    #[test]
    fn counters_render_with_their_labels() {
        let metrics = Metrics::new();
        metrics.record_request(Outcome::Passed, None, Duration::from_micros(80));
        metrics.record_request(Outcome::Refused, Some("invalid_path"), Duration::ZERO);
        metrics.record_request(Outcome::Refused, Some("invalid_path"), Duration::ZERO);
        metrics.record_ceremony(Ceremony::Confirmation, "user_not_verified");
        metrics.record_gate_request("/_stepgate/changes/{id}", Duration::from_millis(2));
        let text = metrics.render(None);
        assert!(text.contains("stepgate_requests_total{outcome=\"passed\"} 1\n"));
        assert!(text.contains("stepgate_requests_total{outcome=\"refused\"} 2\n"));
        assert!(text.contains("stepgate_requests_refused_total{reason=\"invalid_path\"} 2\n"));
        assert!(text.contains(
            "stepgate_ceremonies_total{ceremony=\"confirmation\",outcome=\"user_not_verified\"} 1\n"
        ));
        assert!(text.contains(
            "stepgate_gate_request_duration_seconds_count{route=\"/_stepgate/changes/{id}\"} 1\n"
        ));
        assert!(text.contains("stepgate_database_up 0\n"));
        assert!(!text.contains("stepgate_changes{"));
    }
}
