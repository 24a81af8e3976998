//! `cargo xtask bench programs`: the eBPF programs of two hvprof builds
//! side by side. One close-mode 0-byte load runs through the HAProxy stand
//! (`hvprof bench --serve`) while short `hvprof record --bpf-stats`
//! recordings take turns — the baseline build's, then this one's (the
//! order alternating by pair) — so that each pair sees the same machine,
//! however its speed drifts. Prints, per program, the time per run and per
//! recorded TCP connection (a request through the proxy is two) of each
//! build and the median paired ratio with its confidence interval: a
//! change of a few nanoseconds per run shows here where the rate of
//! `bench overhead` can't tell it from the drift.
//! A benchmark, not a test: it prints numbers and fails only when a tool
//! can't run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bench::{DirGuard, Guard, add_program_stats, median, paired, start_stand};

/// Options of `cargo xtask bench programs`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProgramsArgs {
    /// The hvprof binary to compare this build with (a copy of
    /// target/release/hvprof built from another commit).
    #[arg(long, value_name = "BIN")]
    pub baseline: PathBuf,
    /// Pairs of recordings, one of each build per pair.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Seconds per recording.
    #[arg(short, long, default_value_t = 2)]
    pub duration: u64,
    /// Connections in flight.
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Attach only this probe (a name, path or layer, as `hvprof record
    /// --probe` takes it); repeatable. Default: every probe available here.
    #[arg(short, long = "probe", value_name = "NAME")]
    pub probes: Vec<String>,
    /// Don't rebuild hvprof first.
    #[arg(long)]
    pub no_build: bool,
}

/// One recording's figures: per program, run time (ns) and runs; and the
/// connections it recorded.
struct Recording {
    programs: BTreeMap<String, (f64, f64)>,
    connections: f64,
}

/// What one build's recordings gave, program by program: ns per run and
/// ns per connection, one value per recording.
#[derive(Default)]
struct Figures {
    per_run: BTreeMap<String, Vec<f64>>,
    per_conn: BTreeMap<String, Vec<f64>>,
}

impl Figures {
    fn add(&mut self, r: &Recording) {
        let conns = r.connections.max(1.0);
        let mut all = 0.0;
        for (name, (ns, runs)) in &r.programs {
            let per_run = if *runs > 0.0 { ns / runs } else { f64::NAN };
            self.per_run.entry(name.clone()).or_default().push(per_run);
            self.per_conn
                .entry(name.clone())
                .or_default()
                .push(ns / conns);
            all += ns;
        }
        self.per_conn
            .entry(ALL.to_string())
            .or_default()
            .push(all / conns);
    }
}

/// The row summing every program.
const ALL: &str = "(all programs)";

