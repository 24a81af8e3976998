//! `cargo xtask bench soak`: long full-load recording on `native` with the
//! full catalog. The stand (origin + HAProxy, `hvprof bench --serve`) takes
//! close-mode 0-byte load from `hvprof load` for the whole duration (10
//! minutes by default) under `hvprof record`; the recorder's resident
//! memory is sampled every second. Prints whether RSS stays bounded, the
//! lost events, the run directory's size per million connections and the
//! events per connection.
//! A benchmark, not a test: it prints numbers and fails only when a tool
//! can't run.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bench::{ClosedLoad, DirGuard, Guard, recorded_load, start_stand};
use crate::bench_report::dir_bytes;

/// Options of `cargo xtask bench soak`.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// Seconds of load (and recording).
    #[arg(short, long, default_value_t = 600)]
    pub duration: u64,
    /// CPU sampling frequency passed to `hvprof record -F` [default:
    /// record's default].
    #[arg(long, value_name = "HZ")]
    pub freq: Option<u64>,
    /// Connections in flight.
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Keep the recording in DIR (DIR/run, DIR/load.json) and write the
    /// per-second RSS series to DIR/rss.csv; otherwise everything is
    /// removed at the end.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Don't build; use target/release/hvprof as it is.
    #[arg(long)]
    pub no_build: bool,
}

/// One RSS sample of the recorder: seconds since it started, KiB.
type Sample = (f64, u64);

const MIB: f64 = 1024.0 * 1024.0;

