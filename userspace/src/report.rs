//! `hvprof report`: turns run directories into what people read — per
//! run, CPU per layer and per connection (from CPU samples), the busiest
//! execution contexts and the bottleneck (from in-kernel scheduler
//! accounting), connection latency (from the timelines), and a flamegraph
//! coloured by layer. Writes `index.html` (opens from file://, no
//! network), `report.json` and `summary.md`. Reads only the run
//! directories, so a report can always be regenerated.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::{
    catalog::Layer,
    classify::{Classifier, thread_comm},
    paths::sched::SchedSnapshot,
    rundir::{self, meta::Meta},
    timeline::Timeline,
};

/// Build flamegraphs and per-layer breakdowns from run directories.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run directories written by `hvprof record`.
    #[arg(value_name = "RUN", required = true)]
    pub runs: Vec<PathBuf>,
    /// Output directory for index.html, report.json, summary.md and SVGs.
    #[arg(short, long, value_name = "DIR", default_value = "report")]
    pub output: PathBuf,
}

pub const FORMAT: &str = "hvprof-report";
pub const VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: &'static str,
    pub version: u32,
    /// Per topology and object size: the loss against native explained
    /// layer by layer (runs recorded with `hvprof bench --record`).
    pub topologies: Vec<TopologyReport>,
    /// Every run directory analysed on its own.
    pub runs: Vec<RunReport>,
}

#[derive(Debug, Serialize)]
pub struct TopologyReport {
    pub name: String,
    pub sizes: Vec<SizeReport>,
}

#[derive(Debug, Serialize)]
pub struct SizeReport {
    pub size: u64,
    pub conn_per_s: f64,
    pub body_mbps: f64,
    /// Against native at the same size; 0 for native itself.
    pub loss_pct: f64,
    pub predicted_loss_pct: f64,
    pub residual_pct: f64,
    /// |residual| > 5 points: the layer costs do not explain the loss.
    pub residual_flagged: bool,
    pub bottleneck: String,
    pub emulation_factor: Option<f64>,
    pub layers: Vec<SizeLayer>,
    pub flamegraph: Option<String>,
    pub diff_flamegraph: Option<String>,
    pub run: String,
}

#[derive(Debug, Serialize)]
pub struct SizeLayer {
    pub layer: &'static str,
    pub cpu_us_per_conn: f64,
    pub native_cpu_us_per_conn: f64,
    pub loss_points: f64,
    pub latency_us_p50: Option<f64>,
    pub latency_us_p99: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub count: usize,
}

#[derive(Debug, Serialize)]
pub struct LayerCost {
    pub layer: &'static str,
    pub samples: u64,
    pub cpu_ms: f64,
    /// CPU time per completed connection, µs.
    pub cpu_us_per_conn: f64,
    /// Share of all sampled CPU time, %.
    pub share_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct ThreadReport {
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    pub layer: &'static str,
    /// On-CPU time over the recording, % of one CPU.
    pub busy_pct: f64,
    pub runq_ms: f64,
    /// Run-queue delay (runnable, waiting for a CPU) over the recording, %.
    pub runq_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub name: String,
    pub dir: String,
    pub topology: String,
    pub kernel: String,
    pub duration_s: f64,
    pub connections: usize,
    pub conn_per_s: f64,
    pub events: u64,
    pub lost: BTreeMap<String, u64>,
    pub samples: u64,
    pub sample_hz: u64,
    pub layers: Vec<LayerCost>,
    pub threads: Vec<ThreadReport>,
    pub cpu_idle_pct: Option<f64>,
    /// The share of the CPUs' time the hypervisor under the machine took
    /// (`summary.json`'s steal).
    pub cpu_steal_pct: Option<f64>,
    pub bottleneck: String,
    /// SYN → established, and established → fully closed, per connection.
    pub latency_us: BTreeMap<&'static str, Percentiles>,
    pub flamegraph: Option<String>,
    pub folded: Option<String>,
    pub probes_attached: Vec<String>,
}

impl ReportArgs {
    pub fn run(self) -> Result<ExitCode> {
        std::fs::create_dir_all(&self.output).with_context(|| {
            format!(
                "cannot create report directory {}; pick a writable -o",
                self.output.display()
            )
        })?;
        let dirs = expand(&self.runs)?;
        check_runs(&dirs)?;
        let classifier = Classifier::new();
        let mut runs = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            eprintln!("hvprof: analysing {}", dir.display());
            runs.push(analyse(dir, i, &self.output, &classifier)?);
        }
        let topologies = explain(&dirs, &runs, &self.output, &classifier)?;
        let report = Report {
            format: FORMAT,
            version: VERSION,
            topologies,
            runs,
        };
        let charts = write_charts(&dirs, &self.output)?;
        rundir::write_json(&self.output.join("report.json"), &report)?;
        let md = markdown(&report);
        std::fs::write(self.output.join("summary.md"), &md)?;
        std::fs::write(self.output.join("index.html"), html(&report, &charts))?;
        print!("{md}");
        println!("report: {}", self.output.join("index.html").display());
        Ok(ExitCode::SUCCESS)
    }
}

