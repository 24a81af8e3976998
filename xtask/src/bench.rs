//! `cargo xtask bench load`: the load generator's quality bar, measured
//! side by side. `hvprof load` and `wrk -H 'Connection: close'` take turns
//! (alternating which goes first) against the same HAProxy + origin stand
//! (`hvprof bench --serve`) at 0 and 64K, with the same threads and
//! concurrency; prints each one's conn/s and the ratio. Then compares
//! origins: `hvprof load` straight against `hvprof origin`, nginx and
//! HAProxy (`http-request return`) serving the same objects.
//! A benchmark, not a test: it prints numbers and fails only when a tool
//! can't run.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Options of `cargo xtask bench load`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchLoadArgs {
    /// Seconds per measurement.
    #[arg(short, long, default_value_t = 5)]
    pub duration: u64,
    /// Client threads (both tools).
    #[arg(short, long, default_value_t = 1)]
    pub threads: usize,
    /// Connections in flight (both tools).
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Alternating rounds per size (each round runs both tools once).
    #[arg(short, long, default_value_t = 3)]
    pub rounds: usize,
    /// HAProxy threads.
    #[arg(long, default_value_t = 1)]
    pub haproxy_threads: usize,
    /// Skip the origin comparison (hvprof origin vs nginx vs HAProxy).
    #[arg(long)]
    pub no_origins: bool,
    /// Don't build; use target/release/hvprof as it is.
    #[arg(long)]
    pub no_build: bool,
}

impl Default for BenchLoadArgs {
    fn default() -> Self {
        Self {
            duration: 5,
            threads: 1,
            concurrency: 64,
            rounds: 3,
            haproxy_threads: 1,
            no_origins: false,
            no_build: false,
        }
    }
}

const SIZES: [&str; 2] = ["0", "64k"];

/// A child we started, stopped by pid (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Guard(pub(crate) Option<Child>);

impl Guard {
    pub(crate) fn stop(&mut self) {
        let Some(mut c) = self.0.take() else { return };
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {program} >/dev/null 2>&1 || test -x /usr/sbin/{program}"),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listened on 127.0.0.1:{port} within {limit:?}")
}

/// The number after `"key":` in a JSON text (enough for our own reports).
fn json_number(text: &str, key: &str) -> Option<f64> {
    let i = text.find(&format!("\"{key}\""))?;
    let rest = text[i + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))?;
    rest[..end].parse().ok()
}

/// Runs `program args` under bash's `time`; returns stdout and the
/// child's user + system CPU seconds.
fn timed(program: &Path, args: &[String]) -> Result<(String, f64)> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"TIMEFORMAT="hvprof-xtask-cpu %U %S"; time "$@" 2>/dev/null"#)
        .arg("bash")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let err = String::from_utf8_lossy(&out.stderr);
    let cpu = err
        .lines()
        .find_map(|l| l.strip_prefix("hvprof-xtask-cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse::<f64>().ok())
                .sum::<f64>()
        })
        .unwrap_or(f64::NAN);
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), cpu))
}

/// One measurement: rate, errors, client CPU per connection (µs).
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    errors: u64,
    cpu_us_per_conn: f64,
}

impl Run {
    fn new(rate: f64, errors: u64, cpu_s: f64, a: &BenchLoadArgs) -> Self {
        let conns = (rate * a.duration as f64).max(1.0);
        Self {
            rate,
            errors,
            cpu_us_per_conn: cpu_s * 1e6 / conns,
        }
    }
}

