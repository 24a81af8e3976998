//! `hvprof record`: attach probes, stream events into a run directory for
//! a duration or for the life of a command, detach on every exit path
//! (normal end, Ctrl-C, SIGTERM, errors), and summarise.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;
use tokio::signal::unix::SignalKind;

use crate::{
    agent::collector::Collector,
    attach::ProgramStats,
    recorder::{self, Recorder},
    rundir::{self, log::LogWriter},
    timeline,
};

/// Record probes on a live system into a run directory.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  hvprof record -o run/ --duration 30s\n  hvprof record -o run/ -- curl -s http://127.0.0.1:8080/\n  hvprof record -o run/ --probe tcp --duration 10s"
)]
pub struct RecordArgs {
    /// Run directory to create (must not hold a recording yet).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Record for this long (e.g. 30s, 2m, 500ms).
    #[arg(short, long, value_name = "D", value_parser = parse_duration, conflicts_with = "command")]
    pub duration: Option<Duration>,
    /// Probes to attach: a probe name, a path (`tcp`, `virtio`) or a layer
    /// (`socket`); repeatable. Default: every probe available here.
    #[arg(short, long = "probe", value_name = "NAME")]
    pub probes: Vec<String>,
    /// Trace packets on this device: IFNAME, NETNS:IFNAME (a named `ip
    /// netns`), or `all` (every device — costly on a busy host); repeatable.
    /// Without it the device probes stay off.
    #[arg(long = "dev", value_name = "[NETNS:]IFNAME")]
    pub devices: Vec<String>,
    /// Also collect guest agents (`hvprof agent --collector ADDR`) on this
    /// address (the test network or loopback) into RUN/guest-N/.
    #[arg(long, value_name = "ADDR", requires = "token")]
    pub collect: Option<std::net::SocketAddr>,
    /// Shared token file agents must prove they hold (with --collect).
    #[arg(long, value_name = "FILE", requires = "collect")]
    pub token: Option<PathBuf>,
    /// Size of the kernel event ring buffer in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = parse_ringbuf_mib)]
    pub ringbuf_mib: u32,
    /// CPU sampling frequency per CPU, in Hz.
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = crate::paths::cpu::DEFAULT_HZ, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub freq: u64,
    /// Do not print the summary table.
    #[arg(short, long)]
    pub quiet: bool,
    /// Command to run while recording; recording stops when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 10s, 2m, 500ms"))?;
    if d.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    Ok(d)
}

fn parse_ringbuf_mib(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of MiB"))?;
    if !n.is_power_of_two() || n > 1024 {
        return Err(format!("{n} must be a power of two between 1 and 1024"));
    }
    Ok(n)
}

/// `summary.json`.
#[derive(Debug, Serialize)]
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
}

impl RecordArgs {
    pub fn run(self) -> Result<ExitCode> {
        if self.duration.is_none() && self.command.is_empty() {
            bail!(
                "nothing to record: give --duration D, or a command after `--` (e.g. `hvprof record -o run/ -- sleep 5`)"
            );
        }
        // Validate probe names and the command before touching the kernel.
        recorder::select(&self.probes)?;
        let token = self
            .token
            .as_deref()
            .map(crate::agent::proto::read_token)
            .transpose()?;
        if let Some(cmd) = self.command.first() {
            find_program(cmd)?;
        }
        let dir = rundir::create(&self.output)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let res = rt.block_on(self.record(dir.clone(), token));
        if res.is_err() {
            // Leave no empty run directory behind; a started one is kept.
            let _ = std::fs::remove_dir(&dir);
        }
        res
    }

    async fn record(self, dir: PathBuf, token: Option<Vec<u8>>) -> Result<ExitCode> {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let collector = match (self.collect, token) {
            (Some(addr), Some(token)) => {
                let c = Collector::bind(addr, token, dir.clone()).await?;
                if !self.quiet {
                    eprintln!("hvprof: collecting guest agents on {}", c.addr);
                }
                Some(c)
            }
            _ => None,
        };
        let opts = recorder::Options {
            probes: self.probes.clone(),
            devices: self.devices.clone(),
            ringbuf_mib: self.ringbuf_mib,
            freq: self.freq,
        };
        let mut rec = Recorder::start(&opts, "host", &self.command)?;
        rundir::write_json(&dir.join(rundir::META), &rec.meta)?;
        let mut log = LogWriter::create(&dir.join(rundir::EVENTS))?;
        if !self.quiet {
            eprintln!(
                "hvprof: recording {} probe(s) into {} ({}); Ctrl-C to stop",
                rec.attached().len(),
                dir.display(),
                match self.duration {
                    Some(d) => format!("for {}", humantime::format_duration(d)),
                    None => format!("while `{}` runs", self.command.join(" ")),
                }
            );
        }
        let mut child = if self.command.is_empty() {
            None
        } else {
            Some(
                tokio::process::Command::new(&self.command[0])
                    .args(&self.command[1..])
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("cannot run command {:?}", self.command[0]))?,
            )
        };
        let deadline = self.duration.map(|d| tokio::time::Instant::now() + d);
        let mut exit = ExitCode::SUCCESS;
        let mut drain_tick = tokio::time::interval(recorder::DRAIN_EVERY);
        let mut symbolize_tick = tokio::time::interval(Duration::from_secs(1));