pub fn bench_soak(a: &SoakArgs) -> Result<()> {
    let root = crate::root();
    if !a.no_build {
        crate::build_release()?;
    }
    let bin = root.join("target/release/hvprof");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with cargo build --release -p hvprof",
            bin.display()
        );
    }
    if a.duration == 0 {
        bail!("--duration must be at least 1 second");
    }
    let (base, _cleanup) = match &a.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating --keep {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let dir = std::env::temp_dir().join(format!("hvprof-soak-{}", std::process::id()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir.clone(), Some(DirGuard(dir)))
        }
    };
    let run = base.join("run");
    let json = base.join("load.json");
    if run.exists() {
        bail!(
            "{} already exists: give --keep an empty or new directory",
            run.display()
        );
    }

    let (mut stand, proxy) = start_stand(&bin, 1)?;
    let url = format!("{proxy}/?s=0");
    println!(
        "soak: close-mode 0-byte load through HAProxy on native, {} connections in flight, {} s, \
         full catalog recorded{}",
        a.concurrency,
        a.duration,
        a.freq.map_or(String::new(), |f| format!(" at {f} Hz"))
    );
    let freq = a.freq.map(|f| f.to_string());
    let extra: Vec<&str> = freq.iter().flat_map(|f| ["-F", f.as_str()]).collect();
    let load = ClosedLoad {
        url: &url,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        concurrency: a.concurrency,
        duration_s: a.duration,
    };
    let mut cmd = recorded_load(&bin, &extra, &run, &load, &json);
    cmd.stdin(Stdio::null());
    let t0 = Instant::now();
    let child = cmd.spawn().context("cannot start hvprof record")?;
    let pid = child.id();
    let mut recorder = Guard(Some(child));
    // Attaching, the load's own end and the final summary: a generous limit.
    let limit = Duration::from_secs(a.duration + 300);
    let mut samples: Vec<Sample> = Vec::new();
    let mut phases = Phases::default();
    let mut peak_kib = 0;
    let mut tick = 1u64;
    let status = loop {
        let child = recorder.0.as_mut().context("recorder gone")?;
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > limit {
            recorder.stop();
            bail!("hvprof record still running after {limit:?}: stopped it");
        }
        let next = Duration::from_secs(tick);
        if t0.elapsed() < next {
            std::thread::sleep((next - t0.elapsed()).min(Duration::from_millis(100)));
            continue;
        }
        let now = t0.elapsed().as_secs_f64();
        // events.log appears once the probes are attached (the load starts
        // then); the load's JSON once it is done (the recorder then stops
        // and writes its summary).
        if phases.recording.is_none() && run.join("events.log").exists() {
            phases.recording = Some(now);
        }
        if phases.load_end.is_none() && json.exists() {
            phases.load_end = Some(now);
        }
        if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
            samples.push((now, kib));
        }
        peak_kib = proc_status_kib(pid, "VmHWM:").unwrap_or(peak_kib);
        if tick.is_multiple_of(10) {
            println!(
                "  {:>5} s  RSS {:>7.1} MiB  run dir {:>8.1} MiB{}",
                tick,
                samples.last().map_or(0.0, |s| s.1 as f64 / 1024.0),
                dir_bytes(&run) as f64 / MIB,
                phases.name(now)
            );
        }
        tick += 1;
    };
    let elapsed = t0.elapsed().as_secs_f64();
    recorder.0 = None;
    stand.stop();

    if a.keep.is_some() {
        let mut csv = String::from("elapsed_s,rss_kib,phase\n");
        for (t, kib) in &samples {
            csv.push_str(&format!("{t:.1},{kib},{}\n", phases.name(*t).trim()));
        }
        let path = base.join("rss.csv");
        std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
    }
    if !status.success() {
        bail!("hvprof record failed: {status}");
    }

    let load: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .context("load JSON")?;
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("summary.json")).context("reading summary.json")?,
    )
    .context("summary.json")?;
    let conns = load["connections"].as_u64().unwrap_or(0);
    let cps = load["conn_per_s"].as_f64().unwrap_or(0.0);
    let lost: u64 = summary["lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    let events = summary["events"].as_u64().unwrap_or(0);
    let bytes = dir_bytes(&run);

    println!(
        "connections: {conns} ({cps:.0} conn/s); recorder saw {} TCP connections",
        summary["connections"].as_u64().unwrap_or(0)
    );
    print_rss(&samples, phases, peak_kib, elapsed);
    println!(
        "lost events: {lost}{}",
        if lost > 0 {
            format!(" ({})", lost_by_probe(&summary))
        } else {
            String::new()
        }
    );
    let per_m = |x: f64| {
        if conns > 0 {
            x * 1e6 / conns as f64
        } else {
            f64::NAN
        }
    };
    println!(
        "run dir: {bytes} bytes ({:.1} MiB), {:.2} GB per million connections",
        bytes as f64 / MIB,
        per_m(bytes as f64) / 1e9
    );
    println!(
        "events: {events}, {:.1} per connection",
        per_m(events as f64) / 1e6
    );
    if let Some(dir) = &a.keep {
        println!(
            "kept: {} (RSS series in {})",
            run.display(),
            dir.join("rss.csv").display()
        );
    }
    Ok(())
}

/// When the recording started and the load ended, seconds since the
/// recorder was started.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    recording: Option<f64>,
    load_end: Option<f64>,
}

impl Phases {
    /// What the recorder was doing at `t`: attaching, recording the load,
    /// or writing the summary after it.
    fn name(&self, t: f64) -> &'static str {
        match (self.recording, self.load_end) {
            (_, Some(e)) if t >= e => "  summary",
            (Some(r), _) if t >= r => "  load",
            _ => "  attach",
        }
    }
}

/// A `Vm*:` line of /proc/PID/status (`VmRSS:`, `VmHWM:`), in KiB.
fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Largest RSS among the samples with `from <= t < to`.
fn max_in(samples: &[Sample], from: f64, to: f64) -> Option<u64> {
    samples
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|s| s.1)
        .max()
}

/// Whether the last quarter's peak RSS is above the second quarter's by
/// more than 5% (and 1 MiB): memory still growing, not bounded.
fn still_growing(second: u64, last: u64) -> bool {
    last as f64 > second as f64 * 1.05 && last > second + 1024
}

