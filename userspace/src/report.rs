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
    pub runs: Vec<RunReport>,
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
        check_runs(&self.runs)?;
        let classifier = Classifier::new();
        let mut runs = Vec::new();
        for (i, dir) in self.runs.iter().enumerate() {
            eprintln!("hvprof: analysing {}", dir.display());
            runs.push(analyse(dir, i, &self.output, &classifier)?);
        }
        let report = Report {
            format: FORMAT,
            version: VERSION,
            runs,
        };
        rundir::write_json(&self.output.join("report.json"), &report)?;
        let md = markdown(&report);
        std::fs::write(self.output.join("summary.md"), &md)?;
        std::fs::write(self.output.join("index.html"), html(&report, &md))?;
        print!("{md}");
        println!("report: {}", self.output.join("index.html").display());
        Ok(ExitCode::SUCCESS)
    }
}

fn analyse(dir: &Path, index: usize, out: &Path, classifier: &Classifier) -> Result<RunReport> {
    let meta: Meta = rundir::open(dir)?;
    let tl = Timeline::read(dir)?;
    let duration_s = meta.duration_s.unwrap_or(0.0);
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
                busy_pct: pct(t.oncpu_ns as f64 / 1e9, duration_s),
                runq_ms: t.runq_ns as f64 / 1e6,
            });
        }
        if !s.cpu_idle_ns.is_empty() && duration_s > 0.0 {
            let idle: u64 = s.cpu_idle_ns.values().sum();
            cpu_idle_pct = Some(pct(
                idle as f64 / 1e9,
                duration_s * s.cpu_idle_ns.len() as f64,
            ));
        }
    }
    let bottleneck = bottleneck(&threads, cpu_idle_pct);

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

/// "haproxy thread 1234 98% busy (proxy); load generator load-0 71%; CPUs 3% idle".
fn bottleneck(threads: &[ThreadReport], idle: Option<f64>) -> String {
    let mut parts = Vec::new();
    let sut = threads
        .iter()
        .filter(|t| t.layer != "loadgen")
        .max_by(|a, b| a.busy_pct.total_cmp(&b.busy_pct));
    if let Some(t) = sut {
        parts.push(format!(
            "{} thread {} {:.0}% busy ({})",
            t.comm, t.tid, t.busy_pct, t.layer
        ));
    }
    let lg = threads
        .iter()
        .filter(|t| t.layer == "loadgen")
        .max_by(|a, b| a.busy_pct.total_cmp(&b.busy_pct));
    if let Some(t) = lg {
        parts.push(format!("load generator {} {:.0}%", t.comm, t.busy_pct));
    }
    if let Some(i) = idle {
        parts.push(format!("CPUs {i:.0}% idle"));
    }
    if parts.is_empty() {
        "no scheduler data (sched probes not attached)".into()
    } else {
        parts.join("; ")
    }
}

fn markdown(r: &Report) -> String {
    let mut s = String::from("# hvprof report\n");
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

fn html(r: &Report, _md: &str) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>hvprof report</title><style>\
         body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}\
         .sw{display:inline-block;width:1em;height:1em;margin-right:4px;vertical-align:middle}\
         .bar{display:flex;height:24px;width:100%;margin:8px 0}.bar div{height:100%}\
         object{width:100%;border:1px solid #ddd}</style></head><body><h1>hvprof report</h1>",
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
