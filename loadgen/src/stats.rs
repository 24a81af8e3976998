//! Load results: latency histograms (HdrHistogram, microseconds) for
//! connect, time to first byte and time to last byte; errors by class;
//! counters; the per-thread recorder the client writes into and the final
//! [`LoadReport`] (its JSON is the `--json` output).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded (values above are clamped): 1 hour in µs.
const MAX_US: u64 = 3_600_000_000;

/// The classes errors are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Connection refused (nothing listening, or backlog full with RST).
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// Connection reset or broken pipe.
    Reset,
    /// A status outside 2xx/3xx.
    BadStatus,
    /// Connection closed before `Content-Length` body bytes arrived.
    ShortBody,
    /// Not parseable as an HTTP/1 response.
    BadResponse,
    /// Anything else (e.g. no free local port).
    Other,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 7] = [
        ErrorClass::Refused,
        ErrorClass::Timeout,
        ErrorClass::Reset,
        ErrorClass::BadStatus,
        ErrorClass::ShortBody,
        ErrorClass::BadResponse,
        ErrorClass::Other,
    ];

    /// The name used in JSON and tables.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Refused => "refused",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Reset => "reset",
            ErrorClass::BadStatus => "bad_status",
            ErrorClass::ShortBody => "short_body",
            ErrorClass::BadResponse => "bad_response",
            ErrorClass::Other => "other",
        }
    }

    /// Classifies an I/O error.
    pub fn of_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => ErrorClass::Refused,
            TimedOut | WouldBlock => ErrorClass::Timeout,
            ConnectionReset | ConnectionAborted | BrokenPipe => ErrorClass::Reset,
            UnexpectedEof => ErrorClass::ShortBody,
            _ => ErrorClass::Other,
        }
    }
}

/// Error counts by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub refused: u64,
    pub timeout: u64,
    pub reset: u64,
    pub bad_status: u64,
    pub short_body: u64,
    pub bad_response: u64,
    pub other: u64,
}

impl ErrorCounts {
    pub fn get(&self, class: ErrorClass) -> u64 {
        match class {
            ErrorClass::Refused => self.refused,
            ErrorClass::Timeout => self.timeout,
            ErrorClass::Reset => self.reset,
            ErrorClass::BadStatus => self.bad_status,
            ErrorClass::ShortBody => self.short_body,
            ErrorClass::BadResponse => self.bad_response,
            ErrorClass::Other => self.other,
        }
    }

    fn slot(&mut self, class: ErrorClass) -> &mut u64 {
        match class {
            ErrorClass::Refused => &mut self.refused,
            ErrorClass::Timeout => &mut self.timeout,
            ErrorClass::Reset => &mut self.reset,
            ErrorClass::BadStatus => &mut self.bad_status,
            ErrorClass::ShortBody => &mut self.short_body,
            ErrorClass::BadResponse => &mut self.bad_response,
            ErrorClass::Other => &mut self.other,
        }
    }

    pub fn total(&self) -> u64 {
        ErrorClass::ALL.iter().map(|&c| self.get(c)).sum()
    }

    fn add(&mut self, other: &ErrorCounts) {
        for c in ErrorClass::ALL {
            *self.slot(c) += other.get(c);
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The three latency distributions, as percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub connect: Percentiles,
    pub ttfb: Percentiles,
    pub ttlb: Percentiles,
}

/// The result of one load run (`hvprof load --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub url: String,
    /// Connections established per second.
    pub conn_per_s: f64,
    /// Successful requests per second.
    pub req_per_s: f64,
    /// Response body bandwidth, megabits (10^6) per second.
    pub body_mbps: f64,
    /// TCP connections established.
    pub connections: u64,
    /// Requests answered with a 2xx/3xx and a complete body.
    pub requests: u64,
    /// Response body bytes received.
    pub body_bytes: u64,
    /// Wall time from the first connection to the last completion.
    pub duration_s: f64,
    pub threads: usize,
    pub concurrency: usize,
    pub requests_per_connection: u64,
    pub errors: ErrorCounts,
    /// The first error seen, for the error message when nothing succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub latency_us: LatencySummary,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits: ~100 KiB each.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Microseconds, at least 1, clamped to the histogram's range.
pub fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, MAX_US)
}

/// Histograms one worker thread records into.
pub struct Histograms {
    pub connect: Histogram<u64>,
    pub ttfb: Histogram<u64>,
    pub ttlb: Histogram<u64>,
    /// TTLB since the last progress tick (reset by the reporter).
    pub interval_ttlb: Histogram<u64>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            connect: new_hist(),
            ttfb: new_hist(),
            ttlb: new_hist(),
            interval_ttlb: new_hist(),
        }
    }
}

/// One worker thread's counters and histograms. Counters are atomics read
/// by the progress reporter; histograms sit behind a mutex that only the
/// owning thread and (once a second) the reporter take.
#[derive(Default)]
#[repr(align(128))]
pub struct ThreadStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub hist: Mutex<Histograms>,
    pub error_counts: Mutex<(ErrorCounts, Option<String>)>,
}

impl ThreadStats {
    /// Records one failed attempt.
    pub fn error(&self, class: ErrorClass, detail: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Relaxed);
        let mut e = self.error_counts.lock().unwrap_or_else(|p| p.into_inner());
        *e.0.slot(class) += 1;
        if e.1.is_none() {
            e.1 = Some(format!("{}: {}", class.name(), detail()));
        }
    }

    /// Records one successful request's latencies (connect only when this
    /// request opened the connection).
    pub fn success(&self, connect: Option<Duration>, ttfb: Duration, ttlb: Duration, body: u64) {
        self.requests.fetch_add(1, Relaxed);
        self.body_bytes.fetch_add(body, Relaxed);
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = connect {
            let _ = h.connect.record(micros(c));
        }
        let _ = h.ttfb.record(micros(ttfb));
        let ttlb = micros(ttlb);
        let _ = h.ttlb.record(ttlb);
        let _ = h.interval_ttlb.record(ttlb);
    }
}

