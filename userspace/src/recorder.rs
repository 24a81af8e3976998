//! The recording engine shared by `hvprof record` (events into a run
//! directory) and `hvprof agent` (events streamed to a collector): probe
//! selection, loading with this kernel's offsets, attaching, draining the
//! ring buffer into a sink, and an orderly stop (statistics, detach, final
//! drain, lost counts) on every exit path.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use aya::maps::{MapData, RingBuf};
use hvprof_common::{EventHeader, kind};
use tokio::io::unix::AsyncFd;

use crate::{
    attach::{self, LoadOptions, Probe, ProgramStats},
    catalog::{self, ProbeSpec},
    kernel,
    paths::{
        dev,
        sched::{self, SchedSnapshot},
        tcp, vmexit,
    },
    rundir::meta::{self, Meta, Status},
    stacks::Stacks,
};

/// What to record.
#[derive(Debug, Clone)]
pub struct Options {
    /// Probe, path or layer names; empty: everything available.
    pub probes: Vec<String>,
    /// `[NETNS:]IFNAME` or `all`.
    pub devices: Vec<String>,
    pub ringbuf_mib: u32,
    pub freq: u64,
    /// Count CPU samples only between [`Window::open`] and
    /// [`Window::close`] (a benchmark's load), not from the start.
    pub load_window: bool,
    /// `--pid` / `--comm`.
    pub tasks: attach::TaskFilter,
    /// Open sockets followed at once (`--max-sockets`).
    pub max_sockets: u32,
    /// Keep the kernel's BPF run-time statistics on (`--bpf-stats`).
    pub bpf_stats: bool,
    /// Follow every TCP state change (`--all-tcp-states`).
    pub all_tcp_states: bool,
}

/// Catalog rows for `names` (all rows when empty), and the names of the
/// probes asked for one by one, which must attach (rows selected as a
/// path or layer attach where they can).
pub fn select(names: &[String]) -> Result<(Vec<&'static ProbeSpec>, Vec<&'static str>)> {
    if names.is_empty() {
        return Ok((catalog::all(), Vec::new()));
    }
    let mut out: Vec<&'static ProbeSpec> = Vec::new();
    let mut required = Vec::new();
    for name in names {
        let found = catalog::select(name);
        if found.is_empty() {
            bail!(
                "unknown probe {name:?}; `hvprof probes list` shows the probe, path and layer names"
            );
        }
        for s in found {
            if s.name == name {
                required.push(s.name);
            }
            if !out.iter().any(|o| o.name == s.name) {
                out.push(s);
            }
        }
    }
    Ok((out, required))
}

/// A running recording.
pub struct Recorder {
    session: attach::Session,
    ring: AsyncFd<RingBuf<MapData>>,
    pub stacks: Stacks,
    pub meta: Meta,
    started: Instant,
    pub window: Arc<Window>,
    tap: Option<Box<dyn Tap>>,
}

/// Sees every event as it is drained, and the lost counts about once a
/// second: what a live view or a metrics endpoint is fed from.
pub trait Tap: Send {
    fn event(&mut self, bytes: &[u8]);
    fn lost(&mut self, lost: &BTreeMap<String, u64>);
}

/// The part of a recording CPU samples are counted for: all of it, unless
/// a benchmark marks its load's start and end (from any thread), so that
/// costs per connection and the CPU the load had come from the load alone.
#[derive(Debug)]
pub struct Window {
    start_ns: AtomicU64,
    end_ns: AtomicU64,
    /// The machine's stolen CPU time (`kernel::stat::steal_ns`) at the
    /// marks; `UNKNOWN` until read, or where there is none to read.
    steal_start_ns: AtomicU64,
    steal_end_ns: AtomicU64,
}

const UNKNOWN: u64 = u64::MAX;

fn steal_now() -> u64 {
    kernel::stat::steal_ns().unwrap_or(UNKNOWN)
}

impl Window {
    /// Shut until opened (`gated`), else open from the start.
    fn new(gated: bool) -> Self {
        Self {
            start_ns: AtomicU64::new(if gated { u64::MAX } else { 0 }),
            end_ns: AtomicU64::new(0),
            steal_start_ns: AtomicU64::new(if gated { UNKNOWN } else { steal_now() }),
            steal_end_ns: AtomicU64::new(UNKNOWN),
        }
    }

    /// The load starts now.
    pub fn open(&self) {
        self.steal_start_ns.store(steal_now(), Ordering::SeqCst);
        self.start_ns
            .store(kernel::monotonic_ns(), Ordering::SeqCst);
    }

    /// The load ended now.
    pub fn close(&self) {
        self.end_ns.store(kernel::monotonic_ns(), Ordering::SeqCst);
        self.steal_end_ns.store(steal_now(), Ordering::SeqCst);
    }

