//! A capture: one recording into a run directory — host probes, and the
//! guest agents a collector accepts — from attach until a stop future
//! fires, then an orderly finish that writes `meta.json`, `summary.json`,
//! `stacks.folded` and `threads.json` (and each guest's under
//! `guest-N/`). `hvprof record` drives it from the command line;
//! `hvprof bench --record` runs one around every point of a sweep, on a
//! thread of its own ([`Background`]).

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use serde::Serialize;

use crate::{
    agent::collector::Collector,
    attach::ProgramStats,
    recorder::{self, Recorder},
    rundir::{self, log::LogWriter},
    timeline,
};

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub connections: u64,
    pub events: u64,
    pub lost: BTreeMap<String, u64>,
    pub probes: Vec<ProgramStats>,
    pub duration_s: f64,
    pub truncated_tail: bool,
    /// CPU samples taken and distinct stacks in `stacks.folded`.
    pub samples: u64,
    pub stacks: usize,
    /// Guests whose agents delivered a recording.
    pub guests: Vec<GuestSummary>,
    /// The one-way delay between the two devices traced on a host path
    /// (a namespace topology's ends), when there were two.
    pub crossing: Option<crate::correlate::Crossing>,
    /// What the recording itself cost this machine.
    pub cost: Cost,
    /// What the hypervisor under this machine took from it over the
    /// window; none where the kernel does not say.
    pub steal: Option<Steal>,
}

/// CPU time stolen from this machine (`/proc/stat` steal) over the
/// recording's window (`duration_s`), and its share of the CPUs' time.
#[derive(Debug, Clone, Serialize)]
pub struct Steal {
    pub cpu_s: f64,
    pub pct: f64,
}

impl Steal {
    fn new(cpu_s: f64, duration_s: f64, cpus: Option<u32>) -> Self {
        Self {
            cpu_s,
            pct: machine_pct(cpu_s, duration_s, cpus).min(100.0),
        }
    }
}

/// `cpu_s` as a percentage of the machine's CPU time over `span_s`:
/// `cpus` CPUs, as `meta.json` has them (1 if unknown); 0 over no time.
fn machine_pct(cpu_s: f64, span_s: f64, cpus: Option<u32>) -> f64 {
    let machine = span_s * f64::from(cpus.unwrap_or(1).max(1));
    if machine > 0.0 {
        100.0 * cpu_s / machine
    } else {
        0.0
    }
}

/// hvprof's own CPU time over a recording, and its share of the
/// machine's: `span_s` (attach to the last drain) times the CPUs online.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    pub span_s: f64,
    /// The recorder: the thread that drains the kernel's buffers and
    /// writes the event log, from attach to the last drain.
    pub recorder_cpu_s: f64,
    pub recorder_pct: f64,
    /// The eBPF programs' run time, from the kernel's BPF statistics:
    /// `null` unless they were on (`record --bpf-stats`).
    pub programs_cpu_s: Option<f64>,
    pub programs_pct: Option<f64>,
    pub cpus: u32,
}