/// One `hvprof load` run.
fn hvprof_load(bin: &Path, url: &str, a: &BenchLoadArgs) -> Result<Run> {
    let args: Vec<String> = [
        "load",
        url,
        "-q",
        "--json",
        "-",
        "-t",
        &a.threads.to_string(),
        "-c",
        &a.concurrency.to_string(),
        "-d",
        &format!("{}s", a.duration),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (text, cpu) = timed(bin, &args)?;
    let cps = json_number(&text, "conn_per_s")
        .with_context(|| format!("no conn_per_s in hvprof output: {text}"))?;
    let errors = [
        "refused",
        "timeout",
        "reset",
        "bad_status",
        "short_body",
        "bad_response",
        "other",
    ]
    .iter()
    .filter_map(|k| json_number(&text, k))
    .sum::<f64>() as u64;
    Ok(Run::new(cps, errors, cpu, a))
}

/// One `wrk -H 'Connection: close'` run (its requests/s is its conn/s).
fn wrk(url: &str, a: &BenchLoadArgs) -> Result<Run> {
    let args: Vec<String> = [
        "-H",
        "Connection: close",
        "-t",
        &a.threads.to_string(),
        "-c",
        &a.concurrency.to_string(),
        "-d",
        &format!("{}s", a.duration),
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (text, cpu) = timed(Path::new("wrk"), &args)?;
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let mut errors = 0;
    for l in text.lines() {
        if let Some(rest) = l.trim().strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = l.trim().strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(Run::new(rps, errors, cpu, a))
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        // An even count: the mean of the two middle values (the upper one
        // alone leans every figure one way).
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `cargo xtask bench load`.
pub fn bench_load(a: &BenchLoadArgs) -> Result<()> {
    let root = crate::root();
    if !a.no_build {
        crate::run_cmd(
            Command::new("cargo")
                .args(["build", "--release", "-p", "hvprof"])
                .current_dir(&root),
        )?;
    }
    let bin = root.join("target/release/hvprof");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with cargo build --release -p hvprof",
            bin.display()
        );
    }
    for tool in ["wrk", "haproxy"] {
        if !have(tool) {
            bail!("{tool} is not installed: run cargo xtask setup (Debian package {tool})");
        }
    }
    let (mut stand, proxy) = start_stand(&bin, a.haproxy_threads)?;
    println!(
        "close mode through HAProxy ({} thread(s)) + hvprof origin; client: {} thread(s), {} connections, {} s per run, {} alternating rounds",
        a.haproxy_threads, a.threads, a.concurrency, a.duration, a.rounds
    );
    println!(
        "{:>5} {:>13} {:>13} {:>7} {:>13} {:>13}   per round: hvprof/wrk conn/s",
        "size", "hvprof conn/s", "wrk conn/s", "ratio", "hvprof CPU/c", "wrk CPU/c"
    );
    for size in SIZES {
        let url = format!("{proxy}/?s={size}");
        let (mut hv, mut wk) = (Vec::new(), Vec::new());
        let (mut hv_cpu, mut wk_cpu) = (Vec::new(), Vec::new());
        let mut rounds = Vec::new();
        let mut errs = (0, 0);
        for round in 0..a.rounds {
            // Alternate who goes first, so drift favours neither.
            let (h, w) = if round % 2 == 0 {
                let h = hvprof_load(&bin, &url, a)?;
                (h, wrk(&url, a)?)
            } else {
                let w = wrk(&url, a)?;
                (hvprof_load(&bin, &url, a)?, w)
            };
            hv.push(h.rate);
            wk.push(w.rate);
            hv_cpu.push(h.cpu_us_per_conn);
            wk_cpu.push(w.cpu_us_per_conn);
            errs.0 += h.errors;
            errs.1 += w.errors;
            rounds.push(format!("{:.0}/{:.0}", h.rate, w.rate));
        }
        // The machine's speed drifts between rounds: the ratio is the
        // median of each round's paired ratio, as in `bench overhead`.
        let mut ratios: Vec<f64> = hv
            .iter()
            .zip(&wk)
            .map(|(h, w)| if *w > 0.0 { h / w } else { f64::NAN })
            .collect();
        let ratio = median(&mut ratios);
        let (h, w) = (median(&mut hv), median(&mut wk));
        println!(
            "{:>5} {:>13.0} {:>13.0} {:>6.2}x {:>10.1} us {:>10.1} us   {}{}",
            size,
            h,
            w,
            ratio,
            median(&mut hv_cpu),
            median(&mut wk_cpu),
            rounds.join("  "),
            if errs != (0, 0) {
                format!("  (errors: hvprof {}, wrk {})", errs.0, errs.1)
            } else {
                String::new()
            }
        );
    }
    println!(
        "(conn/s: medians over the rounds; ratio: median of the rounds' paired hvprof/wrk ratios; \
         CPU/c: client user+system CPU per connection, the number that does not depend on what \
         else shares the cores)"
    );
    stand.stop();
    if !a.no_origins {
        compare_origins(&bin, a)?;
    }
    Ok(())
}

/// Starts origin + HAProxy in the seed's mode (`hvprof bench --serve`),
/// up until the guard stops it; returns the proxy's base URL.
pub(crate) fn start_stand(bin: &Path, haproxy_threads: usize) -> Result<(Guard, String)> {
    let mut serve = Command::new(bin)
        .args([
            "bench",
            "--serve",
            "--haproxy-threads",
            &haproxy_threads.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start hvprof bench --serve")?;
    let stdout = serve.stdout.take().context("no stdout")?;
    let stand = Guard(Some(serve));
    let mut proxy = None;
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    while lines.read_line(&mut line)? > 0 {
        if let Some(rest) = line.strip_prefix("proxy ") {
            proxy = rest
                .split_whitespace()
                .next()
                .map(|u| u.trim_end_matches('/').to_string());
            break;
        }
        line.clear();
    }
    // Keep reading what it prints next, or its writes would fail.
    std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
    let proxy = proxy.context("hvprof bench --serve printed no proxy address")?;
    Ok((stand, proxy))
}

/// Adds each program's run time (ns) and run count in a recording's
/// `summary.json` (with `--bpf-stats`) to `programs`, by program name.
pub(crate) fn add_program_stats(
    summary: &serde_json::Value,
    programs: &mut std::collections::BTreeMap<String, (f64, f64)>,
) {
    for p in summary["probes"].as_array().into_iter().flatten() {
        let name = p["program"].as_str().unwrap_or("?").to_string();
        let e = programs.entry(name).or_default();
        e.0 += p["run_time_ns"].as_f64().unwrap_or(0.0);
        e.1 += p["run_count"].as_f64().unwrap_or(0.0);
    }
}

/// A close-mode `hvprof load`: where, how many client threads and
/// connections in flight, for how long.
pub(crate) struct ClosedLoad<'a> {
    pub url: &'a str,
    pub threads: usize,
    pub concurrency: usize,
    pub duration_s: u64,
}

/// `hvprof record -q EXTRA -o DIR -- hvprof load URL -q -t T -c C -d Ds
/// --json JSON`: a close-mode load recorded from its start to its end.
pub(crate) fn recorded_load(
    bin: &Path,
    extra: &[&str],
    dir: &Path,
    load: &ClosedLoad,
    json: &Path,
) -> Command {
    let ClosedLoad {
        url,
        threads,
        concurrency,
        duration_s,
    } = *load;
    let mut cmd = Command::new(bin);
    cmd.args(["record", "-q"])
        .args(extra)
        .arg("-o")
        .arg(dir)
        .arg("--")
        .arg(bin)
        .args([
            "load",
            url,
            "-q",
            "-t",
            &threads.to_string(),
            "-c",
            &concurrency.to_string(),
            "-d",
            &format!("{duration_s}s"),
            "--json",
        ])
        .arg(json);
    cmd
}

/// Options of `cargo xtask bench overhead`.
#[derive(clap::Args, Debug, Clone)]
pub struct OverheadArgs {
    /// Seconds per measurement.
    #[arg(short, long, default_value_t = 3)]
    pub duration: u64,
    /// A/B rounds (each round runs each load once, taking turns going
    /// first). The machine's own speed drifts between rounds: the overhead
    /// is the median of each round's paired ratio, printed with its
    /// distribution-free 95 % confidence interval (the whole range up to
    /// 8 rounds; from 9, narrower).
    #[arg(short, long, default_value_t = 8)]
    pub rounds: usize,
    /// Connections in flight.
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Don't rebuild hvprof first.
    #[arg(long)]
    pub no_build: bool,
    /// Leave the per-packet device probes off (the default of `hvprof
    /// record`), instead of tracing every packet on `lo`.
    #[arg(long)]
    pub no_packets: bool,
    /// Attach only this probe in the probed runs (a name, path or layer,
    /// as `hvprof record --probe` takes it); repeatable. Default: every
    /// probe available here. For the cost of one probe alone.
    #[arg(short, long = "probe", value_name = "NAME")]
    pub probes: Vec<String>,
    /// Record only the threads with this name (`hvprof record --comm`,
    /// e.g. `haproxy`); repeatable. For the cost of profiling one program
    /// on a busy machine: the others' sockets and samples are left out in
    /// the kernel.
    #[arg(long, value_name = "NAME")]
    pub comm: Vec<String>,
    /// Also run, in each round, the same probes attached with every
    /// program returning at once (`HVPROF_HOOKS_ONLY=1`): what the
    /// attachment points alone cost, the floor under any program, and
    /// what the programs' work adds on top of it. (`HVPROF_HOOKS_ONLY=1`
    /// set for the whole benchmark makes every probed load a hooks-only
    /// one instead: two loads a round, the floor alone, faster.)
    #[arg(long)]
    pub floor: bool,
}

/// The loads of an overhead round.
#[derive(Debug, Clone, Copy)]
enum ArmKind {
    /// Nothing attached.
    Plain,
    /// The probes attached, their programs returning at once.
    Hooks,
    /// The probes attached, as `hvprof record` runs them.
    Probed,
}

/// Probe overhead, A/B: the 0-byte close-mode benchmark through HAProxy
/// on `native`, plain (A) and under `hvprof record` with every probe
/// available here (or those of `--probe`) plus the loopback device (B).
/// Prints conn/s of each, the overhead and per-program ns per run from the
/// kernel's BPF statistics.
pub fn bench_overhead(o: &OverheadArgs) -> Result<()> {
    // Set in this environment, it reaches every recorded load: the probed
    // loads are then the hooks alone, and say so.
    let hooks_env = std::env::var_os(HOOKS_ONLY_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    if hooks_env && o.floor {
        bail!(
            "--floor runs its own hooks-only loads: unset {HOOKS_ONLY_ENV} to compare them with \
             the probes as `hvprof record` runs them"
        );
    }
    let root = crate::root();
    if !o.no_build {
        crate::build_release()?;
    }
    let bin = root.join("target/release/hvprof");
    let a = BenchLoadArgs {
        duration: o.duration,
        threads: 1,
        concurrency: o.concurrency,
        rounds: o.rounds,
        haproxy_threads: 1,
        no_build: true,
        no_origins: true,
    };
    let (mut stand, proxy) = start_stand(&bin, 1)?;
    let url = format!("{proxy}/?s=0");
    let tmp = std::env::temp_dir().join(format!("hvprof-overhead-{}", std::process::id()));
    let _cleanup = DirGuard(tmp.clone());
    let (mut plain, mut probed, mut hooks) = (Vec::new(), Vec::new(), Vec::new());
    let mut programs: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    let mut lost = 0.0;
    // The recorder's own CPU seconds while its load ran, and those seconds.
    let mut recorder = (0.0, 0.0);
    println!(
        "probe overhead: 0-byte close mode through HAProxy on native, {} s per run, {} {} rounds",
        o.duration,
        o.rounds,
        if o.floor { "A/F/B" } else { "A/B" }
    );
    let load = ClosedLoad {
        url: &url,
        threads: a.threads,
        concurrency: o.concurrency,
        duration_s: o.duration,
    };
    // One recorded load (B, or F with `hooks_only`); with the kernel's BPF
    // statistics on, its programs' run time and count are added to
    // `programs`.
    let mut b_run = |run: String, bpf_stats: bool, hooks_only: bool| -> Result<Arm> {
        let dir = tmp.join(&run);
        let json = tmp.join(format!("{run}.json"));
        let mut extra: Vec<&str> = if o.no_packets {
            vec![]
        } else {
            vec!["--dev", "lo"]
        };
        if bpf_stats {
            extra.push("--bpf-stats");
        }
        for p in &o.probes {
            extra.extend(["--probe", p]);
        }
        for c in &o.comm {
            extra.extend(["--comm", c]);
        }
        let mut cmd = recorded_load(&bin, &extra, &dir, &load, &json);
        if hooks_only || hooks_env {
            // Its warning that nothing is recorded is this arm's point.
            cmd.env(HOOKS_ONLY_ENV, "1")
                .env("RUST_LOG", "warn,hvprof::attach=error");
        }
        let mut child = cmd.spawn().context("running hvprof record")?;
        let (status, cpu, busy) = recorder_cpu_during_load(&mut child, o.duration)?;
        if !status.success() {
            bail!("hvprof record failed: {status}");
        }
        let text = std::fs::read_to_string(&json)?;
        let cps = json_number(&text, "conn_per_s").context("no conn_per_s")?;
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)?;
        if bpf_stats {
            add_program_stats(&summary, &mut programs);
        } else if !hooks_only {
            recorder.0 += cpu.0;
            recorder.1 += cpu.1;
        }
        lost += summary["lost"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_f64())
            .sum::<f64>();
        Ok(Arm::new(cps, busy))
    };
    // Machine CPU per connection (µs) of each run, from the middle of its
    // load: what the rate alone can't show on a machine that isn't fully
    // busy, where the rate also follows how fast idle CPUs wake.
    let (mut plain_cpu, mut probed_cpu, mut hooks_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut steal = Vec::new();
    // The larger steal of each round's two loads (NaN: not measured).
    let mut round_steal = Vec::new();
    let a_run = || -> Result<Arm> {
        let busy = busy_share_later(o.duration);
        let rate = hvprof_load(&bin, &url, &a)?.rate;
        Ok(Arm::new(rate, busy.join().ok().flatten()))
    };
    let mut kinds = vec![ArmKind::Plain, ArmKind::Probed];
    if o.floor {
        kinds.insert(1, ArmKind::Hooks);
    }
    for round in 0..o.rounds {
        // Each kind of load goes first in turn, against the machine's drift.
        let mut order = kinds.clone();
        order.rotate_left(round % kinds.len());
        let (mut pa, mut pb, mut pf) = (None, None, None);
        for kind in order {
            match kind {
                ArmKind::Plain => pa = Some(a_run()?),
                ArmKind::Probed => pb = Some(b_run(format!("run{round}"), false, false)?),
                ArmKind::Hooks => pf = Some(b_run(format!("hooks{round}"), false, true)?),
            }
        }
        let (Some(pa), Some(pb)) = (pa, pb) else {
            bail!("round {round} ran without its plain or probed load");
        };
        plain.push(pa.rate);
        plain_cpu.push(pa.cpu_us);
        probed.push(pb.rate);
        probed_cpu.push(pb.cpu_us);
        let mut stolen = pa.steal_pct.max(pb.steal_pct);
        steal.extend([pa.steal_pct, pb.steal_pct]);
        let mut floor_note = String::new();
        if let Some(pf) = &pf {
            hooks.push(pf.rate);
            hooks_cpu.push(pf.cpu_us);
            stolen = stolen.max(pf.steal_pct);
            steal.push(pf.steal_pct);
            floor_note = format!(
                ", hooks only {:.0} conn/s {:.1} CPU µs/conn",
                pf.rate, pf.cpu_us
            );
        }
        round_steal.push(stolen);
        println!(
            "  round {}: plain {:.0} conn/s {:.1} CPU µs/conn, probed {:.0} conn/s {:.1} CPU µs/conn{floor_note}{}",
            round + 1,
            pa.rate,
            pa.cpu_us,
            pb.rate,
            pb.cpu_us,
            stolen_note(&[Some(&pa), Some(&pb), pf.as_ref()]),
        );
    }
    // The statistics cost every program two clock reads per run: they are
    // off in the rounds above and on in one more recorded load, for the
    // time per run alone.
    let stats_cps = b_run("stats".into(), true, false)?.rate;
    stand.stop();
    let mut with = if o.probes.is_empty() {
        "with every probe".to_string()
    } else {
        format!("with {}", o.probes.join(", "))
    };
    if !o.comm.is_empty() {
        with += &format!(" (--comm {})", o.comm.join(", "));
    }
    if hooks_env {
        with += &format!(", every program returning at once ({HOOKS_ONLY_ENV}),");
    }
    let rate = paired(&plain, &probed);
    let calm = calm_rounds(&plain, &probed, &round_steal);
    // With --floor: the hooks against nothing, and the programs' work
    // (every probe against the hooks alone), each paired within rounds.
    let floor = o.floor.then(|| {
        (
            paired(&plain, &hooks),
            paired(&hooks, &probed),
            paired(&plain_cpu, &hooks_cpu),
        )
    });
    let (pa, pb) = (median(&mut plain), median(&mut probed));
    println!(
        "plain {pa:.0} conn/s, {with} {pb:.0} conn/s (medians); overhead {:.1}% \
         (median of the rounds' paired ratios; {:.0}% confidence {:.1}% .. {:.1}%); lost events {lost:.0}",
        100.0 * (1.0 - rate.median),
        100.0 * rate.confidence,
        100.0 * (1.0 - rate.high),
        100.0 * (1.0 - rate.low),
    );
    steal.retain(|v| v.is_finite());
    let worst = steal.iter().copied().fold(0.0, f64::max);
    if worst >= 1.0 {
        println!(
            "the hypervisor under this machine took up to {worst:.1}% of its CPU time during a load \
             (steal; median {:.1}%): rates drift with it, the paired ratios less",
            median(&mut steal)
        );
        if let Some((n, calm)) = calm {
            println!(
                "the {n} rounds with under {CALM_STEAL_PCT}% steal in both loads: overhead {:.1}% \
                 ({:.0}% confidence {:.1}% .. {:.1}%)",
                100.0 * (1.0 - calm.median),
                100.0 * calm.confidence,
                100.0 * (1.0 - calm.high),
                100.0 * (1.0 - calm.low),
            );
        }
    }
    if let Some((hooks_rate, work, hooks_cpu_ratio)) = floor {
        println!(
            "the hooks alone (the same probes, every program returning at once): {:.0} conn/s \
             (median); overhead {:.1}% ({:.0}% confidence {:.1}% .. {:.1}%), machine CPU per \
             connection {:+.1}% ({:+.1}% .. {:+.1}%); the programs' work on top of them: {:.1}% \
             ({:.1}% .. {:.1}%)",
            median(&mut hooks),
            100.0 * (1.0 - hooks_rate.median),
            100.0 * hooks_rate.confidence,
            100.0 * (1.0 - hooks_rate.high),
            100.0 * (1.0 - hooks_rate.low),
            100.0 * (hooks_cpu_ratio.median - 1.0),
            100.0 * (hooks_cpu_ratio.low - 1.0),
            100.0 * (hooks_cpu_ratio.high - 1.0),
            100.0 * (1.0 - work.median),
            100.0 * (1.0 - work.high),
            100.0 * (1.0 - work.low),
        );
    }
    let cpu = paired(&plain_cpu, &probed_cpu);
    if cpu.median.is_finite() {
        println!(
            "machine CPU per connection: plain {:.1} µs, {with} {:.1} µs (medians); {:+.1}% \
             (median of the rounds' paired ratios; {:.0}% confidence {:+.1}% .. {:+.1}%)",
            median(&mut plain_cpu),
            median(&mut probed_cpu),
            100.0 * (cpu.median - 1.0),
            100.0 * cpu.confidence,
            100.0 * (cpu.low - 1.0),
            100.0 * (cpu.high - 1.0),
        );
    }
    // The programs' own CPU time, from the kernel's statistics: a share
    // the machine's drifting speed doesn't blur (somewhat high, as the
    // statistics' own clock reads are inside it).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bpf_ns: f64 = programs.values().map(|(ns, _)| ns).sum();
    let bpf_share = 100.0 * bpf_ns / (cpus * 1e9 * o.duration as f64);
    println!(
        "CPU time in hvprof's programs: {bpf_share:.2}% of the machine ({cpus} CPUs), from one more \
         recorded load with --bpf-stats ({stats_cps:.0} conn/s)"
    );
    if recorder.1 > 0.0 {
        let rec_share = 100.0 * recorder.0 / (cpus * recorder.1);
        println!(
            "CPU time in the recorder (user space) during the load: {rec_share:.2}%; hvprof in all: {:.2}% of the machine",
            bpf_share + rec_share
        );
    }
    // Per connection of that load: what a program costs each request,
    // however fast the machine happened to run.
    let conns = (stats_cps * o.duration as f64).max(1.0);
    println!(
        "{:<20} {:>14} {:>12} {:>9} {:>10} {:>9}",
        "program", "runs", "run time ms", "ns/run", "runs/conn", "ns/conn"
    );
    for (name, (ns, runs)) in &programs {
        println!(
            "{name:<20} {runs:>14.0} {:>12.1} {:>9.0} {:>10.2} {:>9.0}",
            ns / 1e6,
            if *runs > 0.0 { ns / runs } else { 0.0 },
            runs / conns,
            ns / conns
        );
    }
    Ok(())
}

/// Steal (% of the CPUs' time) under which a round counts as calm.
const CALM_STEAL_PCT: f64 = 1.0;

/// `hvprof record`'s switch for programs that return at once (as
/// `hvprof::attach::HOOKS_ONLY_ENV`; xtask doesn't link hvprof).
const HOOKS_ONLY_ENV: &str = "HVPROF_HOOKS_ONLY";

/// The paired ratios of the rounds whose loads both had less than
/// [`CALM_STEAL_PCT`] steal (`steal`: each round's larger share), and how
/// many there were: `None` unless some rounds had more and at least 3 had
/// less (the rates of a round the hypervisor slowed say more about it
/// than about hvprof).
fn calm_rounds(a: &[f64], b: &[f64], steal: &[f64]) -> Option<(usize, Paired)> {
    let calm: Vec<usize> = (0..steal.len())
        .filter(|&i| steal[i] < CALM_STEAL_PCT)
        .collect();
    if calm.len() < 3 || calm.len() == steal.len() {
        return None;
    }
    let pick = |v: &[f64]| {
        calm.iter()
            .filter_map(|&i| v.get(i).copied())
            .collect::<Vec<_>>()
    };
    Some((calm.len(), paired(&pick(a), &pick(b))))
}

/// Each round's ratio `b / a` (the two runs of a round are close in time,
/// while the machine's speed drifts between rounds), leaving out rounds
/// without a figure: their median and its confidence interval (NaN if no
/// round has a figure).
pub(crate) fn paired(a: &[f64], b: &[f64]) -> Paired {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| b / a)
        .filter(|r| r.is_finite())
        .collect();
    if r.is_empty() {
        return Paired {
            median: f64::NAN,
            low: f64::NAN,
            high: f64::NAN,
            confidence: 0.0,
        };
    }
    let median = median(&mut r);
    let (k, confidence) = median_rank(r.len());
    Paired {
        median,
        low: r[k],
        high: r[r.len() - 1 - k],
        confidence,
    }
}

/// The median of paired ratios and the interval that holds the true
/// median with probability `confidence`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paired {
    pub(crate) median: f64,
    pub(crate) low: f64,
    pub(crate) high: f64,
    pub(crate) confidence: f64,
}

/// The distribution-free confidence interval of a median from `n` sorted
/// values: `(k, c)` such that values `k` and `n - 1 - k` (from 0) bound
/// the true median with probability `c`, the narrowest with `c` ≥ 95 %
/// (the whole range, with what confidence it has, when `n` is too small
/// for that). Each value lies below the median with probability ½, so
/// the count below it is Binomial(n, ½).
fn median_rank(n: usize) -> (usize, f64) {
    // P(B ≤ j) for B ~ Binomial(n, ½), j = 0, 1, ...
    let mut below = 0.0;
    let mut term = 0.5f64.powi(n as i32);
    let mut best = (0, 1.0 - 2.0 * term);
    for j in 0..n / 2 {
        below += term;
        // Values j+1 and n-2-j bound the median unless the count below it
        // is j+1 or less, or (as likely) n-2-j or more.
        let c = 1.0 - 2.0 * (below + term * (n - j) as f64 / (j + 1) as f64);
        if c < 0.95 {
            break;
        }
        best = (j + 1, c);
        term *= (n - j) as f64 / (j + 1) as f64;
    }
    best
}

/// `hvprof load` straight against each origin, same objects and settings.
fn compare_origins(bin: &Path, a: &BenchLoadArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hvprof-bench-origins-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www"))?;
    let _cleanup = DirGuard(dir.clone());
    for (name, bytes) in [("0", 0usize), ("64k", 65536)] {
        let body: Vec<u8> = (0..bytes).map(|i| b"0123456789abcdef"[i % 16]).collect();
        std::fs::write(dir.join("www").join(format!("obj_{name}")), body)?;
    }
    println!();
    println!(
        "origins, close mode, no proxy (hvprof load, same settings; one server thread/worker each; CPU/c = server CPU per connection):"
    );
    println!(
        "{:<16} {:>10} {:>12} {:>10} {:>12}",
        "server", "0 conn/s", "0 CPU us/c", "64k conn/s", "64k CPU us/c"
    );
    type Starter = fn(&Path, &Path, u16) -> Result<Option<Child>>;
    let servers: [(&str, Starter); 3] = [
        ("hvprof origin", start_hvprof_origin),
        ("nginx", start_nginx),
        ("haproxy return", start_haproxy_origin),
    ];
    for (name, start) in servers {
        let port = free_port()?;
        let Some(child) = start(bin, &dir, port)? else {
            println!("{name:<16} (not installed: apt-get install nginx-light)");
            continue;
        };
        let _g = Guard(Some(child));
        wait_port(port, Duration::from_secs(10))
            .with_context(|| format!("{name} did not start"))?;
        let pid = _g.0.as_ref().map_or(0, Child::id);
        let mut cols = Vec::new();
        for size in SIZES {
            let cpu0 = tree_cpu_seconds(pid);
            let Run {
                rate: cps, errors, ..
            } = hvprof_load(bin, &format!("http://127.0.0.1:{port}/?s={size}"), a)?;
            let cpu = tree_cpu_seconds(pid) - cpu0;
            let per_conn = cpu * 1e6 / (cps * a.duration as f64).max(1.0);
            cols.push(format!("{cps:.0}"));
            cols.push(if errors > 0 {
                format!("{per_conn:.0} ({errors} err)")
            } else {
                format!("{per_conn:.0}")
            });
        }
        println!(
            "{name:<16} {:>10} {:>12} {:>10} {:>12}",
            cols[0], cols[1], cols[2], cols[3]
        );
    }
    Ok(())
}

/// Waits for `hvprof record -- hvprof load ...` (a load of `duration_s`);
/// returns its status, the recorder's own CPU seconds (user + system,
/// from /proc, 10 ms ticks) while its load command ran with that time in
/// seconds, and the machine's busy and stolen shares in the middle of the load
/// ([`busy_share_later`]).
fn recorder_cpu_during_load(
    child: &mut Child,
    duration_s: u64,
) -> Result<(std::process::ExitStatus, (f64, f64), Option<Share>)> {
    let pid = child.id();
    let cpu = || -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
    };
    let loading = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .is_ok_and(|c| !c.trim().is_empty())
            })
    };
    let mut first: Option<(Instant, f64)> = None;
    let mut last: Option<(Instant, f64)> = None;
    let mut busy = None;
    loop {
        if let Some(status) = child.try_wait()? {
            let used = match (first, last) {
                (Some((t0, c0)), Some((t1, c1))) => (c1 - c0, (t1 - t0).as_secs_f64()),
                _ => (0.0, 0.0),
            };
            let busy = busy.and_then(|b: BusyShare| b.join().ok().flatten());
            return Ok((status, used, busy));
        }
        if loading()
            && let Some(c) = cpu()
        {
            let now = (Instant::now(), c);
            if first.is_none() {
                busy = Some(busy_share_later(duration_s));
            }
            first.get_or_insert(now);
            last = Some(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One load of an overhead round: its rate, the machine's CPU µs per
/// connection and the share of the CPUs' time the hypervisor took (NaN
/// where unknown).
struct Arm {
    rate: f64,
    cpu_us: f64,
    steal_pct: f64,
}

impl Arm {
    fn new(rate: f64, share: Option<Share>) -> Self {
        Self {
            rate,
            cpu_us: busy_us_per_conn(share.map(|s| s.busy), rate),
            steal_pct: share.map_or(f64::NAN, |s| 100.0 * s.steal),
        }
    }
}

/// ", steal a% / b% / f%" when the hypervisor took any of a round's CPU
/// time: each load's share, in the order the round line names them.
fn stolen_note(loads: &[Option<&Arm>]) -> String {
    let shares: Vec<f64> = loads.iter().flatten().map(|l| l.steal_pct).collect();
    if shares.iter().any(|&s| s >= 0.5) {
        let each: Vec<String> = shares.iter().map(|s| format!("{s:.1}%")).collect();
        format!(", steal {}", each.join(" / "))
    } else {
        String::new()
    }
}

/// What the machine's CPUs did over the middle of a load, each a share of
/// all their time: busy, and taken by the hypervisor under it (steal).
#[derive(Debug, Clone, Copy)]
struct Share {
    busy: f64,
    steal: f64,
}

/// A share being measured (see [`busy_share_later`]).
type BusyShare = std::thread::JoinHandle<Option<Share>>;

/// The machine's busy and stolen shares over the middle of a load of
/// `duration_s` starting now, measured on a thread from /proc/stat, from
/// 0.5 s after the start to 0.5 s before the end (or over the whole second
/// of a shorter load). Busy is user, system and interrupt time (not idle,
/// not steal), over all CPU time: stolen time is no CPU the load used, so
/// a round the hypervisor slowed doesn't read as more CPU per connection.
fn busy_share_later(duration_s: u64) -> BusyShare {
    let (skip, span) = if duration_s >= 2 {
        (
            Duration::from_millis(500),
            Duration::from_millis(duration_s * 1000 - 1000),
        )
    } else {
        (Duration::ZERO, Duration::from_secs(duration_s.max(1)))
    };
    std::thread::spawn(move || {
        std::thread::sleep(skip);
        let a = cpu_ticks()?;
        std::thread::sleep(span);
        let b = cpu_ticks()?;
        let (busy, had, stolen) = (b.busy - a.busy, b.had - a.had, b.steal - a.steal);
        let all = (had + stolen) as f64;
        (had > 0).then(|| Share {
            busy: busy as f64 / all,
            steal: stolen as f64 / all,
        })
    })
}

/// The machine's CPU ticks since boot, /proc/stat's `cpu` line: user nice
/// system idle iowait irq softirq steal ...
struct Ticks {
    busy: u64,
    /// Busy, idle and iowait: the time the machine had.
    had: u64,
    steal: u64,
}

fn cpu_ticks() -> Option<Ticks> {
    parse_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_ticks(stat: &str) -> Option<Ticks> {
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| f.get(i).copied();
    let busy = at(0)? + at(1)? + at(2)? + at(5)? + at(6)?;
    Some(Ticks {
        busy,
        had: busy + at(3)? + at(4)?,
        steal: at(7).unwrap_or(0),
    })
}

/// Machine CPU µs per connection: a busy share of every CPU at `rate`
/// conn/s (NaN if unknown).
fn busy_us_per_conn(busy: Option<f64>, rate: f64) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    busy.map_or(f64::NAN, |b| b * cpus * 1e6 / rate.max(1.0))
}

/// User + system CPU seconds of `pid` and its direct children (nginx's
/// worker), from /proc (clock ticks at the usual 100 Hz).
fn tree_cpu_seconds(pid: u32) -> f64 {
    let ticks = |stat: &str| -> Option<(u32, f64)> {
        let after = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((ppid, t))
    };
    let mut total = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| ticks(&s))
                && (p == pid || ppid == pid)
            {
                total += t;
            }
        }
    }
    total / 100.0
}

