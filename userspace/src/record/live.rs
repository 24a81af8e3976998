//! `record --live` and `record --metrics`: counters kept up to date from
//! the events as they are drained (a [`Tap`]), drawn as a terminal view
//! once a second (connections/s, CPU per layer, top functions, lost
//! events) and served as Prometheus text.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context as _, Result};
use hvprof_common::{EventHeader, SOCK_STEPS, SampleEvent, SockLifeEvent, kind};

use crate::{
    catalog::Layer,
    classify::{self, Classifier},
    event,
    recorder::Tap,
    stacks::KernelSymbols,
};

/// TCP states, as `inet_sock_set_state` numbers them.
const ESTABLISHED: u8 = 1;
const SYN_SENT: u8 = 2;
const SYN_RECV: u8 = 3;

/// Counters since the recording started.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub events: BTreeMap<&'static str, u64>,
    pub lost: BTreeMap<String, u64>,
    /// CPU samples per layer.
    pub layers: BTreeMap<&'static str, u64>,
    /// Connections opened from here (SYN_SENT → ESTABLISHED) and accepted
    /// here (SYN_RECV → ESTABLISHED).
    pub opened: u64,
    pub accepted: u64,
    /// Samples per innermost function (kernel frame, or `[user] comm`).
    pub functions: HashMap<Arc<str>, u64>,
    /// hvprof's own process: CPU time (user and system, all threads)
    /// and resident memory, as of the snapshot.
    pub self_cpu_s: f64,
    pub self_rss_bytes: u64,
    /// CPU time the hypervisor under this machine has taken from it
    /// since boot (steal), as of the snapshot.
    pub stolen_s: f64,
}

impl Counters {
    /// Connections: each one counted once, whether its client, its
    /// server or both run here.
    pub fn connections(&self) -> u64 {
        self.opened.max(self.accepted)
    }
}

/// Shared between the tap (writer) and the view / endpoint (readers).
#[derive(Clone, Default)]
pub struct Live(Arc<Mutex<Counters>>);

impl Live {
    /// The counters now, with this process's CPU time and memory.
    pub fn snapshot(&self) -> Counters {
        let mut c = self.lock().clone();
        (c.self_cpu_s, c.self_rss_bytes) = process_usage();
        c.stolen_s = crate::kernel::stat::steal_ns().map_or(0.0, |ns| ns as f64 / 1e9);
        c
    }

    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tap that feeds these counters.
    pub fn tap(&self) -> Box<dyn Tap> {
        Box::new(LiveTap {
            live: self.clone(),
            kernel: KernelSymbols::load(),
            classifier: Classifier::new(),
        })
    }
}

struct LiveTap {
    live: Live,
    kernel: KernelSymbols,
    classifier: Classifier,
}

impl Tap for LiveTap {
    fn event(&mut self, bytes: &[u8]) {
        let Some(h) = EventHeader::read(bytes) else {
            return;
        };
        let sample = (h.kind == kind::CPU_SAMPLE)
            .then(|| SampleEvent::read(bytes))
            .flatten()
            .and_then(|ev| self.sample(&ev));
        let mut c = self.live.lock();
        *c.events.entry(event::probe_name(h.probe)).or_insert(0) += 1;
        // A socket's life arrives when it closes (a few ms after it opened
        // in close mode).
        if h.kind == kind::SOCK_LIFE
            && let Some(s) = SockLifeEvent::read(bytes)
        {
            let n = usize::from(s.steps).min(SOCK_STEPS);
            for i in 0..n {
                match (s.step_old[i], s.step_new[i]) {
                    (SYN_SENT, ESTABLISHED) => c.opened += 1,
                    (SYN_RECV, ESTABLISHED) => c.accepted += 1,
                    _ => {}
                }
            }
        }
        if let Some((layer, leaf)) = sample {
            *c.layers.entry(layer.name()).or_insert(0) += 1;
            *c.functions.entry(leaf).or_insert(0) += 1;
        }
    }

    fn lost(&mut self, lost: &BTreeMap<String, u64>) {
        self.live.lock().lost.clone_from(lost);
    }
}

