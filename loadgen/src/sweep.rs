//! The seed's benchmark, one object size at a time: a [`Topology`] says
//! where the origin and HAProxy run and which address the client uses; a
//! [`Stand`] is origin + HAProxy up and ready; [`run_point`] starts a
//! stand, drives close-mode load through the proxy for one size, and
//! returns a [`PointResult`] (rates, latencies, HAProxy CPU time and
//! counters).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{self, LoadConfig, Stop};
use crate::haproxy::{self, Haproxy, HaproxyConfig, Launcher};
use crate::origin::{Origin, OriginConfig};
use crate::size::SizeLabel;
use crate::stats::{ErrorCounts, LatencySummary};
use crate::target::Target;

/// Why a sweep point failed.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("unknown topology '{0}' (available: {available})", available = TOPOLOGIES.join(", "))]
    UnknownTopology(String),
    #[error("cannot pick a free port on {0}: {1}")]
    Port(Ipv4Addr, std::io::Error),
    #[error("origin: {0}")]
    Origin(#[from] crate::origin::OriginError),
    #[error("haproxy: {0}")]
    Haproxy(#[from] haproxy::HaproxyError),
    #[error("load: {0}")]
    Load(#[from] client::LoadError),
    #[error("target: {0}")]
    Target(#[from] crate::target::TargetError),
    #[error("no request succeeded at size {size} through {url}: {detail}")]
    NothingServed {
        size: String,
        url: String,
        detail: String,
    },
}

/// Topology names this build knows.
pub const TOPOLOGIES: &[&str] = &["native"];

/// Where the pieces of a benchmark run. Later topologies (veth, bridge,
/// VMs) put HAProxy elsewhere by supplying a different launcher and
/// addresses.
pub trait Topology {
    /// Name used on the command line and in results.
    fn name(&self) -> &str;
    /// How HAProxy is started (natively, in a namespace, in a VM).
    fn launcher(&self) -> &dyn Launcher;
    /// Where the origin listens (port 0: any free port).
    fn origin_listen(&self) -> SocketAddr;
    /// Where HAProxy's frontend listens; also the address the client
    /// connects to (for now the same).
    fn proxy_frontend(&self) -> Result<SocketAddr, SweepError>;
    /// The address HAProxy uses to reach the origin listening on `origin`.
    fn backend_for(&self, origin: SocketAddr) -> SocketAddr {
        origin
    }
}

/// Everything on loopback, HAProxy run directly.
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeTopology {
    launcher: haproxy::Native,
}

impl Topology for NativeTopology {
    fn name(&self) -> &str {
        "native"
    }
    fn launcher(&self) -> &dyn Launcher {
        &self.launcher
    }
    fn origin_listen(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }
    fn proxy_frontend(&self) -> Result<SocketAddr, SweepError> {
        free_port(Ipv4Addr::LOCALHOST)
    }
}

/// The topology called `name`.
pub fn topology(name: &str) -> Result<Box<dyn Topology>, SweepError> {
    match name {
        "native" => Ok(Box::new(NativeTopology::default())),
        other => Err(SweepError::UnknownTopology(other.to_string())),
    }
}

/// A currently free TCP port on `ip` (bound then released).
pub fn free_port(ip: Ipv4Addr) -> Result<SocketAddr, SweepError> {
    let l = TcpListener::bind((ip, 0)).map_err(|e| SweepError::Port(ip, e))?;
    l.local_addr().map_err(|e| SweepError::Port(ip, e))
}

/// Knobs of a sweep.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Load duration per size.
    pub duration: Duration,
    pub concurrency: usize,
    pub client_threads: usize,
    pub haproxy_threads: usize,
    pub origin_threads: usize,
    pub timeout: Duration,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            concurrency: 64,
            client_threads: 1,
            haproxy_threads: 1,
            origin_threads: 1,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Origin and HAProxy, up and ready.
pub struct Stand {
    pub origin: Origin,
    pub haproxy: Haproxy,
    /// The address clients connect to.
    pub proxy: SocketAddr,
}

impl Stand {
    /// Starts the origin, then HAProxy in front of it.
    pub fn start(topology: &dyn Topology, config: &SweepConfig) -> Result<Self, SweepError> {
        let origin = Origin::start(&OriginConfig::new(
            topology.origin_listen(),
            config.origin_threads.max(1),
        ))?;
        let frontend = topology.proxy_frontend()?;
        let hc = HaproxyConfig::new(
            frontend,
            topology.backend_for(origin.local_addr()),
            config.haproxy_threads,
        )?;
        let haproxy = Haproxy::start(&hc, topology.launcher())?;
        Ok(Self {
            origin,
            haproxy,
            proxy: frontend,
        })
    }

    /// The URL of an object of `size` bytes through the proxy.
    pub fn url(&self, size: u64) -> String {
        format!(
            "http://{}/?s={}",
            self.proxy,
            SizeLabel(size).to_string().to_lowercase()
        )
    }
}

/// One size's result, as written to `bench.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointResult {
    pub topology: String,
    /// Object size in bytes.
    pub size: u64,
    pub size_label: String,
    pub conn_per_s: f64,
    pub req_per_s: f64,
    pub body_mbps: f64,
    pub connections: u64,
    pub requests: u64,
    pub duration_s: f64,
    pub errors: ErrorCounts,
    pub latency_us: LatencySummary,
    /// HAProxy user + system CPU seconds during the load.
    pub haproxy_cpu_s: f64,
    /// `haproxy_cpu_s / duration_s` (1.0 = one core busy).
    pub haproxy_cpu_util: f64,
    /// HAProxy CPU per connection, microseconds.
    pub haproxy_cpu_us_per_conn: f64,
    pub haproxy: haproxy::Counters,
    /// Connections the origin accepted (should equal HAProxy's backend
    /// sessions: one request per connection on that side too).
    pub origin_connections: u64,
    pub origin_requests: u64,
    pub concurrency: usize,
    pub client_threads: usize,
    pub haproxy_threads: usize,
}

/// Starts a stand, loads it at `size` for `config.duration`, stops it.
pub fn run_point(
    topology: &dyn Topology,
    config: &SweepConfig,
    size: u64,
) -> Result<PointResult, SweepError> {
    Stand::start(topology, config)?.measure(topology, config, size)
}

impl Stand {
    /// Loads the stand at `size` for `config.duration`, then stops it.
    pub fn measure(
        self,
        topology: &dyn Topology,
        config: &SweepConfig,
        size: u64,
    ) -> Result<PointResult, SweepError> {
        self.measure_observed(topology, config, size, &mut |_| {})
    }

    /// [`Stand::measure`], telling `on_load` when the load starts (`true`)
    /// and ends (`false`), so that a recording can count that window alone.
    pub fn measure_observed(
        self,
        topology: &dyn Topology,
        config: &SweepConfig,
        size: u64,
        on_load: &mut dyn FnMut(bool),
    ) -> Result<PointResult, SweepError> {
        let stand = self;
        let url = stand.url(size);
        let target = Target::parse(&url)?;
        let load = LoadConfig {
            target,
            concurrency: config.concurrency,
            threads: config.client_threads,
            stop: Stop::After(config.duration),
            requests_per_conn: 1,
            rate: None,
            timeout: config.timeout,
        };
        let cpu0 = stand.haproxy.cpu_time()?;
        on_load(true);
        let report = client::run(&load, None);
        on_load(false);
        let report = report?;
        let cpu1 = stand.haproxy.cpu_time()?;
        let counters = stand.haproxy.counters()?;
        let Stand {
            origin, haproxy, ..
        } = stand;
        haproxy.stop();
        let ostats = origin.stop();
        if report.requests == 0 {
            return Err(SweepError::NothingServed {
                size: SizeLabel(size).to_string(),
                url,
                detail: report
                    .first_error
                    .unwrap_or_else(|| "no error recorded".into()),
            });
        }
        let cpu = cpu1.saturating_sub(cpu0).as_secs_f64();
        Ok(PointResult {
            topology: topology.name().to_string(),
            size,
            size_label: SizeLabel(size).to_string(),
            conn_per_s: report.conn_per_s,
            req_per_s: report.req_per_s,
            body_mbps: report.body_mbps,
            connections: report.connections,
            requests: report.requests,
            duration_s: report.duration_s,
            errors: report.errors,
            latency_us: report.latency_us,
            haproxy_cpu_s: cpu,
            haproxy_cpu_util: cpu / report.duration_s.max(1e-9),
            haproxy_cpu_us_per_conn: if report.connections > 0 {
                cpu * 1e6 / report.connections as f64
            } else {
                0.0
            },
            haproxy: counters,
            origin_connections: ostats.connections,
            origin_requests: ostats.requests,
            concurrency: report.concurrency,
            client_threads: report.threads,
            haproxy_threads: config.haproxy_threads,
        })
    }
}

/// Runs `sizes` one after the other. With `progress`, shows a bar over the
/// sweep on stderr (a plain line per size when stderr is not a terminal).
pub fn run_sweep(
    topology: &dyn Topology,
    config: &SweepConfig,
    sizes: &[u64],
    progress: bool,
) -> Result<Vec<PointResult>, SweepError> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = if progress {
        ProgressBar::with_draw_target(Some(sizes.len() as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    let plain = progress && bar.is_hidden();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut results = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        bar.set_message(format!("{}: size {}", topology.name(), SizeLabel(size)));
        let r = run_point(topology, config, size);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        let line = format!(
            "{} size {:>4}: {:>9.0} conn/s {:>9.1} Mbit/s  ttlb p99 {}  haproxy CPU {:.2} s ({:.0}%)  errors {}",
            r.topology,
            r.size_label,
            r.conn_per_s,
            r.body_mbps,
            crate::stats::fmt_us(r.latency_us.ttlb.p99),
            r.haproxy_cpu_s,
            r.haproxy_cpu_util * 100.0,
            r.errors.total()
        );
        if plain {
            eprintln!("[{}/{}] {line}", i + 1, sizes.len());
        } else {
            bar.println(line);
        }
        bar.inc(1);
        results.push(r);
    }
    bar.finish_and_clear();
    Ok(results)
}
