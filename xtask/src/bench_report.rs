//! `cargo xtask bench report`: how long `hvprof report` takes on a run of
//! a million events or more. Records one (`hvprof bench --record` on
//! `native`, lengthened until the event log holds enough), then times the
//! report and, as its floor, `hvprof dump` decoding the same log.
//! A benchmark, not a test: it prints numbers and fails only when a tool
//! can't run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

/// Options of `cargo xtask bench report`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Events the recorded run must hold at least.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Timed repetitions of each tool (the median is printed).
    #[arg(short, long, default_value_t = 3)]
    pub rounds: usize,
    /// Don't build; use target/release/hvprof as it is.
    #[arg(long)]
    pub no_build: bool,
}

/// The report-generation target of the issue, in seconds.
const TARGET_S: f64 = 5.0;

pub fn bench_report(a: &ReportArgs) -> Result<()> {
    let root = crate::root();
    if !a.no_build {
        crate::build_release()?;
    }
    let bin = root.join("target/release/hvprof");
    let tmp = tempdir()?;
    let _cleanup = crate::bench::DirGuard(tmp.clone());
    // About 20 events per connection at a few thousand connections/s.
    let mut secs = (a.events / 60_000).max(2);
    let mut attempt = 0;
    let (run, events) = loop {
        attempt += 1;
        let out = tmp.join(format!("bench{attempt}"));
        eprintln!("bench report: recording {secs} s of close-mode load on native ...");
        let st = Command::new(&bin)
            .args(["bench", "--topology", "native", "--sizes", "0", "-c", "16"])
            .args(["-d", &format!("{secs}s"), "--record", "-F", "499", "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .context("running hvprof bench --record")?;
        if !st.success() {
            bail!("hvprof bench --record failed: {st}");
        }
        let run = out.join("runs/native-0");
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("summary.json"))?)
                .context("reading summary.json")?;
        let events = summary["events"].as_u64().unwrap_or(0);
        if events >= a.events {
            break (run, events);
        }
        if attempt >= 3 {
            bail!("only {events} events after {attempt} recordings; is the machine very busy?");
        }
        // Lengthen in proportion, with a margin.
        secs = (secs as f64 * a.events as f64 / events.max(1) as f64 * 1.2).ceil() as u64;
    };
    let size = dir_bytes(&run);
    println!(
        "run: {events} events, {:.1} MB on disk ({})",
        size as f64 / 1e6,
        run.display()
    );
    let mut report = Vec::new();
    let mut dump = Vec::new();
    for round in 0..a.rounds.max(1) {
        let out = tmp.join(format!("report{round}"));
        report.push(time(
            Command::new(&bin)
                .arg("report")
                .arg(&run)
                .arg("-o")
                .arg(&out),
        )?);
        dump.push(time(Command::new(&bin).arg("dump").arg(&run))?);
    }
    let (r, d) = (
        crate::bench::median(&mut report),
        crate::bench::median(&mut dump),
    );
    println!(
        "hvprof report: {r:.2} s ({:.2} M events/s); target < {TARGET_S} s: {}",
        events as f64 / r / 1e6,
        if r < TARGET_S { "met" } else { "MISSED" }
    );
    println!(
        "hvprof dump (decode + JSON, the floor): {d:.2} s; report / dump = {:.2}",
        r / d
    );
    Ok(())
}

/// Wall seconds of one run, output discarded.
fn time(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running hvprof")?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Bytes of the files under `dir`, recursively.
pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("hvprof-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
