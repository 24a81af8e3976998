//! Command-line arguments of `hvprof origin` and `hvprof load` (clap), and
//! their `run()`: argument checking with one-line messages, progress and
//! summary output, `--json`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

use crate::client::{self, LoadConfig, Stop};
use crate::origin::{Origin, OriginConfig};
use crate::reach::{self, Reach};
use crate::stats::LoadReport;
use crate::target::Target;

/// Number of CPUs (at least 1).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn positive(what: &'static str, s: &str) -> Result<u64, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if n >= 1 && n <= u32::MAX as i128 => Ok(n as u64),
        Ok(_) => Err(format!("{what} must be a positive integer, got {s}")),
        Err(_) => Err(format!("{what} must be a positive integer, got '{s}'")),
    }
}

/// Clap value parser: concurrency ≥ 1.
pub fn parse_concurrency(s: &str) -> Result<usize, String> {
    positive("concurrency", s).map(|n| n as usize)
}

/// Clap value parser: thread count ≥ 1.
pub fn parse_threads(s: &str) -> Result<usize, String> {
    positive("thread count", s).map(|n| n as usize)
}

fn parse_count(s: &str) -> Result<u64, String> {
    positive("request count", s)
}

fn parse_reqs_per_conn(s: &str) -> Result<u64, String> {
    positive("requests per connection", s)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "rate must be a positive number of requests per second, got '{s}'"
        )),
    }
}

/// Clap value parser: a human duration (`10s`, `500ms`, `1m`); plain
/// numbers are seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if let Ok(secs) = t.parse::<f64>() {
        if !(secs.is_finite() && secs > 0.0) {
            return Err(format!("duration must be positive, got '{s}'"));
        }
        Duration::from_secs_f64(secs)
    } else {
        humantime::parse_duration(t)
            .map_err(|e| format!("invalid duration '{s}': {e} (e.g. 10s, 500ms, 2m)"))?
    };
    if d.is_zero() {
        return Err(format!("duration must be positive, got '{s}'"));
    }
    Ok(d)
}

/// `hvprof origin`: serve `GET /?s=SIZE` until SIGINT/SIGTERM, then print
/// the totals as one JSON line on stdout.
#[derive(Args, Debug, Clone)]
pub struct OriginArgs {
    /// Address to listen on (port 0 picks a free port; the real address is
    /// printed on stderr).
    #[arg(short, long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Listener threads, each with its own SO_REUSEPORT socket [default:
    /// number of CPUs].
    #[arg(short, long, value_name = "N", value_parser = parse_threads, allow_hyphen_values = true)]
    pub threads: Option<usize>,
}

impl OriginArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let threads = self.threads.unwrap_or_else(cpus);
        let origin = Origin::start(&OriginConfig::new(self.listen, threads))?;
        let stop = StopSignal::install()?;
        eprintln!(
            "hvprof origin: listening on {} ({threads} thread{}); GET /?s=SIZE",
            origin.local_addr(),
            if threads == 1 { "" } else { "s" }
        );
        stop.wait();
        let stats = origin.stop();
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &stats)?;
        writeln!(out)?;
        Ok(ExitCode::SUCCESS)
    }
}

/// `hvprof load`: HTTP load against URL; close mode by default.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Target, http://HOST[:PORT]/PATH (e.g. http://127.0.0.1:8000/?s=1k).
    #[arg(value_name = "URL")]
    pub url: String,
    /// Connections in flight at once.
    #[arg(short, long, value_name = "CONC", default_value = "64", value_parser = parse_concurrency, allow_hyphen_values = true)]
    pub concurrency: usize,
    /// Run for this long (e.g. 10s, 500ms) [default: 10s].
    #[arg(short, long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Send exactly this many requests, then stop.
    #[arg(short = 'n', long = "requests", value_name = "COUNT", value_parser = parse_count, allow_hyphen_values = true)]
    pub requests: Option<u64>,
    /// Requests per TCP connection; 1 (close mode) is the seed's test.
    #[arg(short = 'r', long = "reqs-per-conn", value_name = "REQS_PER_CONN", default_value = "1", value_parser = parse_reqs_per_conn, allow_hyphen_values = true)]
    pub reqs_per_conn: u64,
    /// Open-loop rate, requests per second over all threads (latencies are
    /// measured from each request's due time).
    #[arg(short = 'R', long, value_name = "RATE", value_parser = parse_rate, allow_hyphen_values = true)]
    pub rate: Option<f64>,
    /// Worker threads, each with its own runtime [default: number of CPUs].
    #[arg(short, long, value_name = "THREADS", value_parser = parse_threads, allow_hyphen_values = true)]
    pub threads: Option<usize>,
    /// Give up on one connection after this long.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the result as JSON to FILE (`-` for stdout; the table then
    /// goes to stderr).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress lines.
    #[arg(short, long)]
    pub quiet: bool,
    /// Load a target beyond this host and its own links (one reached
    /// through a gateway, or on the link of the default route). Without
    /// it, only loopback, this host's addresses and links with no default
    /// route on them (hvprof's namespaces and guests) are loaded.
    #[arg(long)]
    pub allow_remote: bool,
}

