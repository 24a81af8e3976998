//! `hvprof bench`: the seed's benchmark without probes. For each object
//! size, starts the origin and HAProxy where the topology says, drives
//! close-mode load through the proxy (loadgen), and writes
//! `DIR/bench.json` (one result per size), `DIR/bench.md` (a table) and SVG
//! charts like the seed's figures (reports::chart). `--serve` only starts
//! the stand and keeps it up, for other load generators.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use loadgen::size::{self, SizeLabel};
use loadgen::stats::fmt_us;
use loadgen::sweep::{self, PointResult, SweepConfig};
use reports::chart::{Chart, Series, line_chart_svg, palette};

use crate::topology::{Environment, Spec, Up};

/// Object sizes as given on the command line.
#[derive(Debug, Clone)]
pub struct Sizes(pub Vec<u64>);

pub fn parse_sizes(s: &str) -> Result<Sizes, String> {
    size::parse_size_list(s)
        .map(Sizes)
        .map_err(|e| e.to_string())
}

/// Arguments of `hvprof bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Where the proxy runs: `--topology`, repeatable, and its options.
    #[command(flatten)]
    pub topo: crate::topology::TopologyArgs,
    /// Object sizes: comma-separated (0,1k,64k) or `all` for the seed's
    /// 0,1k,2k,4k,8k,16k,32k,48k,64k.
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = parse_sizes)]
    pub sizes: Sizes,
    /// Load duration per size.
    #[arg(short, long, value_name = "DUR", default_value = "5s", value_parser = loadgen::cli::parse_duration)]
    pub duration: Duration,
    /// Connections in flight.
    #[arg(short, long, value_name = "CONC", default_value = "64", value_parser = loadgen::cli::parse_concurrency, allow_hyphen_values = true)]
    pub concurrency: usize,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", default_value = "runs/bench")]
    pub output: PathBuf,
    /// Load generator threads.
    #[arg(short = 't', long, value_name = "N", default_value = "1", value_parser = loadgen::cli::parse_threads)]
    pub client_threads: usize,
    /// HAProxy `nbthread`.
    #[arg(long, value_name = "N", default_value = "1", value_parser = loadgen::cli::parse_threads)]
    pub haproxy_threads: usize,
    /// Origin listener threads.
    #[arg(long, value_name = "N", default_value = "1", value_parser = loadgen::cli::parse_threads)]
    pub origin_threads: usize,
    /// Record every point of the sweep (host probes, and the guest agent in
    /// `vm-*` topologies) into its own run directory, DIR/runs/TOPOLOGY-SIZE,
    /// so a benchmark and its recording come from the same run.
    #[arg(long)]
    pub record: bool,
    /// CPU sampling frequency per CPU when recording, in Hz.
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = crate::paths::cpu::DEFAULT_HZ, value_parser = clap::value_parser!(u64).range(1..=10_000), requires = "record")]
    pub freq: u64,
    /// Only start origin + HAProxy, print the proxy's address, and keep
    /// them up until SIGINT/SIGTERM (to point another load generator at).
    #[arg(long)]
    pub serve: bool,
    /// Name the results and run directories NAME instead of the
    /// topology's name: a variant of a topology (say `native` beside a
    /// noisy neighbour) then compares against plain `native` in one
    /// report (`hvprof report A/runs/* B/runs/*`). One --topology only.
    #[arg(long, value_name = "NAME", value_parser = parse_label)]
    pub label: Option<String>,
}

fn parse_label(s: &str) -> Result<String, String> {
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{s:?}: use letters, digits, '-', '_' or '.' (it names files)"
        ));
    }
    Ok(s.to_string())
}

impl BenchArgs {
    fn sweep_config(&self) -> SweepConfig {
        SweepConfig {
            duration: self.duration,
            concurrency: self.concurrency,
            client_threads: self.client_threads,
            haproxy_threads: self.haproxy_threads,
            origin_threads: self.origin_threads,
            ..SweepConfig::default()
        }
    }