fn analyse(dir: &Path, index: usize, out: &Path, classifier: &Classifier) -> Result<RunReport> {
    let meta: Meta = rundir::open(dir)?;
    let tl = Timeline::read(dir)?;
    let duration_s = meta.duration_s.unwrap_or(0.0);
    // The scheduler's per-thread figures cover the whole recording, which
    // can be longer than the window samples are counted over.
    let span_s = meta
        .ended_unix_ns
        .map(|e| e.saturating_sub(meta.started_unix_ns) as f64 / 1e9)
        .filter(|s| *s > 0.0)
        .unwrap_or(duration_s);
    let connections = tl
        .connections
        .iter()
        .filter(|c| c.established_ns.is_some())
        .count();
    let name = dir.file_name().map_or_else(
        || format!("run{index}"),
        |n| n.to_string_lossy().into_owned(),
    );

    // CPU samples per layer.
    let folded_path = dir.join(rundir::STACKS);
    let lines: Vec<String> = match std::fs::read_to_string(&folded_path) {
        Ok(t) => t.lines().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    };
    let hz = meta.sample_hz.unwrap_or(crate::paths::cpu::DEFAULT_HZ);
    let mut per_layer: BTreeMap<Layer, u64> = BTreeMap::new();
    let mut frame_layers: HashMap<String, String> = HashMap::new();
    let mut samples = 0u64;
    for line in &lines {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let frames: Vec<&str> = stack.split(';').collect();
        *per_layer.entry(classifier.stack(&frames)).or_insert(0) += n;
        samples += n;
        for f in &frames[1..] {
            if let Some(l) = classifier.frame(f) {
                frame_layers
                    .entry((*f).to_string())
                    .or_insert_with(|| l.name().into());
            }
        }
        if let Some(head) = frames.first()
            && let Some(l) = Classifier::thread(thread_comm(head))
        {
            frame_layers
                .entry((*head).to_string())
                .or_insert_with(|| l.name().into());
        }
    }
    let layers = Layer::ALL
        .iter()
        .map(|l| {
            let s = per_layer.get(l).copied().unwrap_or(0);
            let cpu_ms = s as f64 * 1000.0 / hz as f64;
            LayerCost {
                layer: l.name(),
                samples: s,
                cpu_ms,
                cpu_us_per_conn: if connections > 0 {
                    cpu_ms * 1000.0 / connections as f64
                } else {
                    0.0
                },
                share_pct: if samples > 0 {
                    100.0 * s as f64 / samples as f64
                } else {
                    0.0
                },
            }
        })
        .collect();

    // Threads and the bottleneck.
    let sched: Option<SchedSnapshot> = std::fs::read(dir.join(rundir::THREADS))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut threads = Vec::new();
    let mut cpu_idle_pct = None;
    if let Some(s) = &sched {
        for t in s.threads.iter().take(20) {
            threads.push(ThreadReport {
                tid: t.tid,
                pid: t.pid,
                comm: t.comm.clone(),
                layer: Classifier::thread(&t.comm).unwrap_or(Layer::Other).name(),
                busy_pct: pct(t.oncpu_ns as f64 / 1e9, span_s),
                runq_ms: t.runq_ns as f64 / 1e6,
                runq_pct: pct(t.runq_ns as f64 / 1e9, span_s),
            });
        }
        if !s.cpu_idle_ns.is_empty() && span_s > 0.0 {
            let idle: u64 = s.cpu_idle_ns.values().sum();
            cpu_idle_pct = Some(pct(idle as f64 / 1e9, span_s * s.cpu_idle_ns.len() as f64));
        }
    }
    let cpu_steal_pct = rundir::summary(dir).and_then(|s| s["steal"]["pct"].as_f64());
    let bottleneck = bottleneck(&threads, cpu_idle_pct, cpu_steal_pct);

    // Connection latency.
    let mut connect = Vec::new();
    let mut lifetime = Vec::new();
    for c in &tl.connections {
        if let (Some(s), Some(e)) = (c.syn_ns, c.established_ns) {
            connect.push(e.saturating_sub(s) as f64 / 1000.0);
        }
        if let (Some(e), Some(x)) = (c.established_ns, c.close_ns) {
            lifetime.push(x.saturating_sub(e) as f64 / 1000.0);
        }
    }
    let mut latency_us = BTreeMap::new();
    latency_us.insert("connect", percentiles(&mut connect));
    latency_us.insert("established_to_close", percentiles(&mut lifetime));

    // Flamegraph.
    let (mut flamegraph, mut folded) = (None, None);
    if !lines.is_empty() {
        let svg = format!("flame-{index}-{name}.svg");
        let fold = format!("flame-{index}-{name}.folded");
        std::fs::write(out.join(&fold), lines.join("\n") + "\n")?;
        let file = std::fs::File::create(out.join(&svg))
            .with_context(|| format!("creating {}", out.join(&svg).display()))?;
        let subtitle =
            format!("{samples} samples at {hz} Hz, {connections} connections; colour = layer");
        reports::flamegraph::render(
            &lines,
            &reports::flamegraph::FlameOptions {
                title: &format!("{name} ({})", meta.topology),
                subtitle: Some(&subtitle),
                count_name: "samples",
                frame_layers: &frame_layers,
            },
            std::io::BufWriter::new(file),
        )
        .with_context(|| format!("drawing the flamegraph of {}", dir.display()))?;
        flamegraph = Some(svg);
        folded = Some(fold);
    }

    Ok(RunReport {
        name,
        dir: dir.display().to_string(),
        topology: meta.topology.clone(),
        kernel: meta.kernel.clone(),
        duration_s,
        connections,
        conn_per_s: if duration_s > 0.0 {
            connections as f64 / duration_s
        } else {
            0.0
        },
        events: tl.events,
        lost: meta.lost.clone(),
        samples,
        sample_hz: hz,
        layers,
        threads,
        cpu_idle_pct,
        cpu_steal_pct,
        bottleneck,
        latency_us,
        flamegraph,
        folded,
        probes_attached: meta
            .probes
            .iter()
            .filter(|p| p.obtained.is_some())
            .map(|p| format!("{} ({})", p.name, p.obtained.as_deref().unwrap_or("")))
            .collect(),
    })
}