impl LoadArgs {
    /// The library config these arguments describe.
    pub fn config(&self) -> anyhow::Result<LoadConfig> {
        let target = Target::parse(&self.url)?;
        if !self.allow_remote {
            let ip = target.addr.ip();
            match reach::reach(ip) {
                Ok(Reach::ThisHost | Reach::OwnLink { .. }) => {}
                Ok(Reach::Beyond { why }) => bail!(
                    "{ip} is not on this host or a link of its own: {why}; \
                     pass --allow-remote to load a host you may load"
                ),
                Err(e) => bail!(
                    "cannot tell whether {ip} is on this host ({e}); \
                     pass --allow-remote to load it anyway"
                ),
            }
        }
        let stop = match (self.requests, self.duration) {
            (Some(n), _) => Stop::Count(n),
            (None, Some(d)) => Stop::After(d),
            (None, None) => Stop::After(Duration::from_secs(10)),
        };
        Ok(LoadConfig {
            target,
            concurrency: self.concurrency,
            threads: self.threads.unwrap_or_else(cpus),
            stop,
            requests_per_conn: self.reqs_per_conn,
            rate: self.rate,
            timeout: self.timeout,
        })
    }

    pub fn run(self) -> anyhow::Result<ExitCode> {
        let config = self.config()?;
        let quiet = self.quiet;
        let mut print_progress = |p: &client::Progress| {
            if !quiet {
                eprintln!("{}", p.line());
            }
        };
        let report = client::run(&config, Some(&mut print_progress))?;
        let json_to_stdout = self.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
        if json_to_stdout {
            eprint!("{}", report.table());
        } else {
            print!("{}", report.table());
        }
        if let Some(path) = &self.json {
            write_json(path, &report)?;
        }
        if report.requests == 0 {
            let first = report.first_error.as_deref().unwrap_or("no error recorded");
            let hint = if report.errors.refused > 0 {
                "; is a server listening there?"
            } else {
                ""
            };
            bail!(
                "no request to {} succeeded ({first}){hint}",
                config.target.url
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn write_json(path: &std::path::Path, report: &LoadReport) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(report)?;
    text.push('\n');
    if path.as_os_str() == "-" {
        std::io::stdout().lock().write_all(text.as_bytes())?;
    } else {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// SIGINT and SIGTERM, caught from the moment this is made: for commands
/// that keep servers up until told to stop. Make it before announcing the
/// server, so a stop sent right after the announcement is caught rather
/// than fatal.
pub struct StopSignal {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build signal runtime")?;
        let (term, int) = {
            let _in_rt = rt.enter();
            (
                signal(SignalKind::terminate()).context("cannot catch SIGTERM")?,
                signal(SignalKind::interrupt()).context("cannot catch SIGINT")?,
            )
        };
        Ok(Self { rt, term, int })
    }

    /// Blocks until either signal arrives.
    pub fn wait(mut self) {
        self.rt.block_on(async {
            tokio::select! {
                _ = self.term.recv() => {},
                _ = self.int.recv() => {},
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers() {
        assert_eq!(parse_concurrency("8"), Ok(8));
        assert!(parse_concurrency("0").unwrap_err().contains("concurrency"));
        assert!(parse_concurrency("-1").unwrap_err().contains("positive"));
        assert!(parse_concurrency("x").is_err());
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_rate("0").is_err());
    }
}
