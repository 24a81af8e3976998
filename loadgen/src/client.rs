//! The load generator. `threads` OS threads each run a current-thread tokio
//! runtime with their share of the `concurrency` connection loops (the
//! oha / h1load shape: no cross-thread wake-ups, no work stealing).
//!
//! Close mode (`requests_per_conn == 1`, the seed's HTTP/1.0-style test) is
//! the lean path: raw tokio `TcpStream`s, one pre-built request buffer, one
//! reusable read buffer per loop, heads parsed in place, bodies counted not
//! kept. When the response says `Connection: close` the client waits for
//! the server's FIN before closing, so TIME_WAIT lands on the server side
//! and close mode does not exhaust the client's ephemeral ports.
//! Keep-alive mode (`requests_per_conn > 1`) goes through hyper's HTTP/1
//! client connection.
//!
//! `rate` makes the load open-loop: request `i` of a thread is due at
//! `start + i / (rate / threads)`, and TTFB/TTLB are measured from that due
//! time, so queueing behind a slow server shows up in the latencies
//! (no coordinated omission).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1;
use crate::stats::{self, ErrorClass, LoadReport, ThreadStats};
use crate::target::Target;

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stop starting requests after this long.
    After(Duration),
    /// Exactly this many requests (successful or not).
    Count(u64),
}

/// Everything a load run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: Target,
    /// Connection loops in flight at once (at least 1).
    pub concurrency: usize,
    /// Worker threads (at least 1; capped at `concurrency`).
    pub threads: usize,
    pub stop: Stop,
    /// Requests per TCP connection; 1 is close mode.
    pub requests_per_conn: u64,
    /// Open-loop request rate per second over all threads.
    pub rate: Option<f64>,
    /// Bound on one connection's work (connect, request, response).
    pub timeout: Duration,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("concurrency must be at least 1")]
    Concurrency,
    #[error("threads must be at least 1")]
    Threads,
    #[error("requests per connection must be at least 1")]
    RequestsPerConn,
    #[error("rate must be a positive number of requests per second")]
    Rate,
    #[error("request count must be at least 1")]
    Count,
    #[error("cannot start load thread: {0}")]
    Thread(std::io::Error),
}

/// One progress tick.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub elapsed: Duration,
    pub conn_per_s: f64,
    pub req_per_s: f64,
    pub body_mbps: f64,
    /// Errors since the previous tick.
    pub errors: u64,
    /// TTLB p99 over the last tick, µs (0 when nothing completed).
    pub p99_us: u64,
}

impl Progress {
    /// The one-line form printed each second.
    pub fn line(&self) -> String {
        format!(
            "[{:>4.0}s] conn/s {:>9.0}  req/s {:>9.0}  Mbit/s {:>8.1}  errors {:>5}  p99 {}",
            self.elapsed.as_secs_f64(),
            self.conn_per_s,
            self.req_per_s,
            self.body_mbps,
            self.errors,
            stats::fmt_us(self.p99_us)
        )
    }
}

/// State shared by all workers.
struct Shared {
    deadline: Option<Instant>,
    /// Requests left to claim for `Stop::Count`.
    tickets: Option<AtomicU64>,
    /// Set when the run must end now (nothing listening).
    abort: AtomicBool,
    any_success: AtomicBool,
}

impl Shared {
    /// Claims the right to start up to `want` more requests; returns how
    /// many were granted (0: the run is over).
    fn claim(&self, now: Instant, want: u64) -> u64 {
        if self.abort.load(Relaxed) {
            return 0;
        }
        if let Some(d) = self.deadline
            && now >= d
        {
            return 0;
        }
        match &self.tickets {
            None => want,
            Some(t) => t
                .fetch_update(Relaxed, Relaxed, |n| (n > 0).then(|| n - want.min(n)))
                .map_or(0, |n| want.min(n)),
        }
    }
}

/// Per-thread open-loop pacing.
struct Pacer {
    start: Instant,
    interval: Duration,
    next: Cell<u64>,
}

impl Pacer {
    /// The due time of the next request, after sleeping until it.
    async fn next(&self) -> Instant {
        let i = self.next.get();
        self.next.set(i + 1);
        let due = self.start + self.interval.mul_f64(i as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        due
    }
}

/// What one worker loop needs, shared by the loops of a thread.
struct Ctx {
    config: LoadConfig,
    request: Vec<u8>,
    shared: Arc<Shared>,
    stats: Arc<ThreadStats>,
    pacer: Option<Pacer>,
}

impl Ctx {
    fn error(&self, class: ErrorClass, detail: impl FnOnce() -> String) {
        if class == ErrorClass::Refused && !self.shared.any_success.load(Relaxed) {
            // Nothing is listening: stop now rather than spin for the whole
            // duration; the report says why.
            self.shared.abort.store(true, Relaxed);
        }
        self.stats.error(class, detail);
    }

