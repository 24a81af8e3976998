//! `hvprof record`: attach probes, stream events into a run directory for
//! a duration or for the life of a command, detach on every exit path
//! (normal end, Ctrl-C, SIGTERM, SIGHUP, errors), and summarise.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use tokio::signal::unix::SignalKind;

use crate::{
    agent::collector::Collector,
    capture,
    recorder::{self, Recorder},
    rundir,
};

mod live;

/// `--live` without -o records into `$TMPDIR/hvprof-live-<pid>-…`: the
/// recording process's pid tells `hvprof cleanup` which ones are a killed
/// run's.
pub const LIVE_PREFIX: &str = "hvprof-live-";

/// Record probes on a live system into a run directory.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  hvprof record -o run/ --duration 30s\n  hvprof record -o run/ -- curl -s http://127.0.0.1:8080/\n  hvprof record -o run/ --probe tcp --duration 10s\n  hvprof record -o run/ --comm haproxy --duration 10s\n  hvprof record -o run/ --topology bridge-nf -- sh -c 'hvprof load $HVPROF_PROXY/?s=4k -d 5s'"
)]
pub struct RecordArgs {
    /// Run directory to create (must not hold a recording yet); optional
    /// with --live.
    #[arg(short, long, value_name = "DIR", required_unless_present = "live")]
    pub output: Option<PathBuf>,
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
    /// Bring this topology up (see `hvprof topologies`) with origin and
    /// HAProxy in it (and, in a `vm-*` topology, the guest agent), record
    /// host and guest including the path's devices, and tear it all down
    /// at the end. Prints the proxy's address: point a load at it, or give
    /// the load as the command (run in the client's namespace, with
    /// $HVPROF_PROXY set to the proxy's URL).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["collect", "token"])]
    pub topology: Option<String>,
    /// A terminal view refreshed every second: connections/s, CPU per
    /// layer, CPU time the hypervisor took (steal, when any), top
    /// functions, lost events, hvprof's own CPU and memory; `q` or Ctrl-C
    /// quits. Without -o nothing is kept on disk.
    #[arg(long, conflicts_with = "topology")]
    pub live: bool,
    /// Serve Prometheus counters (events and lost events per probe, CPU
    /// samples per layer, connections, the machine's steal, and hvprof's
    /// own process_cpu_seconds_total and process_resident_memory_bytes)
    /// at http://ADDR/metrics while recording [ADDR: 127.0.0.1:9477].
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9477")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Keep only the events of tasks in this cgroup (a cgroup v2
    /// directory, e.g. /sys/fs/cgroup/system.slice/haproxy.service), like
    /// --pid; repeatable.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Vec<PathBuf>,
    /// Keep only this process's CPU samples, function-entry and socket
    /// events (decided in the kernel; packets keep to --dev); repeatable.
    /// A socket is its owner's: the task that connects or listens, and for
    /// an accepted socket its listener's owner.
    #[arg(long, value_name = "PID")]
    pub pid: Vec<u32>,
    /// Keep only the events of threads with this name (`comm`, as `ps -L
    /// -o comm` shows it), like --pid; repeatable, adds to --pid.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// Size of the kernel event ring buffer in MiB (a power of two).
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = parse_ringbuf_mib)]
    pub ringbuf_mib: u32,
    /// TCP sockets followed at once (each open socket holds a kernel map
    /// entry of about 240 bytes until it closes); beyond that, new
    /// sockets are counted lost.
    #[arg(long, value_name = "N", default_value_t = crate::paths::tcp::DEFAULT_MAX_SOCKETS, value_parser = clap::value_parser!(u32).range(2..=4_194_304))]
    pub max_sockets: u32,
    /// CPU sampling frequency per CPU, in Hz.
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = crate::paths::cpu::DEFAULT_HZ, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub freq: u64,
    /// Keep the kernel's BPF run-time statistics on while recording: the
    /// summary then gives each probe's runs and time per run. They cost
    /// every BPF program on the machine two clock reads per run (about a
    /// fifth of hvprof's probe cost here), so they are off by default;
    /// `hvprof probes list --stats` measures a running recording for a
    /// moment instead.
    #[arg(long)]
    pub bpf_stats: bool,
    /// Record every TCP state change of a socket. By default the changes
    /// nothing reads (into FIN_WAIT2, LAST_ACK, CLOSING: a fifth of a
    /// proxied connection's) are skipped in the kernel, which saves about
    /// a tenth of the socket probe's cost.
    #[arg(long)]
    pub all_tcp_states: bool,
    /// Do not print the summary table.
    #[arg(short, long)]
    pub quiet: bool,
    /// Command to run while recording; recording stops when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