impl LiveTap {
    /// The layer and innermost function of one sample; `None` for the
    /// idle loop.
    fn sample(&self, ev: &SampleEvent) -> Option<(Layer, Arc<str>)> {
        let kernel: Vec<Arc<str>> = ev
            .kernel_frames()
            .iter()
            .map(|a| self.kernel.name(*a))
            .collect();
        let comm = event::comm(&ev.header.comm);
        if ev.header.pid == 0 && classify::idle_loop(kernel.iter().map(|f| f.as_ref())) {
            return None;
        }
        // `comm-pid/tid;outer;…;inner`, kernel frames suffixed as folded.
        let head = format!("{comm}-{}/{}", ev.header.pid, ev.header.tid);
        let names: Vec<String> = kernel.iter().rev().map(|f| format!("{f}_[k]")).collect();
        let frames: Vec<&str> = std::iter::once(head.as_str())
            .chain(names.iter().map(String::as_str))
            .collect();
        let layer = self.classifier.stack(&frames);
        let leaf = kernel
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::from(format!("[user] {comm}")));
        Some((layer, leaf))
    }
}

/// This process's CPU time (seconds, all threads) and resident memory
/// (bytes); zero where unreadable.
fn process_usage() -> (f64, u64) {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: writes the struct it is given.
    let cpu = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    } else {
        0.0
    };
    // SAFETY: plain sysconf call.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    (cpu, rss)
}

/// One screen of the live view: rates over the last interval `secs`
/// long, `cpus` sampled at `hz` each.
pub fn render(now: &Counters, before: &Counters, secs: f64, hz: u64, cpus: usize) -> String {
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs.max(1e-3);
    // CPU seconds over the interval, as a share of all CPUs' time.
    let of_cpus = |now_s: f64, before_s: f64| {
        100.0 * (now_s - before_s).max(0.0) / (secs.max(1e-3) * cpus.max(1) as f64)
    };
    let events: u64 = now.events.values().sum();
    let events_before: u64 = before.events.values().sum();
    let lost: u64 = now.lost.values().sum();
    let mut o = String::new();
    let _ = writeln!(
        o,
        "hvprof live  (q or Ctrl-C to quit)\n\nconnections/s {:>9.0}   events/s {:>9.0}   lost events {lost}{}\nhvprof itself {:>5.1}% CPU (its process, of all CPUs)   {:.0} MiB resident\n",
        d(now.connections(), before.connections()),
        d(events, events_before),
        if lost > 0 {
            "  (ring buffer full: raise --ringbuf-mib)"
        } else {
            ""
        },
        of_cpus(now.self_cpu_s, before.self_cpu_s),
        now.self_rss_bytes as f64 / (1024.0 * 1024.0),
    );
    let capacity = hz as f64 * cpus.max(1) as f64;
    let _ = writeln!(
        o,
        "{:<10} {:>7}  (CPU time of all {cpus} CPUs)",
        "layer", "CPU %"
    );
    for l in Layer::ALL {
        let n = d(
            now.layers.get(l.name()).copied().unwrap_or(0),
            before.layers.get(l.name()).copied().unwrap_or(0),
        );
        let pct = 100.0 * n / capacity;
        if pct >= 0.05 {
            let bar = "#".repeat((pct / 2.0).round() as usize);
            let _ = writeln!(o, "{:<10} {pct:>6.1}%  {bar}", l.name());
        }
    }
    // Time the hypervisor took: no sample lands in it, so no layer has it.
    let stolen = of_cpus(now.stolen_s, before.stolen_s);
    if stolen >= 0.05 {
        let bar = "#".repeat((stolen / 2.0).round() as usize);
        let _ = writeln!(
            o,
            "{:<10} {stolen:>6.1}%  {bar}  (steal: taken by the hypervisor under this machine)",
            "steal"
        );
    }
    let mut top: Vec<(&Arc<str>, u64)> = now
        .functions
        .iter()
        .map(|(f, n)| {
            (
                f,
                n.saturating_sub(before.functions.get(f).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let _ = writeln!(o, "\ntop functions (CPU samples in the last interval)");
    for (f, n) in top.iter().take(12) {
        let _ = writeln!(o, "  {n:>6}  {f}");
    }
    o
}

/// The counters as Prometheus text.
pub fn prometheus(c: &Counters) -> String {
    let mut o = String::new();
    let mut family =
        |name: &str, help: &str, label: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, v) in rows {
                let _ = writeln!(o, "{name}{{{label}=\"{}\"}} {v}", k.replace('"', "'"));
            }
        };
    family(
        "hvprof_events_total",
        "Events recorded, per probe.",
        "probe",
        &mut c.events.iter().map(|(k, v)| ((*k).to_string(), *v)),
    );
    family(
        "hvprof_lost_events_total",
        "Events lost in the kernel (ring buffer full), per probe.",
        "probe",
        &mut c.lost.iter().map(|(k, v)| (k.clone(), *v)),
    );
    family(
        "hvprof_cpu_samples_total",
        "CPU samples charged to each layer.",
        "layer",
        &mut Layer::ALL.iter().map(|l| {
            (
                l.name().to_string(),
                c.layers.get(l.name()).copied().unwrap_or(0),
            )
        }),
    );
    let _ = writeln!(
        o,
        "# HELP hvprof_tcp_connections_total TCP connections established (each once).\n# TYPE hvprof_tcp_connections_total counter\nhvprof_tcp_connections_total {}",
        c.connections()
    );
    // As node_exporter's steal mode: since boot, all CPUs.
    let _ = writeln!(
        o,
        "# HELP hvprof_machine_steal_seconds_total CPU time the hypervisor under this machine took from it (steal), all CPUs, since boot.\n# TYPE hvprof_machine_steal_seconds_total counter\nhvprof_machine_steal_seconds_total {}",
        c.stolen_s
    );
    // The usual process metrics, of hvprof itself.
    let _ = writeln!(
        o,
        "# HELP process_cpu_seconds_total User and system CPU time of the hvprof process.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n# HELP process_resident_memory_bytes Resident memory of the hvprof process.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
        c.self_cpu_s, c.self_rss_bytes
    );
    o
}

/// Serves `/metrics` on `addr` until the runtime ends; returns the bound
/// address.
pub async fn serve_metrics(addr: std::net::SocketAddr, live: Live) -> Result<std::net::SocketAddr> {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let live = live.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let live = live.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(prometheus(&live.snapshot()))))
                        } else {
                            Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from("see /metrics\n")))
                        };
                        resp.map_err(|e| std::io::Error::other(e.to_string()))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