        // Stream until the duration ends, the command exits or a signal comes.
        let result: Result<()> = async {
            loop {
                tokio::select! {
                    r = rec.wait_and_drain(|r| Ok(log.append(r)?)) => { r?; log.flush()? }
                    _ = drain_tick.tick() => { rec.drain(|r| Ok(log.append(r)?))?; log.flush()? }
                    _ = symbolize_tick.tick() => rec.stacks.symbolize_pending(),
                    _ = sleep_until(deadline) => break,
                    status = wait_child(&mut child) => {
                        if let Some(st) = status? {
                            if !st.success() {
                                exit = ExitCode::from(st.code().map_or(1, |c| c.clamp(1, 255) as u8));
                                eprintln!("hvprof: command exited with {st}");
                            }
                        }
                        break;
                    }
                    _ = sigint.recv() => { stop_child(&mut child, libc::SIGINT).await; exit = ExitCode::from(130); break }
                    _ = sigterm.recv() => { stop_child(&mut child, libc::SIGTERM).await; exit = ExitCode::from(143); break }
                }
            }
            Ok(())
        }
        .await;
        let finished = rec.finish(|r| Ok(log.append(r)?));
        log.flush()?;
        result?;
        let mut fin = finished?;
        if let Some(c) = collector {
            for g in c.finish(Duration::from_secs(20)).await {
                if !self.quiet {
                    eprintln!(
                        "hvprof: {} from {}: {} events{}{}",
                        g.guest,
                        g.peer,
                        g.events,
                        g.clock.as_ref().map_or(String::new(), |c| format!(
                            ", clock offset {} ns ± {} ns",
                            c.offset_ns, c.error_ns
                        )),
                        if g.complete { "" } else { " (incomplete)" }
                    );
                }
                if let Some(clock) = g.clock {
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
        let tl = timeline::Timeline::read(&dir)?;
        let summary = Summary {
            connections: tl.connections.len() as u64,
            events: log.records,
            lost: fin.lost,
            probes: fin.stats,
            duration_s: fin.meta.duration_s.unwrap_or(0.0),
            truncated_tail: tl.truncated_tail,
            samples: fin.stacks.samples,
            stacks: n_stacks,
        };
        rundir::write_json(&dir.join(rundir::SUMMARY), &summary)?;
        if !self.quiet {
            print_summary(&dir, &summary);
        }
        Ok(exit)
    }
}

/// Checks that `cmd` names an executable (directly or through `PATH`)
/// before anything is attached.
fn find_program(cmd: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if cmd.contains('/') {
        executable(Path::new(cmd))
    } else {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| executable(&d.join(cmd))))
    };
    if !found {
        bail!("command {cmd:?} not found or not executable; check the command after `--`");
    }
    Ok(())
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_child(
    child: &mut Option<tokio::process::Child>,
) -> Result<Option<std::process::ExitStatus>> {
    match child {
        Some(c) => Ok(Some(c.wait().await.context("waiting for the command")?)),
        None => std::future::pending().await,
    }
}

/// Passes a stop signal on to the command, then waits up to 5 s for it
/// before killing it.
async fn stop_child(child: &mut Option<tokio::process::Child>, sig: i32) {
    let Some(c) = child else { return };
    if let Some(pid) = c.id() {
        // SAFETY: signalling the child we started, by its pid.
        unsafe { libc::kill(pid as i32, sig) };
    }
    if tokio::time::timeout(Duration::from_secs(5), c.wait())
        .await
        .is_err()
    {
        let _ = c.kill().await;
    }
}

fn print_summary(dir: &Path, s: &Summary) {
    println!(
        "recorded {} events ({} CPU samples), {} connections in {:.2}s -> {}",
        s.events,
        s.samples,
        s.connections,
        s.duration_s,
        dir.display()
    );
    println!(
        "{:<28} {:>10} {:>14} {:>10} {:>8}",
        "probe", "runs", "run time ns", "ns/run", "lost"
    );
    for p in &s.probes {
        let per = if p.run_count > 0 {
            p.run_time_ns as f64 / p.run_count as f64
        } else {
            0.0
        };
        println!(
            "{:<28} {:>10} {:>14} {:>10.0} {:>8}",
            p.name,
            p.run_count,
            p.run_time_ns,
            per,
            s.lost.get(&p.name).copied().unwrap_or(0)
        );
    }
    let total_lost: u64 = s.lost.values().sum();
    if total_lost > 0 {
        println!(
            "WARNING: {total_lost} events lost in the kernel (ring buffer full); raise --ringbuf-mib"
        );
    }
}