/// Run directories named directly, or below a `bench --record` output
/// (`DIR/runs/*`).
fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        let runs = a.join("runs");
        if !a.join(rundir::META).exists() && runs.is_dir() {
            let mut sub: Vec<PathBuf> = std::fs::read_dir(&runs)
                .with_context(|| format!("reading {}", runs.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join(rundir::META).exists())
                .collect();
            sub.sort();
            out.extend(sub);
        } else {
            out.push(a.clone());
        }
    }
    Ok(out)
}

/// Folded stacks of a run and its guests, scaled to integer counts per
/// `per` connections, each stack's root frame marked `[host]` or
/// `[guest]`.
fn scaled_folded(dir: &Path, connections: u64, per: f64) -> Vec<String> {
    let k = per / connections.max(1) as f64;
    let mut sources = vec![("[host]", dir.to_path_buf())];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut guests: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("guest-"))
            .map(|e| e.path())
            .collect();
        guests.sort();
        sources.extend(guests.into_iter().map(|g| ("[guest]", g)));
    }
    let mut out = Vec::new();
    for (origin, d) in sources {
        let Ok(text) = std::fs::read_to_string(d.join(rundir::STACKS)) else {
            continue;
        };
        out.extend(text.lines().filter_map(|l| {
            let (stack, n) = l.rsplit_once(' ')?;
            let n = (n.parse::<f64>().ok()? * k).round() as u64;
            (n > 0).then(|| format!("{origin} {stack} {n}"))
        }));
    }
    out
}