/// Running totals the progress line is computed from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub connections: u64,
    pub requests: u64,
    pub body_bytes: u64,
    pub errors: u64,
}

/// Sums the counters of all threads, and drains their interval TTLB
/// histograms into one, for a progress line.
pub fn snapshot(threads: &[std::sync::Arc<ThreadStats>]) -> (Snapshot, Histogram<u64>) {
    let mut s = Snapshot::default();
    let mut interval = new_hist();
    for t in threads {
        s.connections += t.connections.load(Relaxed);
        s.requests += t.requests.load(Relaxed);
        s.body_bytes += t.body_bytes.load(Relaxed);
        s.errors += t.errors.load(Relaxed);
        let mut h = t.hist.lock().unwrap_or_else(|p| p.into_inner());
        let _ = interval.add(&h.interval_ttlb);
        h.interval_ttlb.reset();
    }
    (s, interval)
}

/// Merges all threads into the final report (rates over `elapsed`).
pub fn merge(threads: &[std::sync::Arc<ThreadStats>], elapsed: Duration) -> LoadReport {
    let (snap, _) = snapshot(threads);
    let (mut connect, mut ttfb, mut ttlb) = (new_hist(), new_hist(), new_hist());
    let mut errors = ErrorCounts::default();
    let mut first_error = None;
    for t in threads {
        let h = t.hist.lock().unwrap_or_else(|p| p.into_inner());
        let _ = connect.add(&h.connect);
        let _ = ttfb.add(&h.ttfb);
        let _ = ttlb.add(&h.ttlb);
        let e = t.error_counts.lock().unwrap_or_else(|p| p.into_inner());
        errors.add(&e.0);
        if first_error.is_none() {
            first_error.clone_from(&e.1);
        }
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    LoadReport {
        conn_per_s: snap.connections as f64 / secs,
        req_per_s: snap.requests as f64 / secs,
        body_mbps: snap.body_bytes as f64 * 8.0 / secs / 1e6,
        connections: snap.connections,
        requests: snap.requests,
        body_bytes: snap.body_bytes,
        duration_s: elapsed.as_secs_f64(),
        errors,
        first_error,
        latency_us: LatencySummary {
            connect: Percentiles::of(&connect),
            ttfb: Percentiles::of(&ttfb),
            ttlb: Percentiles::of(&ttlb),
        },
        ..LoadReport::default()
    }
}

/// Formats microseconds for people: `850us`, `1.23ms`, `2.50s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

impl LoadReport {
    /// The end-of-run table.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} for {:.2}s, {} threads, {} connections, {} request(s) per connection",
            self.url, self.duration_s, self.threads, self.concurrency, self.requests_per_connection
        );
        let _ = writeln!(
            out,
            "  conn/s {:>12.1}   req/s {:>12.1}   body Mbit/s {:>10.1}",
            self.conn_per_s, self.req_per_s, self.body_mbps
        );
        let _ = writeln!(
            out,
            "  connections {:>9}   requests {:>9}   body bytes {:>14}   errors {}",
            self.connections,
            self.requests,
            self.body_bytes,
            self.errors.total()
        );
        let _ = writeln!(
            out,
            "  {:<9}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency", "p50", "p90", "p99", "p99.9", "max"
        );
        for (name, p) in [
            ("connect", &self.latency_us.connect),
            ("ttfb", &self.latency_us.ttfb),
            ("ttlb", &self.latency_us.ttlb),
        ] {
            let _ = writeln!(
                out,
                "  {:<9}{:>10}{:>10}{:>10}{:>10}{:>10}",
                name,
                fmt_us(p.p50),
                fmt_us(p.p90),
                fmt_us(p.p99),
                fmt_us(p.p999),
                fmt_us(p.max)
            );
        }
        if self.errors.total() > 0 {
            let parts: Vec<String> = ErrorClass::ALL
                .iter()
                .filter(|&&c| self.errors.get(c) > 0)
                .map(|&c| format!("{} {}", c.name(), self.errors.get(c)))
                .collect();
            let _ = writeln!(out, "  errors: {}", parts.join(", "));
            if let Some(first) = &self.first_error {
                let _ = writeln!(out, "  first error: {first}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn merges_threads() {
        let a = Arc::new(ThreadStats::default());
        let b = Arc::new(ThreadStats::default());
        a.connections.fetch_add(2, Relaxed);
        b.connections.fetch_add(1, Relaxed);
        a.success(
            Some(Duration::from_micros(10)),
            Duration::from_micros(20),
            Duration::from_micros(30),
            100,
        );
        b.success(
            Some(Duration::from_micros(10)),
            Duration::from_micros(20),
            Duration::from_micros(3000),
            100,
        );
        b.error(ErrorClass::Refused, || "x".into());
        let r = merge(&[a, b], Duration::from_secs(2));
        assert_eq!(r.connections, 3);
        assert_eq!(r.requests, 2);
        assert_eq!(r.body_bytes, 200);
        assert_eq!(r.errors.refused, 1);
        assert_eq!(r.errors.total(), 1);
        assert!((r.conn_per_s - 1.5).abs() < 1e-9);
        assert!(r.latency_us.ttlb.max >= 2990);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "conn_per_s",
            "req_per_s",
            "body_mbps",
            "connections",
            "requests",
            "duration_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json["latency_us"]["ttfb"]["p999"].is_u64());
        assert_eq!(json["errors"]["refused"], 1);
    }
}