    /// Claims up to `want` request slots and waits for the first one's due
    /// time (open loop). Returns the instant latencies are measured from
    /// and the slots granted.
    async fn begin(&self, want: u64) -> Option<(Instant, u64)> {
        let granted = self.shared.claim(Instant::now(), want);
        if granted == 0 {
            return None;
        }
        Some((self.pace().await?, granted))
    }

    /// Waits for the due time of a request whose slot is already held.
    async fn pace(&self) -> Option<Instant> {
        if self.shared.abort.load(Relaxed) {
            return None;
        }
        match &self.pacer {
            None => {
                let now = Instant::now();
                if self.shared.deadline.is_some_and(|d| now >= d) {
                    return None;
                }
                Some(now)
            }
            Some(p) => {
                let due = p.next().await;
                if self.shared.deadline.is_some_and(|d| due >= d) {
                    return None;
                }
                Some(due)
            }
        }
    }
}

type Failure = (ErrorClass, String);

fn io_failure(what: &str, e: std::io::Error) -> Failure {
    let class = ErrorClass::of_io(&e);
    (class, format!("{what}: {e}"))
}

/// Runs the load and returns the merged report. `progress` is called on
/// the calling thread about once a second.
pub fn run(
    config: &LoadConfig,
    mut progress: Option<&mut dyn FnMut(&Progress)>,
) -> Result<LoadReport, LoadError> {
    if config.concurrency == 0 {
        return Err(LoadError::Concurrency);
    }
    if config.threads == 0 {
        return Err(LoadError::Threads);
    }
    if config.requests_per_conn == 0 {
        return Err(LoadError::RequestsPerConn);
    }
    if config.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(LoadError::Rate);
    }
    if config.stop == Stop::Count(0) {
        return Err(LoadError::Count);
    }
    let threads = config.threads.min(config.concurrency);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: match config.stop {
            Stop::After(d) => Some(start + d),
            Stop::Count(_) => None,
        },
        tickets: match config.stop {
            Stop::Count(n) => Some(AtomicU64::new(n)),
            Stop::After(_) => None,
        },
        abort: AtomicBool::new(false),
        any_success: AtomicBool::new(false),
    });
    let all_stats: Vec<Arc<ThreadStats>> = (0..threads)
        .map(|_| Arc::new(ThreadStats::default()))
        .collect();
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let mut handles = Vec::new();
    for (i, stats) in all_stats.iter().enumerate() {
        let loops = config.concurrency / threads + usize::from(i < config.concurrency % threads);
        let ctx = Ctx {
            config: config.clone(),
            request: config.target.request_bytes(config.requests_per_conn == 1),
            shared: Arc::clone(&shared),
            stats: Arc::clone(stats),
            pacer: config.rate.map(|r| Pacer {
                // Threads interleave their slots instead of firing together.
                start: start + Duration::from_secs_f64(i as f64 / r),
                interval: Duration::from_secs_f64(threads as f64 / r),
                next: Cell::new(0),
            }),
        };
        let done_tx = done_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("load-{i}"))
            .spawn(move || {
                worker(ctx, loops);
                let _ = done_tx.send(Instant::now());
            })
            .map_err(LoadError::Thread)?;
        handles.push(h);
    }
    drop(done_tx);

    let mut finished = 0;
    let mut end = start;
    let mut last = stats::Snapshot::default();
    let mut last_tick = start;
    let tick = Duration::from_secs(1);
    while finished < threads {
        let wait = (last_tick + tick).saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(wait) {
            Ok(t) => {
                finished += 1;
                end = end.max(t);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let (snap, interval) = stats::snapshot(&all_stats);
                if let Some(cb) = progress.as_mut() {
                    let secs = now.duration_since(last_tick).as_secs_f64().max(1e-9);
                    cb(&Progress {
                        elapsed: now.duration_since(start),
                        conn_per_s: (snap.connections - last.connections) as f64 / secs,
                        req_per_s: (snap.requests - last.requests) as f64 / secs,
                        body_mbps: (snap.body_bytes - last.body_bytes) as f64 * 8.0 / secs / 1e6,
                        errors: snap.errors - last.errors,
                        p99_us: if interval.is_empty() {
                            0
                        } else {
                            interval.value_at_quantile(0.99)
                        },
                    });
                }
                last = snap;
                last_tick = now;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let mut report = stats::merge(&all_stats, end.duration_since(start));
    report.url = config.target.url.clone();
    report.threads = threads;
    report.concurrency = config.concurrency;
    report.requests_per_connection = config.requests_per_conn;
    Ok(report)
}

fn worker(ctx: Ctx, loops: usize) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ctx.stats
                .error(ErrorClass::Other, || format!("cannot build runtime: {e}"));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let ctx = Rc::new(ctx);
    local.block_on(&rt, async move {
        let mut tasks = Vec::with_capacity(loops);
        for _ in 0..loops {
            let ctx = Rc::clone(&ctx);
            tasks.push(tokio::task::spawn_local(async move {
                if ctx.config.requests_per_conn == 1 {
                    close_loop(&ctx).await
                } else {
                    keepalive_loop(&ctx).await
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Close mode: one request per connection, until the run ends.
async fn close_loop(ctx: &Ctx) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Some((t0, _)) = ctx.begin(1).await {
        match tokio::time::timeout(ctx.config.timeout, close_once(ctx, t0, &mut buf)).await {
            Ok(Ok(())) => {}
            Ok(Err((class, detail))) => ctx.error(class, || detail),
            Err(_) => ctx.error(ErrorClass::Timeout, || {
                format!(
                    "no complete response within {}",
                    humantime::format_duration(ctx.config.timeout)
                )
            }),
        }
    }
}

async fn close_once(ctx: &Ctx, t0: Instant, buf: &mut [u8]) -> Result<(), Failure> {
    let c0 = Instant::now();
    let mut s = TcpStream::connect(ctx.config.target.addr)
        .await
        .map_err(|e| io_failure(&format!("connect to {}", ctx.config.target.addr), e))?;
    let connected = Instant::now();
    ctx.stats.connections.fetch_add(1, Relaxed);
    s.write_all(&ctx.request)
        .await
        .map_err(|e| io_failure("send request", e))?;

    // Head.
    let mut filled = 0;
    let mut first_byte = None;
    let head = loop {
        let n = s
            .read(&mut buf[filled..])
            .await
            .map_err(|e| io_failure("read response", e))?;
        if n == 0 {
            return Err(if filled == 0 {
                (
                    ErrorClass::Reset,
                    "connection closed before any response byte".into(),
                )
            } else {
                (
                    ErrorClass::BadResponse,
                    "connection closed inside the response head".into(),
                )
            });
        }
        first_byte.get_or_insert_with(Instant::now);
        filled += n;
        match http1::parse_response(&buf[..filled]) {
            Ok(Some(h)) => break h,
            Ok(None) if filled < buf.len() => {}
            Ok(None) => return Err((ErrorClass::BadResponse, "response head too large".into())),
            Err(e) => return Err((ErrorClass::BadResponse, format!("bad response head: {e}"))),
        }
    };
    let ttfb = first_byte.unwrap_or(connected);
    let bad_status = !(200..400).contains(&head.status);
    let detail = bad_status.then(|| {
        format!(
            "HTTP {}: {}",
            head.status,
            http1::snippet(&buf[head.len..filled])
        )
    });

    // Body: by Content-Length, else (chunked or unframed) until EOF.
    let mut body = (filled - head.len) as u64;
    let server_closes = head.framing.close || (head.minor == 0 && !head.framing.keep_alive);
    match head
        .framing
        .content_length
        .filter(|_| !head.framing.chunked)
    {
        Some(expected) => {
            while body < expected {
                let n = s.read(buf).await.map_err(|e| io_failure("read body", e))?;
                if n == 0 {
                    return Err((
                        ErrorClass::ShortBody,
                        format!("body ended at {body} of {expected} bytes"),
                    ));
                }
                body += n as u64;
            }
            if body > expected {
                return Err((
                    ErrorClass::BadResponse,
                    format!("{body} body bytes, Content-Length {expected}"),
                ));
            }
            let last_byte = Instant::now();
            if server_closes {
                // Let the server close first: its FIN usually came with the
                // last data, so this read returns at once.
                let n = s
                    .read(buf)
                    .await
                    .map_err(|e| io_failure("wait for close", e))?;
                if n != 0 {
                    return Err((
                        ErrorClass::BadResponse,
                        "bytes after the announced body".into(),
                    ));
                }
            }
            finish(ctx, c0, connected, t0, ttfb, last_byte, body, detail)
        }
        None => {
            loop {
                let n = s.read(buf).await.map_err(|e| io_failure("read body", e))?;
                if n == 0 {
                    break;
                }
                body += n as u64;
            }
            finish(ctx, c0, connected, t0, ttfb, Instant::now(), body, detail)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &Ctx,
    c0: Instant,
    connected: Instant,
    t0: Instant,
    ttfb: Instant,
    last_byte: Instant,
    body: u64,
    bad_status: Option<String>,
) -> Result<(), Failure> {
    if let Some(detail) = bad_status {
        return Err((ErrorClass::BadStatus, detail));
    }
    ctx.shared.any_success.store(true, Relaxed);
    ctx.stats.success(
        Some(connected.duration_since(c0)),
        ttfb.saturating_duration_since(t0),
        last_byte.saturating_duration_since(t0),
        body,
    );
    Ok(())
}

fn hyper_failure(what: &str, e: hyper::Error) -> Failure {
    let class = if e.is_incomplete_message() {
        ErrorClass::ShortBody
    } else if e.is_parse() {
        ErrorClass::BadResponse
    } else if e.is_timeout() {
        ErrorClass::Timeout
    } else if let Some(io) =
        std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>())
    {
        ErrorClass::of_io(io)
    } else {
        ErrorClass::Reset
    };
    (class, format!("{what}: {e}"))
}

/// Keep-alive mode: `requests_per_conn` requests per connection via hyper.
/// Each connection claims its requests up front, so with `-n` the count of
/// connections is exactly `ceil(n / requests_per_conn)` when the server
/// keeps connections open.
async fn keepalive_loop(ctx: &Ctx) {
    let mut pending = None;
    loop {
        let (t0, slots) = match pending.take() {
            Some(p) => p,
            None => match ctx.begin(ctx.config.requests_per_conn).await {
                Some(p) => p,
                None => return,
            },
        };
        match tokio::time::timeout(ctx.config.timeout, keepalive_conn(ctx, t0, slots)).await {
            Ok(Ok(next)) => pending = next,
            Ok(Err((class, detail))) => ctx.error(class, || detail),
            Err(_) => ctx.error(ErrorClass::Timeout, || {
                format!(
                    "connection not done within {}",
                    humantime::format_duration(ctx.config.timeout)
                )
            }),
        }
    }
}

/// Runs up to `slots` requests on one connection, the first due at `t0`.
/// When the server closes the connection early, returns the next request's
/// due time and the slots left, to carry over to a new connection.
async fn keepalive_conn(
    ctx: &Ctx,
    mut t0: Instant,
    slots: u64,
) -> Result<Option<(Instant, u64)>, Failure> {
    let c0 = Instant::now();
    let stream = TcpStream::connect(ctx.config.target.addr)
        .await
        .map_err(|e| io_failure(&format!("connect to {}", ctx.config.target.addr), e))?;
    let connected = Instant::now();
    ctx.stats.connections.fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| hyper_failure("handshake", e))?;
    let driver = tokio::task::spawn_local(conn);
    let target = &ctx.config.target;
    let mut connect_time = Some(connected.duration_since(c0));
    let mut result = Ok(None);
    for i in 0..slots {
        if i > 0 {
            match ctx.pace().await {
                Some(t) => t0 = t,
                None => break,
            }
        }
        if sender.ready().await.is_err() {
            // The server closed the connection: carry the rest over.
            result = Ok(Some((t0, slots - i)));
            break;
        }
        let req = hyper::Request::get(target.path_and_query.as_str())
            .header(hyper::header::HOST, target.authority.as_str())
            .header(hyper::header::USER_AGENT, "hvprof-load")
            .body(Empty::<Bytes>::new())
            .map_err(|e| (ErrorClass::Other, format!("build request: {e}")))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                result = Err(hyper_failure("request", e));
                break;
            }
        };
        let ttfb = Instant::now();
        let status = resp.status().as_u16();
        let expected = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let server_closes = resp
            .headers()
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let mut body = resp.into_body();
        let mut received = 0u64;
        let mut first_chunk = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        if first_chunk.is_none() && !d.is_empty() {
                            first_chunk = Some(http1::snippet(d));
                        }
                        received += d.len() as u64;
                    }
                }
                Err(e) => {
                    result = Err(hyper_failure("read body", e));
                    break;
                }
            }
        }
        if result.is_err() {
            break;
        }
        let last_byte = Instant::now();
        if let Some(exp) = expected
            && exp != received
        {
            result = Err((
                ErrorClass::ShortBody,
                format!("body ended at {received} of {exp} bytes"),
            ));
            break;
        }
        if !(200..400).contains(&status) {
            ctx.error(ErrorClass::BadStatus, || {
                format!("HTTP {status}: {}", first_chunk.unwrap_or_default())
            });
        } else {
            ctx.shared.any_success.store(true, Relaxed);
            ctx.stats.success(
                connect_time.take(),
                ttfb.saturating_duration_since(t0),
                last_byte.saturating_duration_since(t0),
                received,
            );
        }
        if server_closes {
            if i + 1 < slots
                && let Some(t) = ctx.pace().await
            {
                result = Ok(Some((t, slots - i - 1)));
            }
            break;
        }
    }
    drop(sender);
    driver.abort();
    result
}