pub fn bench_programs(a: &ProgramsArgs) -> Result<()> {
    let baseline = std::fs::canonicalize(&a.baseline).with_context(|| {
        format!(
            "--baseline {}: no such file; copy target/release/hvprof of the build to compare with there",
            a.baseline.display()
        )
    })?;
    if a.pairs == 0 || a.duration == 0 {
        bail!("--pairs and --duration must be at least 1");
    }
    if !a.no_build {
        crate::build_release()?;
    }
    let this = crate::root().join("target/release/hvprof");
    let (mut stand, proxy) = start_stand(&this, 1)?;
    let url = format!("{proxy}/?s=0");
    let tmp = std::env::temp_dir().join(format!("hvprof-programs-{}", std::process::id()));
    let _cleanup = DirGuard(tmp.clone());
    // Long enough for every recording (each takes a few seconds more than
    // its duration to load and to summarise); it stops itself.
    let load_secs = a.pairs as u64 * 2 * (a.duration + 4) + 10;
    let mut load = Guard(Some(
        Command::new(&this)
            .args(["load", &url, "-q", "-t", "1", "-c"])
            .arg(a.concurrency.to_string())
            .args(["-d", &format!("{load_secs}s")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting hvprof load")?,
    ));
    println!(
        "eBPF programs, {} against this build: {} pairs of {} s recordings with --bpf-stats, \
         under one 0-byte close-mode load through HAProxy ({} connections in flight)",
        baseline.display(),
        a.pairs,
        a.duration,
        a.concurrency
    );
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let (mut base, mut new) = (Figures::default(), Figures::default());
    for pair in 0..a.pairs {
        let order = if pair % 2 == 0 {
            [(&baseline, true), (&this, false)]
        } else {
            [(&this, false), (&baseline, true)]
        };
        for (bin, is_base) in order {
            if let Some(Ok(Some(st))) = load.0.as_mut().map(|c| c.try_wait()) {
                bail!("the load ended ({st}) before the recordings did");
            }
            let dir = tmp.join(format!(
                "pair{pair}-{}",
                if is_base { "base" } else { "this" }
            ));
            let r = record(bin, &dir, a)?;
            if is_base { &mut base } else { &mut new }.add(&r);
        }
        println!(
            "  pair {}/{} done ({:.0} s)",
            pair + 1,
            a.pairs,
            t0.elapsed().as_secs_f64()
        );
    }
    load.stop();
    stand.stop();
    print_table(&base, &new);
    Ok(())
}

/// One recording by `bin` into `dir`, its figures from `summary.json`.
fn record(bin: &Path, dir: &Path, a: &ProgramsArgs) -> Result<Recording> {
    let mut cmd = Command::new(bin);
    cmd.args(["record", "-q", "--bpf-stats", "-d"])
        .arg(format!("{}s", a.duration));
    for p in &a.probes {
        cmd.args(["--probe", p]);
    }
    let out = cmd
        .arg("-o")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} record", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} record failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = dir.join("summary.json");
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let mut programs = BTreeMap::new();
    add_program_stats(&summary, &mut programs);
    Ok(Recording {
        programs,
        connections: summary["connections"].as_f64().unwrap_or(0.0),
    })
}

/// Per program: each build's median ns/run and ns/connection, and the
/// median paired ratio (this / baseline) of ns per connection with its
/// confidence interval. Programs only one build has get that build's
/// figures alone.
fn print_table(base: &Figures, new: &Figures) {
    println!("per run, and per recorded TCP connection (a request through the proxy is two):");
    println!(
        "{:<22} {:>11} {:>8} {:>12} {:>8} {:>8}  confidence interval",
        "program", "base ns/run", "ns/run", "base ns/conn", "ns/conn", "ratio"
    );
    let names: std::collections::BTreeSet<&String> =
        base.per_conn.keys().chain(new.per_conn.keys()).collect();
    let med = |m: &BTreeMap<String, Vec<f64>>, n: &str| {
        m.get(n).map_or(f64::NAN, |v| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                f64::NAN
            } else {
                median(&mut v)
            }
        })
    };
    // The programs first, the sum last.
    for name in names
        .iter()
        .filter(|n| n.as_str() != ALL)
        .chain(names.iter().filter(|n| n.as_str() == ALL))
    {
        let (b, t) = (
            base.per_conn.get(*name).map(Vec::as_slice).unwrap_or(&[]),
            new.per_conn.get(*name).map(Vec::as_slice).unwrap_or(&[]),
        );
        let r = paired(b, t);
        let interval = if r.median.is_finite() {
            format!(
                "{:.0}%: {:.3} .. {:.3}",
                100.0 * r.confidence,
                r.low,
                r.high
            )
        } else {
            String::new()
        };
        let num = |x: f64| {
            if x.is_finite() {
                format!("{x:.1}")
            } else {
                "-".into()
            }
        };
        println!(
            "{name:<22} {:>11} {:>8} {:>12} {:>8} {:>8}  {interval}",
            num(med(&base.per_run, name)),
            num(med(&new.per_run, name)),
            num(med(&base.per_conn, name)),
            num(med(&new.per_conn, name)),
            if r.median.is_finite() {
                format!("{:.3}", r.median)
            } else {
                "-".into()
            },
        );
    }
}