/// A root frame without its `[host]`/`[guest]` mark.
fn unmarked(frame: &str) -> &str {
    frame
        .strip_prefix("[host] ")
        .or_else(|| frame.strip_prefix("[guest] "))
        .unwrap_or(frame)
}

/// The loss of every recorded topology against native, per size.
fn explain(
    dirs: &[PathBuf],
    runs: &[RunReport],
    out: &Path,
    c: &Classifier,
) -> Result<Vec<TopologyReport>> {
    use crate::attribution::{self, PointCosts};
    let recorded: Vec<(&PathBuf, &RunReport)> = dirs
        .iter()
        .zip(runs)
        .filter(|(d, _)| d.join(rundir::BENCH_POINT).exists())
        .collect();
    // Native first: the guests' emulation factor is measured against it.
    let mut native: BTreeMap<u64, (PointCosts, &PathBuf)> = BTreeMap::new();
    for (d, _) in &recorded {
        let p = attribution::point_costs(d, c, None)?;
        if p.topology == "native" {
            native.insert(p.size, (p, d));
        }
    }
    let mut by_topology: BTreeMap<String, Vec<SizeReport>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (d, run) in &recorded {
        let probe = attribution::point_costs(d, c, None)?;
        let n = native.get(&probe.size);
        let t = attribution::point_costs(d, c, n.map(|(p, _)| p))?;
        let a = n.map(|(np, _)| attribution::attribute(&t, np));
        let summary = rundir::summary(d);
        let one_way = |p: &serde_json::Value| {
            Some((p["one_way_us_p50"].as_f64()?, p["one_way_us_p99"].as_f64()?))
        };
        let vnic_lat = summary
            .as_ref()
            .and_then(|s| one_way(&s["guests"][0]["packets"]));
        let switch_lat = summary.as_ref().and_then(|s| one_way(&s["crossing"]));
        let layers = Layer::ALL
            .iter()
            .map(|l| {
                let share = a
                    .as_ref()
                    .and_then(|a| a.layers.iter().find(|x| x.layer == l.name()));
                let (p50, p99) = match l {
                    Layer::Socket => run
                        .latency_us
                        .get("connect")
                        .map(|p| (p.p50, p.p99))
                        .unzip(),
                    Layer::Vnic => vnic_lat.unzip(),
                    Layer::Switch => switch_lat.unzip(),
                    _ => (None, None),
                };
                SizeLayer {
                    layer: l.name(),
                    cpu_us_per_conn: t.cpu_us_per_conn.get(l.name()).copied().unwrap_or(0.0),
                    native_cpu_us_per_conn: n
                        .and_then(|(np, _)| np.cpu_us_per_conn.get(l.name()).copied())
                        .unwrap_or(0.0),
                    loss_points: share.map_or(0.0, |x| x.loss_points),
                    latency_us_p50: p50,
                    latency_us_p99: p99,
                }
            })
            .collect();
        // Flamegraphs per 1000 connections, and against native.
        let label = format!(
            "{}-{}",
            t.topology,
            loadgen::size::SizeLabel(t.size).to_string().to_lowercase()
        );
        let lines = scaled_folded(d, t.connections, 1000.0);
        let mut flamegraph = None;
        let mut diff_flamegraph = None;
        if !lines.is_empty() {
            let name = format!("flame-{label}-per1000.svg");
            std::fs::write(
                out.join(format!("flame-{label}-per1000.folded")),
                lines.join("\n") + "\n",
            )?;
            let mut frame_layers = HashMap::new();
            for line in &lines {
                let stack = line.rsplit_once(' ').map_or(line.as_str(), |(s, _)| s);
                for f in stack.split(';') {
                    if let Some(l) = c
                        .frame(f)
                        .or_else(|| Classifier::thread(thread_comm(unmarked(f))))
                    {
                        frame_layers
                            .entry(f.to_string())
                            .or_insert_with(|| l.name().to_string());
                    }
                }
            }
            let subtitle = format!(
                "{} — CPU samples per 1000 connections; colour = layer",
                t.topology
            );
            reports::flamegraph::render(
                &lines,
                &reports::flamegraph::FlameOptions {
                    title: &format!("{} at {}", t.topology, loadgen::size::SizeLabel(t.size)),
                    subtitle: Some(&subtitle),
                    count_name: "samples per 1000 connections",
                    frame_layers: &frame_layers,
                },
                std::io::BufWriter::new(std::fs::File::create(out.join(&name))?),
            )?;
            flamegraph = Some(name);
            if let Some((np, nd)) = n.filter(|(np, _)| np.topology != t.topology) {
                let before = scaled_folded(nd, np.connections, 1000.0);
                let dname = format!("diff-{label}-vs-native.svg");
                reports::flamegraph::render_diff(
                    &before,
                    &lines,
                    &format!(
                        "{} vs native at {} (red: more CPU per connection)",
                        t.topology,
                        loadgen::size::SizeLabel(t.size)
                    ),
                    std::io::BufWriter::new(std::fs::File::create(out.join(&dname))?),
                )?;
                diff_flamegraph = Some(dname);
            }
        }
        if !order.contains(&t.topology) {
            order.push(t.topology.clone());
        }
        by_topology
            .entry(t.topology.clone())
            .or_default()
            .push(SizeReport {
                size: t.size,
                conn_per_s: t.conn_per_s,
                body_mbps: t.body_mbps,
                loss_pct: a.as_ref().map_or(0.0, |a| a.loss_pct),
                predicted_loss_pct: a.as_ref().map_or(0.0, |a| a.predicted_loss_pct),
                residual_pct: a.as_ref().map_or(0.0, |a| a.residual_pct),
                residual_flagged: a.as_ref().is_some_and(|a| a.residual_flagged),
                bottleneck: run.bottleneck.clone(),
                emulation_factor: t.emulation_factor,
                layers,
                flamegraph,
                diff_flamegraph,
                run: d.display().to_string(),
            });
    }
    // native first, then as recorded.
    order.sort_by_key(|n| n != "native");
    Ok(order
        .into_iter()
        .map(|name| {
            let mut sizes = by_topology.remove(&name).unwrap_or_default();
            sizes.sort_by_key(|s| s.size);
            TopologyReport { name, sizes }
        })
        .collect())
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

fn percentiles(v: &mut [f64]) -> Percentiles {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Percentiles {
        p50: at(0.5),
        p99: at(0.99),
        count: v.len(),
    }
}

/// "haproxy thread 1234 98% busy (proxy), 1% waiting for a CPU; load
/// generator load-0 71%; CPUs 3% idle, 20% stolen by the hypervisor". The
/// bottleneck is a thread of the system under test (proxy, QEMU, softirq):
/// another program's thread is contention, not the bottleneck.
fn bottleneck(threads: &[ThreadReport], idle: Option<f64>, stolen: Option<f64>) -> String {
    let mut parts = Vec::new();
    let busiest = |keep: &dyn Fn(&ThreadReport) -> bool| {
        threads
            .iter()
            .filter(|t| keep(t))
            .max_by(|a, b| a.busy_pct.total_cmp(&b.busy_pct))
    };
    let sut = busiest(&|t| t.layer != "loadgen" && t.layer != "other")
        .or_else(|| busiest(&|t| t.layer != "loadgen"));
    if let Some(t) = sut {
        parts.push(format!(
            "{} thread {} {:.0}% busy ({}), {:.0}% waiting for a CPU",
            t.comm, t.tid, t.busy_pct, t.layer, t.runq_pct
        ));
    }
    if let Some(t) = busiest(&|t| t.layer == "loadgen") {
        parts.push(format!("load generator {} {:.0}%", t.comm, t.busy_pct));
    }
    match (idle, stolen.filter(|s| *s >= 0.5)) {
        (Some(i), Some(s)) => parts.push(format!(
            "CPUs {i:.0}% idle, {s:.0}% stolen by the hypervisor"
        )),
        (Some(i), None) => parts.push(format!("CPUs {i:.0}% idle")),
        (None, Some(s)) => parts.push(format!("CPUs {s:.0}% stolen by the hypervisor")),
        (None, None) => {}
    }
    if parts.is_empty() {
        "no scheduler data (sched probes not attached)".into()
    } else {
        parts.join("; ")
    }
}

/// The seed-style charts from the recorded benchmark points: (file, SVG).
fn write_charts(dirs: &[PathBuf], out: &Path) -> Result<Vec<(String, String)>> {
    let points: Vec<loadgen::sweep::PointResult> = dirs
        .iter()
        .filter_map(|d| std::fs::read(d.join(rundir::BENCH_POINT)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    if points.is_empty() {
        return Ok(Vec::new());
    }
    let (_, conn, bw) = crate::bench::charts(&points);
    let mut charts = vec![
        ("conn_per_s.svg".to_string(), conn),
        ("bandwidth.svg".to_string(), bw),
    ];
    if let Some(loss) = crate::bench::loss_chart(&points) {
        charts.push(("loss.svg".to_string(), loss));
    }
    for (name, svg) in &charts {
        std::fs::write(out.join(name), svg)?;
    }
    Ok(charts)
}

fn markdown(r: &Report) -> String {
    let mut s = String::from("# hvprof report\n");
    if !r.topologies.is_empty() {
        s.push_str("\n## Loss against native, explained\n\n| topology | size | conn/s | Mbit/s | measured loss % | predicted loss % | residual (points) | main layers (points) | bottleneck |\n|---|---:|---:|---:|---:|---:|---:|---|---|\n");
        for t in &r.topologies {
            for z in &t.sizes {
                let mut top: Vec<&SizeLayer> = z
                    .layers
                    .iter()
                    .filter(|l| l.loss_points.abs() >= 0.5)
                    .collect();
                top.sort_by(|a, b| b.loss_points.abs().total_cmp(&a.loss_points.abs()));
                let layers = top
                    .iter()
                    .take(4)
                    .map(|l| format!("{} {:+.1}", l.layer, l.loss_points))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:+.1}{} | {} | {} |",
                    t.name,
                    loadgen::size::SizeLabel(z.size),
                    z.conn_per_s,
                    z.body_mbps,
                    z.loss_pct,
                    z.predicted_loss_pct,
                    z.residual_pct,
                    if z.residual_flagged {
                        " ⚠ RESIDUAL > 5"
                    } else {
                        ""
                    },
                    layers,
                    z.bottleneck
                );
            }
        }
    }
    for run in &r.runs {
        let _ = writeln!(s, "\n## {} — topology `{}`\n", run.name, run.topology);
        let _ = writeln!(
            s,
            "{} connections in {:.2} s ({:.0} conn/s); {} events, {} CPU samples at {} Hz; kernel {}",
            run.connections,
            run.duration_s,
            run.conn_per_s,
            run.events,
            run.samples,
            run.sample_hz,
            run.kernel
        );
        let lost: u64 = run.lost.values().sum();
        let _ = writeln!(s, "\n**Bottleneck:** {}  ", run.bottleneck);
        let _ = writeln!(s, "**Lost events:** {lost}\n");
        s.push_str("| layer | CPU ms | µs per connection | share % |\n|---|---:|---:|---:|\n");
        for l in run.layers.iter().filter(|l| l.samples > 0) {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.2} | {:.1} |",
                l.layer, l.cpu_ms, l.cpu_us_per_conn, l.share_pct
            );
        }
        s.push_str("\n| latency | p50 µs | p99 µs | n |\n|---|---:|---:|---:|\n");
        for (k, p) in &run.latency_us {
            let _ = writeln!(s, "| {k} | {:.1} | {:.1} | {} |", p.p50, p.p99, p.count);
        }
        s.push_str(
            "\n| thread | tid | layer | busy % | run-queue ms |\n|---|---:|---|---:|---:|\n",
        );
        for t in run.threads.iter().take(8) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} |",
                t.comm, t.tid, t.layer, t.busy_pct, t.runq_ms
            );
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(r: &Report, charts: &[(String, String)]) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>hvprof report</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}\
         .sw{display:inline-block;width:1em;height:1em;margin-right:4px;vertical-align:middle}\
         .bar{display:flex;height:24px;width:100%;margin:8px 0}.bar div{height:100%}\
         object{width:100%;border:1px solid #ddd}.stacked{height:16px;background:#f4f4f4}td.flag{color:#c0392b;font-weight:bold}\
         figure.chart{display:inline-block;margin:0 1em 1em 0}</style></head><body><h1>hvprof report</h1>",
    );
    h.push_str("<p>Layers: ");
    for l in Layer::ALL {
        let (r_, g, b) = reports::flamegraph::layer_color(l.name());
        let _ = write!(
            h,
            "<span><span class=\"sw\" style=\"background:rgb({r_},{g},{b})\"></span>{} </span>",
            l.name()
        );
    }
    h.push_str("</p>");
    if !charts.is_empty() {
        h.push_str("<h2>Benchmark</h2><div class=\"charts\">");
        for (name, svg) in charts {
            let _ = write!(
                h,
                "<figure class=\"chart\" id=\"{}\">{svg}</figure>",
                esc(name)
            );
        }
        h.push_str("</div>");
    }
    if !r.topologies.is_empty() {
        h.push_str("<h2>Loss against native, layer by layer</h2><p>Each bar: the measured loss at one size split into the layers that explain it (percentage points); the residual is what the layer costs do not explain.</p><table><tr><th>topology</th><th>size</th><th>conn/s</th><th>measured loss %</th><th>predicted %</th><th>residual</th><th>layers</th><th>bottleneck</th></tr>");
        for t in &r.topologies {
            for z in &t.sizes {
                let mut bar = String::from("<div class=\"bar stacked\">");
                for l in z.layers.iter().filter(|l| l.loss_points > 0.0) {
                    let (r_, g, b) = reports::flamegraph::layer_color(l.layer);
                    let _ = write!(
                        bar,
                        "<div title=\"{} {:.1} points\" style=\"width:{:.2}%;background:rgb({r_},{g},{b})\"></div>",
                        l.layer,
                        l.loss_points,
                        l.loss_points.min(100.0)
                    );
                }
                bar.push_str("</div>");
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.1}</td><td>{:.1}</td><td class=\"{}\">{:+.1}{}</td><td style=\"min-width:240px\">{bar}</td><td>{}</td></tr>",
                    esc(&t.name),
                    loadgen::size::SizeLabel(z.size),
                    z.conn_per_s,
                    z.loss_pct,
                    z.predicted_loss_pct,
                    if z.residual_flagged { "flag" } else { "" },
                    z.residual_pct,
                    if z.residual_flagged {
                        " ⚠ residual over 5 points"
                    } else {
                        ""
                    },
                    esc(&z.bottleneck)
                );
            }
        }
        h.push_str("</table><h3>Per-layer cost and latency</h3><table><tr><th>topology</th><th>size</th><th>layer</th><th>CPU µs/conn</th><th>native µs/conn</th><th>loss points</th><th>latency p50 µs</th><th>latency p99 µs</th></tr>");
        for t in &r.topologies {
            for z in &t.sizes {
                for l in z
                    .layers
                    .iter()
                    .filter(|l| l.cpu_us_per_conn > 0.0 || l.native_cpu_us_per_conn > 0.0)
                {
                    let lat = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.0}"));
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:+.1}</td><td>{}</td><td>{}</td></tr>",
                        esc(&t.name),
                        loadgen::size::SizeLabel(z.size),
                        l.layer,
                        l.cpu_us_per_conn,
                        l.native_cpu_us_per_conn,
                        l.loss_points,
                        lat(l.latency_us_p50),
                        lat(l.latency_us_p99)
                    );
                }
            }
        }
        h.push_str(
            "</table><h3>Flamegraphs (CPU per 1000 connections; differential against native)</h3>",
        );
        for t in &r.topologies {
            for z in &t.sizes {
                for f in [&z.flamegraph, &z.diff_flamegraph].into_iter().flatten() {
                    let _ = write!(
                        h,
                        "<object class=\"flamegraph\" type=\"image/svg+xml\" data=\"{}\"></object>",
                        esc(f)
                    );
                }
            }
        }
    }
    for run in &r.runs {
        let _ = write!(
            h,
            "<h2>{} — topology <code>{}</code></h2><p>{} connections in {:.2} s ({:.0} conn/s), {} events, {} CPU samples at {} Hz, kernel {}</p><p><b>Bottleneck:</b> {}</p>",
            esc(&run.name),
            esc(&run.topology),
            run.connections,
            run.duration_s,
            run.conn_per_s,
            run.events,
            run.samples,
            run.sample_hz,
            esc(&run.kernel),
            esc(&run.bottleneck)
        );
        let lost: u64 = run.lost.values().sum();
        let _ = write!(
            h,
            "<p><b>Lost events:</b> {lost}</p><div class=\"bar\" id=\"layers-{}\">",
            esc(&run.name)
        );
        for l in run.layers.iter().filter(|l| l.share_pct > 0.0) {
            let (r_, g, b) = reports::flamegraph::layer_color(l.layer);
            let _ = write!(
                h,
                "<div title=\"{} {:.1}%\" style=\"width:{:.2}%;background:rgb({r_},{g},{b})\"></div>",
                l.layer, l.share_pct, l.share_pct
            );
        }
        h.push_str("</div><table><tr><th>layer</th><th>CPU ms</th><th>µs / connection</th><th>share %</th></tr>");
        for l in run.layers.iter().filter(|l| l.samples > 0) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.1}</td></tr>",
                l.layer, l.cpu_ms, l.cpu_us_per_conn, l.share_pct
            );
        }
        h.push_str(
            "</table><table><tr><th>latency</th><th>p50 µs</th><th>p99 µs</th><th>n</th></tr>",
        );
        for (k, p) in &run.latency_us {
            let _ = write!(
                h,
                "<tr><td>{k}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
                p.p50, p.p99, p.count
            );
        }
        h.push_str("</table><table><tr><th>thread</th><th>tid</th><th>layer</th><th>busy %</th><th>run-queue ms</th></tr>");
        for t in run.threads.iter().take(10) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                esc(&t.comm),
                t.tid,
                t.layer,
                t.busy_pct,
                t.runq_ms
            );
        }
        h.push_str("</table>");
        if let Some(svg) = &run.flamegraph {
            let _ = write!(
                h,
                "<h3>Flamegraph</h3><object class=\"flamegraph\" type=\"image/svg+xml\" data=\"{}\"></object>",
                esc(svg)
            );
        }
        let _ = write!(
            h,
            "<details><summary>Probes attached ({})</summary><ul>",
            run.probes_attached.len()
        );
        for p in &run.probes_attached {
            let _ = write!(h, "<li>{}</li>", esc(p));
        }
        h.push_str("</ul></details>");
    }
    h.push_str("</body></html>\n");
    h
}