/// RSS while the load ran (from 10 s in, its peak, at its end, and the
/// second quarter against the last), then after it (the summary).
fn print_rss(samples: &[Sample], phases: Phases, peak_kib: u64, elapsed: f64) {
    let Some(&(last_t, final_kib)) = samples.last() else {
        println!("recorder RSS: no samples (it ended within a second)");
        return;
    };
    let mib = |k: u64| k as f64 / 1024.0;
    let start = phases.recording.unwrap_or(0.0);
    let end = phases.load_end.unwrap_or(last_t + 1.0);
    let during: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= start && *t < end)
        .collect();
    if let (Some(first), Some(&(_, at_end))) = (during.first(), during.last()) {
        let at10 = during
            .iter()
            .find(|(t, _)| *t >= start + 10.0)
            .unwrap_or(first)
            .1;
        let max = during.iter().map(|s| s.1).max().unwrap_or(0);
        print!(
            "recorder RSS while recording the load: {:.1} MiB at 10 s, {:.1} MiB max, {:.1} MiB at its end",
            mib(at10),
            mib(max),
            mib(at_end)
        );
        let q = (end - start) / 4.0;
        match (
            max_in(&during, start + q, start + 2.0 * q),
            max_in(&during, start + 3.0 * q, end),
        ) {
            (Some(q2), Some(q4)) => println!(
                "; max in the 2nd quarter {:.1} MiB, in the last {:.1} MiB: {}",
                mib(q2),
                mib(q4),
                if still_growing(q2, q4) {
                    "STILL GROWING"
                } else {
                    "bounded"
                }
            ),
            _ => println!(" (too short to compare quarters)"),
        }
    } else {
        println!("recorder RSS: no sample while the load ran");
    }
    let after = max_in(samples, end, f64::INFINITY);
    println!(
        "recorder RSS after the load (stopping, summary.json; {:.0} s): {} max, {:.1} MiB final; peak (VmHWM) {:.1} MiB",
        (elapsed - end).max(0.0),
        after.map_or("no sample".to_string(), |k| format!("{:.1} MiB", mib(k))),
        mib(final_kib),
        mib(peak_kib.max(final_kib))
    );
}

/// `probe N, ...` for the probes that lost events.
fn lost_by_probe(summary: &serde_json::Value) -> String {
    summary["lost"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k, v.as_u64().filter(|n| *n > 0)?)))
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarters_tell_growth_from_a_plateau() {
        let flat: Vec<Sample> = (1..=100).map(|t| (t as f64, 50_000)).collect();
        let (q2, q4) = (
            max_in(&flat, 25.0, 50.0).unwrap(),
            max_in(&flat, 75.0, 101.0).unwrap(),
        );
        assert!(!still_growing(q2, q4));
        let growing: Vec<Sample> = (1..=100).map(|t| (t as f64, 50_000 + t * 500)).collect();
        let (q2, q4) = (
            max_in(&growing, 25.0, 50.0).unwrap(),
            max_in(&growing, 75.0, 101.0).unwrap(),
        );
        assert!(still_growing(q2, q4));
    }

    #[test]
    fn phases_follow_the_markers() {
        let p = Phases {
            recording: Some(2.0),
            load_end: Some(32.0),
        };
        assert_eq!(p.name(1.0).trim(), "attach");
        assert_eq!(p.name(2.0).trim(), "load");
        assert_eq!(p.name(40.0).trim(), "summary");
    }

    #[test]
    fn rss_of_a_live_process_and_none_of_a_missing_one() {
        assert_eq!(proc_status_kib(u32::MAX, "VmRSS:"), None);
        let me = std::process::id();
        assert!(proc_status_kib(me, "VmRSS:").is_some_and(|k| k > 0));
        assert!(proc_status_kib(me, "VmHWM:").is_some_and(|k| k > 0));
    }
}