    pub fn run(self) -> anyhow::Result<ExitCode> {
        // Every topology is checked (name, options, availability) before
        // any is created.
        let specs = self.topo.specs()?;
        let config = self.sweep_config();
        if self.serve {
            let [spec] = specs.as_slice() else {
                anyhow::bail!("--serve takes exactly one --topology");
            };
            let up =
                Up::start(spec).with_context(|| format!("bringing up topology {}", spec.name()))?;
            if let Some(ns) = up.client_netns() {
                println!("client namespace {ns}  (ip netns exec {ns} ...)");
            }
            return up.run_inside(|| serve(&up, &config))?;
        }
        std::fs::create_dir_all(&self.output)
            .with_context(|| format!("cannot create output directory {}", self.output.display()))?;
        if self.label.is_some() && specs.len() != 1 {
            anyhow::bail!("--label names one topology's results: give exactly one --topology");
        }
        let mut results = Vec::new();
        let mut envs = Vec::new();
        let mut failed = Vec::new();
        for spec in &specs {
            let record = self.record.then(|| Recording {
                dir: self.output.join("runs"),
                freq: self.freq,
                label: self.label.clone(),
            });
            match run_topology(spec, &config, &self.sizes.0, record.as_ref()) {
                Ok((mut r, env)) => {
                    if let Some(label) = &self.label {
                        for p in &mut r {
                            p.topology.clone_from(label);
                        }
                    }
                    results.extend(r);
                    envs.push(env);
                }
                Err(e) => {
                    eprintln!(
                        "hvprof bench: {}: {}",
                        spec.name(),
                        crate::cli::one_line(&e)
                    );
                    failed.push(spec.name());
                }
            }
        }
        if results.is_empty() {
            anyhow::bail!("no topology completed ({} failed)", failed.join(", "));
        }
        write_outputs(&self.output, &results, &envs)?;
        if envs.len() > 1 {
            print!("{}", comparison_table(&results));
            println!();
        }
        print!("{}", markdown_table(&results));
        let mut files = vec![
            "bench.json",
            "bench.md",
            "bench.svg",
            "conn_per_s.svg",
            "bandwidth.svg",
        ];
        let names = topology_names(&results);
        if names.contains(&"native") && names.len() > 1 {
            files.push("loss.svg");
        }
        eprintln!(
            "hvprof bench: wrote {}",
            files
                .iter()
                .map(|f| self.output.join(f).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !failed.is_empty() {
            eprintln!("hvprof bench: failed: {}", failed.join(", "));
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Brings `spec` up, sweeps the sizes inside it, tears it down (also on
/// error), and returns the results with the environment they ran in.
fn run_topology(
    spec: &Spec,
    config: &SweepConfig,
    sizes: &[u64],
    record: Option<&Recording>,
) -> anyhow::Result<(Vec<PointResult>, Environment)> {
    let t0 = std::time::Instant::now();
    let up = Up::start(spec).with_context(|| format!("bringing up topology {}", spec.name()))?;
    let env = up.environment().clone();
    let vm_note = env
        .vm
        .as_ref()
        .map(|v| {
            format!(
                " ({} guest, {}, booted in {:.1}s)",
                v.guest_driver, v.accel, v.boot_s
            )
        })
        .unwrap_or_default();
    eprintln!(
        "hvprof bench: topology {} up in {:.1}s{vm_note}",
        spec.name(),
        t0.elapsed().as_secs_f64()
    );
    let results = match record {
        None => up.run_inside(|| sweep::run_sweep(&up, config, sizes, true))??,
        Some(rec) => {
            let mut out = Vec::new();
            for &size in sizes {
                out.push(record_point(&up, config, size, rec)?);
            }
            out
        }
    };
    let t1 = std::time::Instant::now();
    up.stop();
    log::info!(
        "topology {} down in {:.1}s",
        spec.name(),
        t1.elapsed().as_secs_f64()
    );
    Ok((results, env))
}

/// Where and how `--record` records.
pub struct Recording {
    pub dir: PathBuf,
    pub freq: u64,
    /// `--label`: the name results and run directories get.
    pub label: Option<String>,
}

/// One point of the sweep with a capture around it: host probes on the
/// topology's devices, and in a guest the agent streaming to a collector
/// on the host side of its TAP. The point's result is stored in the run
/// directory too (`bench-point.json`), so the report needs nothing else.
fn record_point(
    up: &Up,
    config: &SweepConfig,
    size: u64,
    rec: &Recording,
) -> anyhow::Result<PointResult> {
    let name = rec
        .label
        .clone()
        .unwrap_or_else(|| sweep::Topology::name(up).to_string());
    let dir = rec.dir.join(format!(
        "{name}-{}",
        SizeLabel(size).to_string().to_lowercase()
    ));
    std::fs::create_dir_all(&rec.dir)
        .with_context(|| format!("cannot create {}", rec.dir.display()))?;
    let opts = crate::recorder::Options {
        probes: Vec::new(),
        devices: up.host_devices(),
        ringbuf_mib: 16,
        freq: rec.freq,
        load_window: true,
        tasks: Default::default(),
        max_sockets: crate::paths::tcp::DEFAULT_MAX_SOCKETS,
        bpf_stats: false,
        all_tcp_states: false,
    };
    // The stand (origin, HAProxy) comes up before the probes attach, and
    // CPU samples count only between the load's start and end (the
    // recording's window): costs per connection and the CPU the benchmark
    // had are measured over the load alone. The stand lives in one thread
    // (in the client's namespace) from start to stop: HAProxy goes with
    // the thread that started it.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<std::sync::Arc<crate::recorder::Window>>();
    let (point, summary) = std::thread::scope(|s| -> anyhow::Result<_> {
        let load = s.spawn(move || {
            up.run_inside(move || -> Result<Option<PointResult>, sweep::SweepError> {
                let stand = sweep::Stand::start(up, config)?;
                let _ = ready_tx.send(());
                let Ok(window) = go_rx.recv() else {
                    return Ok(None);
                };
                stand
                    .measure_observed(up, config, size, &mut |loading| {
                        if loading {
                            window.open();
                        } else {
                            window.close();
                        }
                    })
                    .map(Some)
            })
        });
        let cap = ready_rx
            .recv()
            .ok()
            .map(|()| start_capture(up, &dir, opts, &name))
            .transpose();
        if let Ok(Some(c)) = &cap {
            let _ = go_tx.send(c.window.clone());
        }
        drop(go_tx);
        let point = match load.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let summary = cap?.map(|c| c.stop()).transpose()?;
        Ok((point??, summary))
    })?;
    let (Some(mut point), Some(summary)) = (point, summary) else {
        anyhow::bail!("{name}: the recording did not start");
    };
    point.topology.clone_from(&name);
    crate::rundir::write_json(&dir.join(crate::rundir::BENCH_POINT), &point)?;
    crate::rundir::write_json(&dir.join(crate::rundir::ENVIRONMENT), up.environment())?;
    eprintln!(
        "{name} size {:>4}: {:>9.0} conn/s {:>9.1} Mbit/s  recorded {} events{} -> {}",
        point.size_label,
        point.conn_per_s,
        point.body_mbps,
        summary.events,
        summary
            .guests
            .iter()
            .map(|g| format!(", {} {} events", g.guest, g.events))
            .collect::<String>(),
        dir.display()
    );
    Ok(point)
}

/// Starts recording `up` into `dir` (host probes with `opts`; in a guest,
/// the agent streaming to a collector on the host side of its TAP, with a
/// fresh token) and returns once both sides have attached.
pub fn start_capture(
    up: &Up,
    dir: &Path,
    opts: crate::recorder::Options,
    name: &str,
) -> anyhow::Result<crate::capture::Background> {
    let mut token = [0u8; 24];
    getrandom::fill(&mut token)
        .map_err(|e| anyhow::anyhow!("no randomness for the agent token: {e}"))?;
    let token: Vec<u8> = token
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes();
    let agents = match up.vm() {
        Some(vm) => {
            let host = vm.host_ip();
            let l = crate::topology::netns::run_in(vm.netns(), move || {
                std::net::TcpListener::bind((host, 0))
            })??;
            Some(l)
        }
        None => None,
    };
    let collector = agents.as_ref().map(|l| l.local_addr()).transpose()?;
    let cap = crate::capture::Background::start(
        dir.to_path_buf(),
        opts,
        name.to_string(),
        agents.map(|l| (l, token.clone())),
    )?;
    if let (Some(vm), Some(addr)) = (up.vm(), collector) {
        vm.start_agent(addr, &token)?;
        // The workload starts once the guest's probes are attached (the
        // agent sends its meta.json right after attaching).
        let t0 = std::time::Instant::now();
        while !dir.join("guest-0").join(crate::rundir::META).exists() {
            if t0.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("{name}: the guest agent did not start: {}", vm.agent_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(cap)
}

fn serve(topology: &dyn sweep::Topology, config: &SweepConfig) -> anyhow::Result<ExitCode> {
    let stand = sweep::Stand::start(topology, config)?;
    let stop = loadgen::cli::StopSignal::install()?;
    println!("proxy http://{}/  (GET /?s=SIZE)", stand.proxy);
    println!("origin http://{}/", stand.origin.local_addr());
    println!("haproxy pid {}", stand.haproxy.pid());
    use std::io::Write as _;
    std::io::stdout().flush()?;
    stop.wait();
    drop(stand);
    Ok(ExitCode::SUCCESS)
}

/// One `bench.json` entry: the result and the topology's environment.
#[derive(serde::Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    point: &'a PointResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<&'a Environment>,
}

/// Writes bench.json (each result with its topology's environment),
/// bench.md and the SVG charts into `dir`.
pub fn write_outputs(
    dir: &Path,
    results: &[PointResult],
    envs: &[Environment],
) -> anyhow::Result<()> {
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
    };
    let rows: Vec<Row> = results
        .iter()
        .map(|point| Row {
            point,
            environment: envs.iter().find(|e| e.topology == point.topology),
        })
        .collect();
    write("bench.json", serde_json::to_string_pretty(&rows)? + "\n")?;
    let mut md = String::new();
    if envs.len() > 1 {
        md.push_str(&comparison_table(results));
        md.push('\n');
    }
    md.push_str(&markdown_table(results));
    if !envs.is_empty() {
        md.push('\n');
        md.push_str(&environment_list(envs));
    }
    write("bench.md", md)?;
    let (both, conn, bw) = charts(results);
    write("bench.svg", both)?;
    write("conn_per_s.svg", conn)?;
    write("bandwidth.svg", bw)?;
    if let Some(loss) = loss_chart(results) {
        write("loss.svg", loss)?;
    }
    Ok(())
}

/// Topologies in result order.
fn topology_names(results: &[PointResult]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.topology.as_str()) {
            names.push(&r.topology);
        }
    }
    names
}

/// The seed's comparison: one row per size, conn/s and Mbit/s per
/// topology, and each topology's loss against `native` (or the first
/// topology when native did not run): `1 − X_T / X_base`.
pub fn comparison_table(results: &[PointResult]) -> String {
    let names = topology_names(results);
    let base = if names.contains(&"native") {
        "native"
    } else {
        names.first().copied().unwrap_or("native")
    };
    let mut sizes: Vec<u64> = results.iter().map(|r| r.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let find = |t: &str, s: u64| results.iter().find(|r| r.topology == t && r.size == s);
    let mut o = String::new();
    let _ = write!(o, "| size |");
    for n in &names {
        if *n == base {
            let _ = write!(o, " {n} conn/s | {n} Mbit/s |");
        } else {
            let _ = write!(o, " {n} conn/s | {n} Mbit/s | {n} loss |");
        }
    }
    o.push('\n');
    o.push_str("|---:|");
    for n in &names {
        o.push_str(if *n == base {
            "---:|---:|"
        } else {
            "---:|---:|---:|"
        });
    }
    o.push('\n');
    for &s in &sizes {
        let _ = write!(o, "| {} |", SizeLabel(s));
        let b = find(base, s).map(|r| r.conn_per_s);
        for n in &names {
            match find(n, s) {
                Some(r) => {
                    let _ = write!(o, " {:.0} | {:.1} |", r.conn_per_s, r.body_mbps);
                    if *n != base {
                        match b {
                            Some(b) if b > 0.0 => {
                                let _ = write!(o, " {:.1}% |", (1.0 - r.conn_per_s / b) * 100.0);
                            }
                            _ => o.push_str(" – |"),
                        }
                    }
                }
                None => o.push_str(if *n == base {
                    " – | – |"
                } else {
                    " – | – | – |"
                }),
            }
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "\nloss = 1 − conn/s(topology) / conn/s({base}) at the same size."
    );
    o
}

/// The seed's "performance loss" figure: loss % against native per
/// size, one line per topology (`None` without native and another one).
pub fn loss_chart(results: &[PointResult]) -> Option<String> {
    let names = topology_names(results);
    if !names.contains(&"native") || names.len() < 2 {
        return None;
    }
    let mut sizes: Vec<u64> = results.iter().map(|r| r.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let base = |s: u64| {
        results
            .iter()
            .find(|r| r.topology == "native" && r.size == s)
            .map(|r| r.conn_per_s)
            .filter(|b| *b > 0.0)
    };
    let mut c = Chart::new(
        "Performance loss against native (connections/s)",
        "object size",
        "loss (%)",
    );
    c.x_ticks = Some(
        sizes
            .iter()
            .map(|&s| (s as f64, SizeLabel(s).to_string()))
            .collect(),
    );
    let series: Vec<Series> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != "native")
        .map(|(i, n)| {
            let pts = results
                .iter()
                .filter(|r| r.topology == *n)
                .filter_map(|r| {
                    base(r.size).map(|b| (r.size as f64, (1.0 - r.conn_per_s / b) * 100.0))
                })
                .collect();
            // The topology's colour in every chart (see `charts`).
            Series::new(*n, pts).color(palette(i))
        })
        .collect();
    Some(line_chart_svg(&c, &series))
}

/// Where each topology ran, as a Markdown list.
fn environment_list(envs: &[Environment]) -> String {
    let mut o = String::from("Environment:\n\n");
    for e in envs {
        let _ = write!(
            o,
            "- **{}**: {}; host kernel {}",
            e.topology, e.path, e.host_kernel
        );
        if let Some(n) = e.nf_rules {
            let _ = write!(o, "; {n} iptables rules + conntrack");
        }
        if let Some(v) = &e.vm {
            let _ = write!(
                o,
                "; QEMU {}, {} ({}), guest kernel {}, {} vCPU, {} MiB, NIC {} → {}, boot {:.1}s",
                v.qemu_version,
                v.accel,
                v.accel_reason,
                v.guest_kernel,
                v.vcpus,
                v.memory_mib,
                v.nic_model,
                v.guest_driver,
                v.boot_s
            );
        }
        o.push('\n');
    }
    o
}

/// The results as a Markdown table.
pub fn markdown_table(results: &[PointResult]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "| topology | size | conn/s | Mbit/s | connect p50 | ttlb p50 | ttlb p99 | ttlb p99.9 | HAProxy CPU s | HAProxy CPU % | HAProxy µs/conn | errors |"
    );
    let _ = writeln!(
        o,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {} |",
            r.topology,
            r.size_label,
            r.conn_per_s,
            r.body_mbps,
            fmt_us(r.latency_us.connect.p50),
            fmt_us(r.latency_us.ttlb.p50),
            fmt_us(r.latency_us.ttlb.p99),
            fmt_us(r.latency_us.ttlb.p999),
            r.haproxy_cpu_s,
            r.haproxy_cpu_util * 100.0,
            r.haproxy_cpu_us_per_conn,
            r.errors.total()
        );
    }
    o
}

/// (conn/s and bandwidth on two axes, conn/s per topology, bandwidth per
/// topology).
pub fn charts(results: &[PointResult]) -> (String, String, String) {
    // A topology has one colour (its index's) in every chart.
    let topologies = topology_names(results);
    let mut sizes: Vec<u64> = results.iter().map(|r| r.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    // Sizes are spread evenly, as categories (like the seed's figures):
    // 0, 1K, 2K and 4K would crowd each other on a linear axis.
    let x_of = |size: u64| sizes.iter().position(|&s| s == size).unwrap_or(0) as f64;
    let x_ticks: Vec<(f64, String)> = sizes
        .iter()
        .map(|&s| (x_of(s), SizeLabel(s).to_string()))
        .collect();
    let points = |t: &str, f: fn(&PointResult) -> f64| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| r.topology == t)
            .map(|r| (x_of(r.size), f(r)))
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let conn = |r: &PointResult| r.conn_per_s;
    let mbps = |r: &PointResult| r.body_mbps;

    let mut both = Chart::new(
        "HTTP connections/s and bandwidth by object size",
        "object size",
        "connections/s",
    );
    both.y2_label = "bandwidth (Mbit/s)".into();
    both.x_ticks = Some(x_ticks.clone());
    let mut both_series = Vec::new();
    for (i, t) in topologies.iter().enumerate() {
        both_series.push(Series::new(format!("{t} conn/s"), points(t, conn)).color(palette(i)));
        both_series.push(
            Series::new(format!("{t} Mbit/s"), points(t, mbps))
                .on_right_axis()
                .dashed()
                .color(palette(i)),
        );
    }

    let mut c = Chart::new(
        "HTTP connections per second",
        "object size",
        "connections/s",
    );
    c.x_ticks = Some(x_ticks.clone());
    let conn_series: Vec<Series> = topologies
        .iter()
        .enumerate()
        .map(|(i, t)| Series::new(*t, points(t, conn)).color(palette(i)))
        .collect();

    let mut b = Chart::new("Bandwidth", "object size", "bandwidth (Mbit/s)");
    b.x_ticks = Some(x_ticks);
    let bw_series: Vec<Series> = topologies
        .iter()
        .enumerate()
        .map(|(i, t)| Series::new(*t, points(t, mbps)).color(palette(i)))
        .collect();

    (
        line_chart_svg(&both, &both_series),
        line_chart_svg(&c, &conn_series),
        line_chart_svg(&b, &bw_series),
    )
}