/// Refuses an empty run list (clap enforces it) and checks inputs early.
pub fn check_runs(runs: &[PathBuf]) -> Result<()> {
    for r in runs {
        if !r.join(rundir::META).exists() {
            bail!(
                "{} is not a run directory (no meta.json); give directories written by `hvprof record -o`",
                r.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bottleneck_names_the_busiest_thread_and_what_the_cpus_lacked() {
        let thread = |comm: &str, layer: &'static str, busy_pct: f64| ThreadReport {
            tid: 7,
            pid: 7,
            comm: comm.into(),
            layer,
            busy_pct,
            runq_ms: 1.0,
            runq_pct: 3.0,
        };
        let threads = [
            thread("load-0", "loadgen", 71.0),
            thread("haproxy", "proxy", 98.0),
        ];
        assert_eq!(
            bottleneck(&threads, Some(3.0), None),
            "haproxy thread 7 98% busy (proxy), 3% waiting for a CPU; load generator load-0 71%; CPUs 3% idle"
        );
        // Steal is named when there was any to speak of.
        assert!(
            bottleneck(&threads, Some(3.0), Some(21.4))
                .ends_with("CPUs 3% idle, 21% stolen by the hypervisor")
        );
        assert!(bottleneck(&threads, Some(3.0), Some(0.2)).ends_with("CPUs 3% idle"));
        assert_eq!(
            bottleneck(&[], None, Some(40.0)),
            "CPUs 40% stolen by the hypervisor"
        );
        assert_eq!(
            bottleneck(&[], None, None),
            "no scheduler data (sched probes not attached)"
        );
    }
}