    /// CPU seconds the hypervisor took from this machine between the
    /// marks, or from the start until now when no end was marked.
    fn stolen_s(&self) -> Option<f64> {
        let start = self.steal_start_ns.load(Ordering::SeqCst);
        let end = match self.steal_end_ns.load(Ordering::SeqCst) {
            UNKNOWN => steal_now(),
            e => e,
        };
        (start != UNKNOWN && end != UNKNOWN).then(|| end.saturating_sub(start) as f64 / 1e9)
    }

    fn contains(&self, ts_ns: u64) -> bool {
        let end = self.end_ns.load(Ordering::SeqCst);
        ts_ns >= self.start_ns.load(Ordering::SeqCst) && (end == 0 || ts_ns <= end)
    }

    /// Seconds between the marks, when both were made.
    fn span_s(&self) -> Option<f64> {
        let (s, e) = (
            self.start_ns.load(Ordering::SeqCst),
            self.end_ns.load(Ordering::SeqCst),
        );
        (s != 0 && s != u64::MAX && e > s).then(|| (e - s) as f64 / 1e9)
    }
}

/// What a stopped recording leaves.
pub struct Finished {
    pub meta: Meta,
    pub stats: Vec<ProgramStats>,
    pub lost: BTreeMap<String, u64>,
    pub sched: Option<SchedSnapshot>,
    pub kvm: Option<vmexit::KvmSnapshot>,
    pub stacks: Stacks,
    /// CPU seconds the hypervisor took from this machine over the window.
    pub stolen_s: Option<f64>,
}