/// The terminal in raw mode (keys arrive one by one, unechoed) until
/// dropped; nothing when stdin is not a terminal.
pub struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    pub fn enter() -> Self {
        // SAFETY: termios calls on fd 0 with a valid out-pointer.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self(None);
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Self(Some(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// Resolves when `q` is typed on stdin (never when stdin is closed or not
/// readable).
pub async fn quit_key() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut b = [0u8; 1];
        let mut stdin = std::io::stdin();
        while let Ok(1) = stdin.read(&mut b) {
            if b[0] == b'q' || b[0] == b'Q' {
                let _ = tx.send(());
                return;
            }
        }
    });
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_family_and_layer() {
        let mut c = Counters::default();
        c.events.insert("tcp:inet_sock_set_state", 12);
        c.lost.insert("tcp:inet_sock_set_state".into(), 0);
        c.layers.insert("socket", 5);
        c.opened = 3;
        c.self_cpu_s = 1.5;
        c.self_rss_bytes = 4096;
        c.stolen_s = 0.25;
        let text = prometheus(&c);
        assert!(text.contains("hvprof_events_total{probe=\"tcp:inet_sock_set_state\"} 12"));
        assert!(text.contains("hvprof_cpu_samples_total{layer=\"socket\"} 5"));
        assert!(text.contains("hvprof_cpu_samples_total{layer=\"vmexit\"} 0"));
        assert!(text.contains("hvprof_tcp_connections_total 3"));
        assert!(text.contains("# TYPE hvprof_lost_events_total counter"));
        assert!(text.contains("process_cpu_seconds_total 1.5\n"));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge\n"));
        assert!(text.contains("process_resident_memory_bytes 4096\n"));
        assert!(text.contains("# TYPE hvprof_machine_steal_seconds_total counter\n"));
        assert!(text.contains("hvprof_machine_steal_seconds_total 0.25\n"));
    }

    #[test]
    fn the_view_shows_rates_over_the_interval() {
        let before = Counters::default();
        let mut now = Counters {
            accepted: 500,
            ..Counters::default()
        };
        now.layers.insert("socket", 499);
        now.functions.insert(Arc::from("tcp_v4_rcv"), 7);
        now.self_cpu_s = 0.05;
        let v = render(&now, &before, 1.0, 499, 2);
        assert!(v.contains("hvprof itself   2.5% CPU"), "{v}");
        assert!(v.contains("connections/s       500"), "{v}");
        assert!(v.contains("socket       50.0%"), "{v}");
        assert!(v.contains("tcp_v4_rcv"), "{v}");
        assert!(!v.contains("steal"), "{v}");
        now.stolen_s = 0.3;
        let v = render(&now, &before, 1.0, 499, 2);
        assert!(v.contains("steal        15.0%  ########"), "{v}");
    }
}