impl RecordArgs {
    pub fn run(self) -> Result<ExitCode> {
        if self.duration.is_none() && self.command.is_empty() && !self.live {
            bail!(
                "nothing to record: give --duration D, or a command after `--` (e.g. `hvprof record -o run/ -- sleep 5`)"
            );
        }
        // Validate probe names, filters and the command before touching
        // the kernel.
        recorder::select(&self.probes)?;
        self.tasks()?.validate()?;
        let token = self
            .token
            .as_deref()
            .map(crate::agent::proto::read_token)
            .transpose()?;
        if let Some(cmd) = self.command.first() {
            find_program(cmd)?;
        }
        if let Some(name) = self.topology.clone() {
            return self.run_topology(&name);
        }
        // `--live` without -o: a scratch directory, removed at the end
        // (every return, and Ctrl-C, SIGTERM and SIGHUP, which end the
        // recording in order). Named after this process, so that `hvprof
        // cleanup` finds one a killed run left.
        let (dir, _scratch) = match &self.output {
            Some(o) => (rundir::create(o)?, None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("{LIVE_PREFIX}{}-", std::process::id()))
                    .tempdir()
                    .context("creating a scratch directory for --live")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
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

    /// `--topology`: the topology up with its stand, recorded, torn down.
    fn run_topology(self, name: &str) -> Result<ExitCode> {
        let spec = crate::topology::TopologyArgs {
            topologies: vec![name.to_string()],
            ..Default::default()
        }
        .specs()?
        .pop()
        .context("no topology")?;
        let dir = rundir::create(self.output.as_deref().context("--topology needs -o DIR")?)?;
        let up = crate::topology::Up::start(&spec)
            .with_context(|| format!("bringing up topology {name}"))?;
        let mut devices = up.host_devices();
        devices.extend(self.devices.iter().cloned());
        let opts = recorder::Options {
            probes: self.probes.clone(),
            devices,
            ringbuf_mib: self.ringbuf_mib,
            freq: self.freq,
            load_window: false,
            tasks: self.tasks()?,
            max_sockets: self.max_sockets,
            bpf_stats: self.bpf_stats,
            all_tcp_states: self.all_tcp_states,
        };
        let config = loadgen::sweep::SweepConfig::default();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<Result<std::net::SocketAddr, String>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let up_ref = &up;
        let res = std::thread::scope(|s| {
            // The stand lives in one thread in the client's namespace from
            // start to stop (HAProxy goes with the thread that started it).
            s.spawn(move || {
                up_ref.run_inside(
                    move || match loadgen::sweep::Stand::start(up_ref, &config) {
                        Ok(stand) => {
                            let _ = ready_tx.send(Ok(stand.proxy));
                            let _ = done_rx.recv();
                            drop(stand);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    },
                )
            });
            let res = (|| -> Result<ExitCode> {
                let proxy = ready_rx
                    .recv()
                    .map_err(|_| anyhow::anyhow!("{name}: the stand did not start"))?
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                // From here a stop signal ends the recording in order:
                // its summary written, the topology taken down.
                let _grace = crate::topology::cleanup::stop_in_order(STOP_GRACE);
                let cap = crate::bench::start_capture(up_ref, &dir, opts, name)?;
                let url = format!("http://{proxy}");
                if !self.quiet {
                    eprintln!(
                        "hvprof: {name} up, proxy {url}/ (GET /?s=SIZE){}; recording into {} ({}); Ctrl-C to stop",
                        up_ref.client_netns().map_or(String::new(), |ns| format!(
                            ", reachable from namespace {ns} (ip netns exec {ns} ...)"
                        )),
                        dir.display(),
                        match self.duration {
                            Some(d) => format!("for {}", humantime::format_duration(d)),
                            None => format!("while `{}` runs", self.command.join(" ")),
                        }
                    );
                }
                let exit = wait_for_end(self.duration, &self.command, up_ref.client_netns(), &url);
                let summary = cap.stop()?;
                if !self.quiet {
                    print_summary(&dir, &summary);
                }
                exit
            })();
            drop(done_tx);
            res
        });
        up.stop();
        res
    }

    fn tasks(&self) -> Result<crate::attach::TaskFilter> {
        use std::os::unix::fs::MetadataExt as _;
        let cgroups = self
            .cgroup
            .iter()
            .map(|p| {
                // A cgroup v2 directory's inode number is its id.
                let m = std::fs::metadata(p)
                    .ok()
                    .filter(|m| m.is_dir() && p.join("cgroup.procs").exists());
                m.map(|m| m.ino()).with_context(|| {
                    format!(
                        "--cgroup {}: not a cgroup v2 directory (look under /sys/fs/cgroup)",
                        p.display()
                    )
                })
            })
            .collect::<Result<Vec<u64>>>()?;
        Ok(crate::attach::TaskFilter {
            pids: self.pid.clone(),
            comms: self.comm.clone(),
            cgroups,
        })
    }

    async fn record(self, dir: PathBuf, token: Option<Vec<u8>>) -> Result<ExitCode> {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        // A closed terminal (the live view's) ends it in order too.
        let mut sighup =
            tokio::signal::unix::signal(SignalKind::hangup()).context("listening for SIGHUP")?;
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
            load_window: false,
            tasks: self.tasks()?,
            max_sockets: self.max_sockets,
            bpf_stats: self.bpf_stats,
            all_tcp_states: self.all_tcp_states,
        };
        // Counters for --live and --metrics, fed as events are drained.
        let counters = (self.live || self.metrics.is_some()).then(live::Live::default);
        if let (Some(addr), Some(c)) = (self.metrics, &counters) {
            let bound = live::serve_metrics(addr, c.clone()).await?;
            eprintln!("hvprof: Prometheus metrics at http://{bound}/metrics");
        }
        let view = self.live.then(|| {
            (
                counters.clone().unwrap_or_default(),
                self.freq,
                aya::util::online_cpus().map_or(1, |c| c.len()),
            )
        });
        let _raw = self.live.then(live::RawTerminal::enter);
        // The command starts once the probes are attached.
        let child: RefCell<Option<tokio::process::Child>> = RefCell::new(None);
        let spawn_err: RefCell<Option<anyhow::Error>> = RefCell::new(None);
        let command = self.command.clone();
        let quiet = self.quiet;
        let duration = self.duration;
        let announce = |rec: &mut Recorder| {
            if let Some(c) = &counters {
                rec.set_tap(c.tap());
            }
            if !quiet && view.is_none() {
                eprintln!(
                    "hvprof: recording {} probe(s) into {} ({}); Ctrl-C to stop",
                    rec.attached().len(),
                    dir.display(),
                    match duration {
                        Some(d) => format!("for {}", humantime::format_duration(d)),
                        None if command.is_empty() => "until Ctrl-C".into(),
                        None => format!("while `{}` runs", command.join(" ")),
                    }
                );
            }
            if let Some((prog, args)) = command.split_first() {
                let mut cmd = tokio::process::Command::new(prog);
                // The command goes with hvprof, even a killed one.
                loadgen::haproxy::stop_with_parent(cmd.as_std_mut(), libc::SIGTERM);
                match cmd.args(args).kill_on_drop(true).spawn() {
                    Ok(c) => *child.borrow_mut() = Some(c),
                    Err(e) => {
                        *spawn_err.borrow_mut() =
                            Some(anyhow::anyhow!("cannot run command {prog:?}: {e}"))
                    }
                }
            }
        };
        let stop = async {
            // First polled once the probes are attached: the duration
            // counts from there.
            let deadline = duration.map(|d| tokio::time::Instant::now() + d);
            if spawn_err.borrow().is_some() {
                return ExitCode::FAILURE;
            }
            // Only this future touches the child from here on.
            let mut child = child.borrow_mut().take();
            let mut redraw = tokio::time::interval(Duration::from_secs(1));
            // Process CPU and steal count from here, not from boot.
            let start = view
                .as_ref()
                .map_or_else(live::Counters::default, |(c, _, _)| c.snapshot());
            let mut shown = (start, std::time::Instant::now());
            let quit = live::quit_key();
            tokio::pin!(quit);
            loop {
                tokio::select! {
                    _ = redraw.tick(), if view.is_some() => {
                        if let Some((c, hz, cpus)) = &view {
                            let now = c.snapshot();
                            let secs = shown.1.elapsed().as_secs_f64();
                            print!("\x1b[H\x1b[2J{}", live::render(&now, &shown.0, secs, *hz, *cpus));
                            use std::io::Write as _;
                            let _ = std::io::stdout().flush();
                            shown = (now, std::time::Instant::now());
                        }
                        continue;
                    }
                    _ = &mut quit, if view.is_some() => {
                        stop_child(&mut child, libc::SIGINT).await;
                        break ExitCode::SUCCESS
                    }
                    _ = recorder::sleep_until(deadline) => break ExitCode::SUCCESS,
                    status = wait_child(&mut child) => break match status {
                        Ok(Some(st)) if !st.success() => {
                            eprintln!("hvprof: command exited with {st}");
                            ExitCode::from(st.code().map_or(1, |c| c.clamp(1, 255) as u8))
                        }
                        Ok(_) => ExitCode::SUCCESS,
                        Err(e) => { eprintln!("hvprof: {e:#}"); ExitCode::FAILURE }
                    },
                    _ = sigint.recv() => {
                        stop_child(&mut child, libc::SIGINT).await;
                        // Quitting a live view with Ctrl-C is its normal end.
                        break if view.is_some() { ExitCode::SUCCESS } else { ExitCode::from(130) }
                    }
                    _ = sigterm.recv() => { stop_child(&mut child, libc::SIGTERM).await; break ExitCode::from(143) }
                    _ = sighup.recv() => { stop_child(&mut child, libc::SIGHUP).await; break ExitCode::from(129) }
                }
            }
        };
        let (summary, exit) = capture::run_until(
            &dir,
            &opts,
            "host",
            &self.command,
            collector,
            announce,
            stop,
        )
        .await?;
        if let Some(e) = spawn_err.into_inner() {
            return Err(e);
        }
        if !self.quiet {
            for g in &summary.guests {
                eprintln!(
                    "hvprof: {}: {} events{}{}",
                    g.guest,
                    g.events,
                    g.clock_offset_ns.map_or(String::new(), |o| format!(
                        ", clock offset {o} ns ± {} ns ({})",
                        g.clock_error_ns.unwrap_or(0),
                        g.clock_method.as_deref().unwrap_or("?")
                    )),
                    if g.complete { "" } else { " (incomplete)" }
                );
            }
            if self.output.is_some() {
                print_summary(&dir, &summary);
            }
        }
        Ok(exit)
    }
}

/// Waits for the end of a `--topology` recording: the duration, the
/// command's exit (run in `netns`, with $HVPROF_PROXY), or Ctrl-C/SIGTERM.
fn wait_for_end(
    duration: Option<Duration>,
    command: &[String],
    netns: Option<&str>,
    proxy_url: &str,
) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let mut child = match command.split_first() {
            None => None,
            Some((prog, args)) => {
                let mut cmd = match netns {
                    Some(ns) => {
                        let mut c = tokio::process::Command::new("ip");
                        c.args(["netns", "exec", ns]).arg(prog);
                        c
                    }
                    None => tokio::process::Command::new(prog),
                };
                loadgen::haproxy::stop_with_parent(cmd.as_std_mut(), libc::SIGTERM);
                let c = cmd
                    .args(args)
                    .env("HVPROF_PROXY", proxy_url)
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("cannot run command {prog:?}"))?;
                Some(c)
            }
        };
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        // The topology's signal handler sees every stop signal (it may
        // have been installed after this runtime's).
        let stopped = async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Some(sig) = crate::topology::cleanup::stop_signal() {
                    break sig;
                }
            }
        };
        Ok(tokio::select! {
            _ = recorder::sleep_until(deadline) => {
                stop_child(&mut child, libc::SIGTERM).await;
                ExitCode::SUCCESS
            }
            status = wait_child(&mut child) => match status? {
                Some(st) if !st.success() => {
                    eprintln!("hvprof: command exited with {st}");
                    ExitCode::from(st.code().map_or(1, |c| c.clamp(1, 255) as u8))
                }
                _ => ExitCode::SUCCESS,
            },
            _ = sigint.recv() => { stop_child(&mut child, libc::SIGINT).await; ExitCode::from(130) }
            _ = sigterm.recv() => { stop_child(&mut child, libc::SIGTERM).await; ExitCode::from(143) }
            sig = stopped => {
                stop_child(&mut child, sig).await;
                ExitCode::from(128 + sig.clamp(1, 127) as u8)
            }
        })
    })
}