pub(crate) struct DirGuard(pub(crate) PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_hvprof_origin(bin: &Path, _dir: &Path, port: u16) -> Result<Option<Child>> {
    Ok(Some(
        Command::new(bin)
            .args([
                "origin",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--threads",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

fn start_nginx(_bin: &Path, dir: &Path, port: u16) -> Result<Option<Child>> {
    if !have("nginx") {
        return Ok(None);
    }
    let d = dir.display();
    // `/?s=64k` maps to the file obj_64k, as the other origins serve it.
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  default_type application/octet-stream;\n  keepalive_timeout 30;\n\
           server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n    location = / {{ try_files /obj_$arg_s =404; }}\n  }}\n}}\n"
    );
    std::fs::create_dir_all(dir.join("tmp"))?;
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start nginx")?;
    std::thread::sleep(Duration::from_millis(200));
    if let Ok(Some(status)) = child.try_wait() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("nginx exited ({status}): {}", err.trim());
    }
    Ok(Some(child))
}

fn start_haproxy_origin(_bin: &Path, dir: &Path, port: u16) -> Result<Option<Child>> {
    let d = dir.display();
    // A 64K object needs buffers larger than the default 16K.
    let conf = format!(
        "global\n  nbthread 1\n  tune.bufsize 131072\n\
         defaults\n  mode http\n  option httpclose\n  timeout client 30s\n  timeout server 30s\n  timeout connect 5s\n\
         frontend origin\n  bind 127.0.0.1:{port}\n\
           http-request return status 200 content-type application/octet-stream file {d}/www/obj_64k if {{ urlp(s) -m str 64k }}\n\
           http-request return status 200 content-type application/octet-stream file {d}/www/obj_0\n"
    );
    let path = dir.join("haproxy-origin.cfg");
    std::fs::write(&path, conf)?;
    let haproxy = if Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    };
    Ok(Some(
        Command::new(haproxy)
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start haproxy")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_split_busy_had_and_steal() {
        let t =
            parse_ticks("cpu  10 1 5 100 2 3 4 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n").expect("ticks");
        assert_eq!((t.busy, t.had, t.steal), (23, 125, 7));
        // A kernel without the steal column: none stolen.
        let t = parse_ticks("cpu  10 1 5 100 2 3 4\n").expect("ticks");
        assert_eq!((t.busy, t.had, t.steal), (23, 125, 0));
        assert!(parse_ticks("intr 1 2 3\n").is_none());
    }

    #[test]
    fn calm_rounds_leave_out_those_the_hypervisor_slowed() {
        let plain = [100.0, 100.0, 100.0, 100.0, 100.0];
        let probed = [98.0, 50.0, 97.0, 99.0, 60.0];
        // Rounds 2 and 5 had steal (round 5's unmeasured counts as such).
        let steal = [0.2, 6.0, 0.0, 0.9, f64::NAN];
        let (n, p) = calm_rounds(&plain, &probed, &steal).expect("three calm rounds");
        assert_eq!(n, 3);
        assert!((p.median - 0.98).abs() < 1e-9, "{p:?}");
        assert_eq!((p.low, p.high), (0.97, 0.99));
        // Every round calm: the overall figure says it already.
        assert!(calm_rounds(&plain, &probed, &[0.0; 5]).is_none());
        // Fewer than three calm: no figure.
        assert!(calm_rounds(&plain, &probed, &[0.0, 0.0, 2.0, 2.0, 2.0]).is_none());
    }

    #[test]
    fn the_steal_note_names_every_load_of_the_round() {
        let arm = |steal_pct| Arm {
            rate: 1.0,
            cpu_us: 1.0,
            steal_pct,
        };
        let (a, b, f) = (arm(0.1), arm(0.2), arm(0.7));
        // Only the hooks-only load was slowed: the note still appears.
        assert_eq!(
            stolen_note(&[Some(&a), Some(&b), Some(&f)]),
            ", steal 0.1% / 0.2% / 0.7%"
        );
        assert_eq!(stolen_note(&[Some(&a), Some(&b), None]), "");
        assert_eq!(
            stolen_note(&[Some(&f), Some(&a), None]),
            ", steal 0.7% / 0.1%"
        );
    }

    #[test]
    fn reads_json_numbers() {
        let t = r#"{"conn_per_s": 1234.5, "errors": {"refused": 2}}"#;
        assert_eq!(json_number(t, "conn_per_s"), Some(1234.5));
        assert_eq!(json_number(t, "refused"), Some(2.0));
        assert_eq!(json_number(t, "missing"), None);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        // The paired ratios' median, as `bench overhead` prints it.
        let p = paired(&[1.0, 1.0, 1.0, 1.0], &[0.9, 1.0, 0.8, 1.1]);
        assert!((p.median - 0.95).abs() < 1e-9, "{p:?}");
        // Four rounds: the whole range, which holds the median 7/8 of the
        // time.
        assert_eq!((p.low, p.high), (0.8, 1.1));
        assert!((p.confidence - 0.875).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn the_median_interval_takes_the_order_statistics_of_the_binomial() {
        // Published values (e.g. Conover, Practical Nonparametric
        // Statistics, table A3): n = 6 is the first count whose whole
        // range reaches 95 %; n = 16 keeps the 4th lowest and highest.
        assert_eq!(median_rank(5).0, 0);
        let (k, c) = median_rank(6);
        assert_eq!(k, 0);
        assert!((c - 0.96875).abs() < 1e-9, "{c}");
        let (k, c) = median_rank(16);
        assert_eq!(k, 3);
        assert!((c - 0.97873).abs() < 1e-4, "{c}");
        let (k, c) = median_rank(48);
        assert_eq!(k, 16);
        assert!((0.95..0.98).contains(&c), "{c}");
    }
}