impl Recorder {
    /// Loads and attaches; `meta` describes the run (status `recording`).
    pub fn start(opts: &Options, topology: &str, command: &[String]) -> Result<Self> {
        let (specs, required) = select(&opts.probes)?;
        let all_devices = opts.devices.iter().any(|d| d == "all");
        let devices = opts
            .devices
            .iter()
            .filter(|d| *d != "all")
            .map(|d| dev::resolve(d))
            .collect::<Result<Vec<_>>>()?;
        let mut loaded = attach::load(&LoadOptions {
            ringbuf_bytes: opts.ringbuf_mib * 1024 * 1024,
            max_sockets: opts.max_sockets,
            dev_filter: !all_devices,
            tasks: &opts.tasks,
            all_tcp_states: opts.all_tcp_states,
        })?;
        dev::install(&mut loaded.ebpf, &devices)?;
        let probe = Probe::detect(&mut loaded.ebpf);
        let mut resolved = probe.resolve(&specs);
        // Device probes only run for devices the user named.
        if devices.is_empty() && !all_devices {
            for r in resolved.iter_mut().filter(|r| r.spec.path == "dev") {
                if r.obtained.take().is_some() {
                    r.reasons
                        .push("no device selected (give --dev IFNAME)".into());
                }
            }
            if resolved
                .iter()
                .any(|r| r.spec.path == "dev" && required.contains(&r.spec.name))
            {
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
        let mut session = attach::attach(
            loaded,
            resolved,
            &required,
            opts.freq,
            opts.bpf_stats,
            &probe.features,
        )?;
        // SAFETY: the ring buffer owns its fd, which stays open for as long
        // as the AsyncFd that owns the ring buffer.
        let ring = unsafe { AsyncFd::register(session.take_events()?) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
        let (started_unix_ns, monotonic_start_ns) = clocks();
        let meta = Meta {
            format: meta::FORMAT.into(),
            version: meta::VERSION,
            hvprof_version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel::release(),
            topology: topology.into(),
            command: command.to_vec(),
            status: Status::Recording,
            started_unix_ns,
            monotonic_start_ns,
            ended_unix_ns: None,
            duration_s: None,
            ringbuf_bytes: u64::from(opts.ringbuf_mib) * 1024 * 1024,
            sample_hz: session
                .programs
                .contains_key("cpu:samples")
                .then_some(opts.freq),
            cpus: aya::util::online_cpus()
                .ok()
                .and_then(|c| u32::try_from(c.len()).ok()),
            all_tcp_states: session
                .programs
                .contains_key(tcp::PROBE)
                .then_some(opts.all_tcp_states),
            hooks_only: attach::hooks_only(),
            probes: session.statuses.clone(),
            functions: session.functions.clone(),
            lost: BTreeMap::new(),
            clock_offsets: Vec::new(),
        };
        Ok(Self {
            session,
            ring,
            stacks: Stacks::new(),
            meta,
            started: Instant::now(),
            window: Arc::new(Window::new(opts.load_window)),
            tap: None,
        })
    }

    /// Feeds `tap` every event from now on.
    pub fn set_tap(&mut self, tap: Box<dyn Tap>) {
        self.tap = Some(tap);
    }

    /// Hands the tap the kernel's lost counts.
    pub fn tap_lost(&mut self) {
        if let Some(t) = &mut self.tap
            && let Ok(lost) = self.session.lost()
        {
            t.lost(&lost);
        }
    }

    /// Names of the attached probes.
    pub fn attached(&self) -> Vec<&'static str> {
        self.session.programs.keys().copied().collect()
    }

    /// Waits until the kernel signals events (it does so only when the ring
    /// fills up; call [`Self::drain`] on a short timer too), then drains.
    pub async fn wait_and_drain(
        &mut self,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        drain_ring(
            guard.get_inner_mut(),
            &mut self.stacks,
            &self.window,
            &mut self.tap,
            &mut sink,
        )?;
        guard.clear_ready();
        Ok(())
    }

    /// Moves every available event into `sink`.
    pub fn drain(&mut self, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        drain_ring(
            self.ring.get_mut(),
            &mut self.stacks,
            &self.window,
            &mut self.tap,
            &mut sink,
        )
    }

    /// Stops: statistics first (programs still loaded), then detach, then
    /// the final drain and the lost counts.
    pub fn finish(mut self, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<Finished> {
        // The recording's window ends here: the sampler and the scheduler
        // accounting are detached first (see `Session::detach`).
        let duration_s = self
            .window
            .span_s()
            .unwrap_or_else(|| self.started.elapsed().as_secs_f64());
        let stolen_s = self.window.stolen_s();
        log::debug!("recording stops after {duration_s:.3}s");
        let stats = self.session.program_stats();
        let sched = self
            .session
            .programs
            .contains_key("sched:sched_switch")
            .then(|| sched::snapshot(&self.session.ebpf))
            .transpose()?;
        let kvm = self
            .session
            .programs
            .contains_key("kvm:kvm_exit")
            .then(|| vmexit::snapshot(&self.session.ebpf))
            .transpose()?;
        self.session.detach();
        let drained = drain_ring(
            self.ring.get_mut(),
            &mut self.stacks,
            &self.window,
            &mut self.tap,
            &mut sink,
        )
        .and_then(|()| {
            // Lives closed but not sent yet, and sockets still open (their
            // lives so far), and packets not sent yet, from the kernel's
            // maps.
            let ebpf = &self.session.ebpf;
            let attached = |p: &str| self.session.programs.contains_key(p);
            let mut waiting = Vec::new();
            if attached(tcp::PROBE) {
                waiting.extend(tcp::unsent_lives(ebpf)?);
                waiting.extend(tcp::open_lives(ebpf)?);
            }
            if dev::PATH.rows.iter().any(|r| attached(r.name)) {
                waiting.extend(dev::unsent_packets(ebpf)?);
            }
            for rec in waiting {
                keep(&rec, &mut sink, &mut self.tap)?;
            }
            Ok(())
        });
        let lost = self.session.lost().unwrap_or_default();
        drop(self.ring);
        drop(self.session);
        drained?;
        let mut meta = self.meta;
        meta.status = Status::Complete;
        meta.ended_unix_ns = Some(clocks().0);
        meta.duration_s = Some(duration_s);
        meta.lost = lost.clone();
        Ok(Finished {
            meta,
            stats,
            lost,
            sched,
            kvm,
            stacks: self.stacks,
            stolen_s,
        })
    }
}

/// Drain period: the kernel wakes the reader only when the ring is a
/// quarter full.
pub const DRAIN_EVERY: Duration = Duration::from_millis(50);

fn drain_ring(
    ring: &mut RingBuf<MapData>,
    stacks: &mut Stacks,
    window: &Window,
    tap: &mut Option<Box<dyn Tap>>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    while let Some(item) = ring.next() {
        let head = EventHeader::read(&item);
        if let Some(items) = head.and_then(|h| crate::batch::items(&item, h.kind)) {
            // Events that crossed together are kept one by one.
            for one in items {
                keep(one, sink, tap)?;
            }
            continue;
        }
        keep(&item, sink, tap)?;
        if head.is_some_and(|h| h.kind == kind::CPU_SAMPLE && window.contains(h.ts_ns)) {
            stacks.add(&item);
        }
    }
    Ok(())
}

/// Writes the record `rec` to the event log and shows it to the live
/// view, if there is one.
fn keep(
    rec: &[u8],
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    tap: &mut Option<Box<dyn Tap>>,
) -> Result<()> {
    sink(rec)?;
    if let Some(t) = tap {
        t.event(rec);
    }
    Ok(())
}

/// Sleeps until `deadline`, forever without one (a `select!` arm for an
/// optional duration).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// (wall clock ns since epoch, CLOCK_MONOTONIC ns), read back to back.
pub fn clocks() -> (u64, u64) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (wall, kernel::monotonic_ns())
}