/// How long a stopped `record --topology` has to write its summary and
/// take its topology down before a stop signal tears down regardless.
const STOP_GRACE: Duration = Duration::from_secs(20);

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

/// Steal from this share of the CPUs' time on is worth a line.
const STEAL_WARN_PCT: f64 = 1.0;

fn print_summary(dir: &Path, s: &capture::Summary) {
    println!(
        "recorded {} events ({} CPU samples), {} connections in {:.2}s -> {}",
        s.events,
        s.samples,
        s.connections,
        s.duration_s,
        dir.display()
    );
    let lost = |name: &str| s.lost.get(name).copied().unwrap_or(0);
    // A probe's own program comes first; programs serving it (the socket
    // probe's batch senders) follow under the same name.
    let serving = |i: usize| i > 0 && s.probes[i - 1].name == s.probes[i].name;
    if s.probes.iter().any(|p| p.run_count.is_none()) {
        println!("{:<28} {:>8}", "probe", "lost");
        let own = s.probes.iter().enumerate().filter(|(i, _)| !serving(*i));
        for (_, p) in own {
            println!("{:<28} {:>8}", p.name, lost(&p.name));
        }
        println!(
            "(runs and time per run: record with --bpf-stats, or `hvprof probes list --stats` while recording)"
        );
    } else {
        println!(
            "{:<28} {:>10} {:>14} {:>10} {:>8}",
            "probe", "runs", "run time ns", "ns/run", "lost"
        );
        for (i, p) in s.probes.iter().enumerate() {
            let (ns, runs) = (p.run_time_ns.unwrap_or(0), p.run_count.unwrap_or(0));
            let (name, lost) = if serving(i) {
                (format!("  + {}", p.program), String::new())
            } else {
                (p.name.clone(), lost(&p.name).to_string())
            };
            println!(
                "{name:<28} {runs:>10} {ns:>14} {:>10.0} {lost:>8}",
                ns as f64 / runs.max(1) as f64,
            );
        }
    }
    let c = &s.cost;
    println!(
        "hvprof's own CPU: recorder {:.2} % of the machine ({} CPUs), programs {}",
        c.recorder_pct,
        c.cpus,
        c.programs_pct.map_or_else(
            || "not measured (--bpf-stats)".to_string(),
            |p| format!("{p:.2} %")
        )
    );
    if let Some(st) = s.steal.as_ref().filter(|st| st.pct >= STEAL_WARN_PCT) {
        println!(
            "note: the hypervisor under this machine took {:.1} % of its CPUs' time during the recording (steal, {:.2} CPU s); it is charged to sched, and rates compare only with runs that had as much",
            st.pct, st.cpu_s
        );
    }
    let total_lost: u64 = s.lost.values().sum();
    if total_lost > 0 {
        println!(
            "WARNING: {total_lost} events lost in the kernel (ring buffer full, more open sockets than --max-sockets, or runs the kernel skipped while another BPF program ran); raise --ringbuf-mib or --max-sockets"
        );
    }
}
