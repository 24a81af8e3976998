//! `hvprof record`: attach probes, stream events into a run directory for
//! a duration or for the life of a command, detach on every exit path
//! (normal end, Ctrl-C, SIGTERM, errors), and summarise.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use hvprof_common::{EventHeader, kind};

use crate::{
    attach::{self, LoadOptions, Probe, ProgramStats},
    catalog, kernel,
    paths::{dev, sched},
    rundir::{
        self,
        log::LogWriter,
        meta::{Meta, Status},
    },
    stacks::Stacks,
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
        // Validate probe names before touching the kernel.
        let mut required = false;
        let specs: Vec<&'static catalog::ProbeSpec> = if self.probes.is_empty() {
            catalog::all()
        } else {
            required = true;
            let mut out = Vec::new();
            for name in &self.probes {
                let found = catalog::select(name);
                if found.is_empty() {
                    bail!(
                        "unknown probe {name:?}; `hvprof probes list` shows the probe, path and layer names"
                    );
                }
                for s in found {
                    if !out.iter().any(|o: &&catalog::ProbeSpec| o.name == s.name) {
                        out.push(s);
                    }
                }
            }
            out
        };
        if let Some(cmd) = self.command.first() {
            find_program(cmd)?;
        }
        let dir = rundir::create(&self.output)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let res = rt.block_on(self.record(dir.clone(), specs, required));
        if res.is_err() {
            // Leave no empty run directory behind; a started one is kept.
            let _ = std::fs::remove_dir(&dir);
        }
        res
    }

    async fn record(
        self,
        dir: PathBuf,
        specs: Vec<&'static catalog::ProbeSpec>,
        required: bool,
    ) -> Result<ExitCode> {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;

        let all_devices = self.devices.iter().any(|d| d == "all");
        let devices = self
            .devices
            .iter()
            .filter(|d| *d != "all")
            .map(|d| dev::resolve(d))
            .collect::<Result<Vec<_>>>()?;
        let mut ebpf = attach::load(&LoadOptions {
            ringbuf_bytes: self.ringbuf_mib * 1024 * 1024,
            dev_filter: !all_devices,
        })?;
        dev::install(&mut ebpf, &devices)?;
        let probe = Probe::detect(&mut ebpf);
        let mut resolved = probe.resolve(&specs);
        // Device probes only run for devices the user named.
        if devices.is_empty() && !all_devices {
            for r in resolved.iter_mut().filter(|r| r.spec.path == "dev") {
                if r.obtained.take().is_some() {
                    r.reasons
                        .push("no device selected (give --dev IFNAME)".into());
                }
            }
            if required && resolved.iter().any(|r| r.spec.path == "dev") {
                bail!("device probes need devices: give --dev [NETNS:]IFNAME (or --dev all)");
            }
        }
        // Functions reachable only by sampling need the CPU sampler.
        let sampled = resolved.iter().any(|r| {
            r.obtained == Some(catalog::Method::Sampling)
                && matches!(r.spec.hook, catalog::Hook::Function { .. })
        });
        if sampled && !resolved.iter().any(|r| r.spec.name == "cpu:samples") {
            resolved.extend(probe.resolve(&catalog::select("cpu:samples")));
        }
        let mut session = attach::attach(ebpf, resolved, required, self.freq, &probe.features)?;
        // SAFETY: the ring buffer owns its fd, which stays open for as long
        // as the AsyncFd that owns the ring buffer.
        let mut ring = unsafe { AsyncFd::register(session.take_events()?) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;

        let (started_unix_ns, monotonic_start_ns) = clocks();
        let mut meta = Meta {
            format: rundir::meta::FORMAT.into(),
            version: rundir::meta::VERSION,
            hvprof_version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel::release(),
            topology: "host".into(),
            command: self.command.clone(),
            status: Status::Recording,
            started_unix_ns,
            monotonic_start_ns,
            ended_unix_ns: None,
            duration_s: None,
            ringbuf_bytes: u64::from(self.ringbuf_mib) * 1024 * 1024,
            sample_hz: session
                .programs
                .contains_key("cpu:samples")
                .then_some(self.freq),
            probes: session.statuses.clone(),
            functions: session.functions.clone(),
            lost: BTreeMap::new(),
            clock_offsets: Vec::new(),
        };
        rundir::write_json(&dir.join(rundir::META), &meta)?;
        let mut log = LogWriter::create(&dir.join(rundir::EVENTS))?;

        let attached: Vec<&str> = session.programs.keys().copied().collect();
        if !self.quiet {
            eprintln!(
                "hvprof: recording {} probe(s) into {} ({}); Ctrl-C to stop",
                attached.len(),
                dir.display(),
                match self.duration {
                    Some(d) => format!("for {}", humantime::format_duration(d)),
                    None => format!("while `{}` runs", self.command.join(" ")),
                }
            );
        }

        let start = Instant::now();
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
        // The kernel wakes us only when the ring fills up (see
        // `submit_flags` in the eBPF maps): drain on a timer as well.
        let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
        let mut flush_tick = tokio::time::interval(Duration::from_millis(200));
        let mut symbolize_tick = tokio::time::interval(Duration::from_secs(1));
        let mut stacks = Stacks::new();

        // Stream until the duration ends, the command exits or a signal comes.
        let result: Result<()> = async {
            loop {
                tokio::select! {
                    guard = ring.readable_mut() => {
                        let mut guard = guard?;
                        drain(guard.get_inner_mut(), &mut log, &mut stacks)?;
                        guard.clear_ready();
                    }
                    _ = drain_tick.tick() => drain(ring.get_mut(), &mut log, &mut stacks)?,
                    _ = flush_tick.tick() => log.flush()?,
                    _ = symbolize_tick.tick() => stacks.symbolize_pending(),
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

        // Stop: stats first (programs still loaded), then detach, then
        // drain what the kernel already wrote.
        let stats = session.program_stats();
        let sched = session
            .programs
            .contains_key("sched:sched_switch")
            .then(|| sched::snapshot(&session.ebpf));
        session.detach();
        let drained = drain(ring.get_mut(), &mut log, &mut stacks);
        let lost = session.lost().unwrap_or_default();
        drop(ring);
        drop(session);
        log.flush()?;
        result?;
        drained?;

        let elapsed = start.elapsed().as_secs_f64();
        let (ended, _) = clocks();
        meta.status = Status::Complete;
        meta.ended_unix_ns = Some(ended);
        meta.duration_s = Some(elapsed);
        meta.lost = lost.clone();
        rundir::write_json(&dir.join(rundir::META), &meta)?;

        let n_stacks = if stacks.samples > 0 {
            stacks.write_folded(&dir.join(rundir::STACKS))?
        } else {
            0
        };
        if let Some(sched) = sched {
            rundir::write_json(&dir.join(rundir::THREADS), &sched?)?;
        }
        let tl = timeline::Timeline::read(&dir)?;
        let summary = Summary {
            connections: tl.connections.len() as u64,
            events: log.records,
            lost,
            probes: stats,
            duration_s: elapsed,
            truncated_tail: tl.truncated_tail,
            samples: stacks.samples,
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

/// Moves every available record from the ring buffer into the log (and
/// CPU samples into the stack aggregate).
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    log: &mut LogWriter,
    stacks: &mut Stacks,
) -> Result<()> {
    while let Some(item) = ring.next() {
        log.append(&item)?;
        if EventHeader::read(&item).is_some_and(|h| h.kind == kind::CPU_SAMPLE) {
            stacks.add(&item);
        }
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

/// (wall clock ns since epoch, CLOCK_MONOTONIC ns), read back to back.
fn clocks() -> (u64, u64) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (wall, kernel::monotonic_ns())
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