impl Cost {
    /// `cpus`: as `meta.json` has them (1 if unknown).
    fn new(recorder_cpu_s: f64, programs: &[ProgramStats], span_s: f64, cpus: Option<u32>) -> Self {
        let pct = |s: f64| machine_pct(s, span_s, cpus);
        let programs_cpu_s = programs
            .iter()
            .map(|p| p.run_time_ns)
            .sum::<Option<u64>>()
            .map(|ns| ns as f64 / 1e9);
        Self {
            span_s,
            recorder_cpu_s,
            recorder_pct: pct(recorder_cpu_s),
            programs_cpu_s,
            programs_pct: programs_cpu_s.map(pct),
            cpus: cpus.unwrap_or(1).max(1),
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestSummary {
    pub guest: String,
    pub events: u64,
    pub complete: bool,
    /// Best clock offset (guest − host) and its error bound.
    pub clock_offset_ns: Option<i64>,
    pub clock_error_ns: Option<u64>,
    pub clock_method: Option<String>,
    /// Packets matched across the host/guest boundary.
    pub packets: Option<crate::correlate::MatchStats>,
}

/// Records into `dir` (already created, writable) until `stop` resolves;
/// returns the summary and `stop`'s output.
pub async fn run_until<F: Future>(
    dir: &Path,
    opts: &recorder::Options,
    topology: &str,
    command: &[String],
    collector: Option<Collector>,
    on_attached: impl FnOnce(&mut Recorder),
    stop: F,
) -> Result<(Summary, F::Output)> {
    let mut rec = Recorder::start(opts, topology, command)?;
    // The recorder's work is this thread's from here to the last drain.
    let (cpu0, t0) = (thread_cpu_s(), std::time::Instant::now());
    rundir::write_json(&dir.join(rundir::META), &rec.meta)?;
    let mut log = LogWriter::create(&dir.join(rundir::EVENTS))?;
    on_attached(&mut rec);
    let mut drain_tick = tokio::time::interval(recorder::DRAIN_EVERY);
    let mut symbolize_tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let result: Result<F::Output> = async {
        loop {
            tokio::select! {
                r = rec.wait_and_drain(|r| Ok(log.append(r)?)) => { r?; log.flush()? }
                _ = drain_tick.tick() => { rec.drain(|r| Ok(log.append(r)?))?; log.flush()? }
                _ = symbolize_tick.tick() => {
                    rec.stacks.symbolize_pending();
                    rec.tap_lost();
                }
                out = &mut stop => break Ok(out),
            }
        }
    }
    .await;
    let finished = rec.finish(|r| Ok(log.append(r)?));
    log.flush()?;
    let (recorder_cpu_s, span_s) = (thread_cpu_s() - cpu0, t0.elapsed().as_secs_f64());
    let out = result?;
    let mut fin = finished?;
    let mut guests = Vec::new();
    if let Some(c) = collector {
        for g in c.finish(Duration::from_secs(20)).await {
            let mut clocks: Vec<_> = g.clock.into_iter().collect();
            let matched = crate::correlate::packet_offset(dir, &dir.join(&g.guest), &g.guest)
                .unwrap_or_else(|e| {
                    log::warn!("{}: matching packets: {e:#}", g.guest);
                    None
                });
            let packets = matched.map(|(clock, stats)| {
                clocks.push(clock);
                stats
            });
            let best = crate::correlate::best(&clocks).cloned();
            guests.push(GuestSummary {
                guest: g.guest.clone(),
                events: g.events,
                complete: g.complete,
                clock_offset_ns: best.as_ref().map(|c| c.offset_ns),
                clock_error_ns: best.as_ref().map(|c| c.error_ns),
                clock_method: best.map(|c| c.method),
                packets,
            });
            for clock in clocks {
                fin.meta.clock_offsets.push(serde_json::to_value(clock)?);
            }
        }
    }
    rundir::write_json(&dir.join(rundir::META), &fin.meta)?;
    let n_stacks = if fin.stacks.samples > 0 {
        fin.stacks.write_folded(&dir.join(rundir::STACKS))?
    } else {
        0
    };
    if let Some(sched) = &fin.sched {
        rundir::write_json(&dir.join(rundir::THREADS), sched)?;
    }
    if let Some(kvm) = &fin.kvm {
        rundir::write_json(&dir.join(rundir::KVM), kvm)?;
    }
    let (connections, truncated_tail) = timeline::count_connections(dir)?;
    let duration_s = fin.meta.duration_s.unwrap_or(0.0);
    let summary = Summary {
        cost: Cost::new(recorder_cpu_s, &fin.stats, span_s, fin.meta.cpus),
        steal: fin
            .stolen_s
            .map(|s| Steal::new(s, duration_s, fin.meta.cpus)),
        connections,
        events: log.records,
        lost: fin.lost,
        probes: fin.stats,
        duration_s,
        truncated_tail,
        samples: fin.stacks.samples,
        stacks: n_stacks,
        guests,
        crossing: crate::correlate::crossing(dir).unwrap_or_else(|e| {
            log::warn!("matching packets across the path: {e:#}");
            None
        }),
    };
    rundir::write_json(&dir.join(rundir::SUMMARY), &summary)?;
    Ok((summary, out))
}

/// A capture on a thread of its own, for callers that are not async.
pub struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<Summary>>>,
    /// Mark the load's start and end here to count only its CPU samples.
    pub window: std::sync::Arc<recorder::Window>,
}

impl Background {
    /// Starts recording into `dir` and returns once the probes are
    /// attached. `agents`: a listening socket (already bound where guests
    /// can reach it) and the token they must prove.
    pub fn start(
        dir: PathBuf,
        opts: recorder::Options,
        topology: String,
        agents: Option<(std::net::TcpListener, Vec<u8>)>,
    ) -> Result<Self> {
        let dir = rundir::create(&dir)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<Result<std::sync::Arc<recorder::Window>, String>>();
        let d = dir.clone();
        let thread = std::thread::Builder::new()
            .name("hvprof-capture".into())
            .spawn(move || -> Result<Summary> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the capture runtime")?;
                rt.block_on(async move {
                    let collector = match agents {
                        Some((l, token)) => match Collector::from_std(l, token, d.clone()) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("{e:#}")));
                                return Err(e);
                            }
                        },
                        None => None,
                    };
                    let ready = ready_tx.clone();
                    let res = run_until(
                        &d,
                        &opts,
                        &topology,
                        &[],
                        collector,
                        |rec| {
                            let _ = ready.send(Ok(rec.window.clone()));
                        },
                        async {
                            let _ = stop_rx.await;
                        },
                    )
                    .await;
                    if let Err(e) = &res {
                        let _ = ready_tx.send(Err(format!("{e:#}")));
                    }
                    res.map(|(s, ())| s)
                })
            })
            .context("starting the capture thread")?;
        match ready_rx.recv() {
            Ok(Ok(window)) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
                window,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(anyhow!("recording {}: {e}", dir.display()))
            }
            Err(_) => {
                let r = thread.join();
                Err(anyhow!(
                    "recording {} ended before attaching: {:?}",
                    dir.display(),
                    r.err()
                ))
            }
        }
    }

    /// Stops, finishes the run directory and returns its summary.
    pub fn stop(mut self) -> Result<Summary> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow!("the capture thread panicked")),
            None => Err(anyhow!("capture already stopped")),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
