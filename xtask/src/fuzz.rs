//! `cargo xtask fuzz [--time SECS] [TARGET...]`: runs the cargo-fuzz
//! targets of `fuzz/` (the event log, `meta.json`, the agent protocol) one
//! after another, each for a fixed time in a single process, and prints
//! per target the executions, executions per second, corpus size and
//! whether it crashed. Installs the nightly toolchain and cargo-fuzz when
//! missing. The corpus grows in `fuzz/corpus/TARGET` (not committed),
//! starting from the committed seeds in `fuzz/seeds/TARGET`; a crash
//! leaves its input and the run's log in `fuzz/artifacts/TARGET`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{root, run_cmd};

const TOOLCHAIN: &str = "nightly";

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 600)]
    pub time: u64,
    /// Targets to run (default: all of `cargo fuzz list`).
    pub targets: Vec<String>,
}

/// What one target's run gave.
struct Outcome {
    target: String,
    seconds: f64,
    execs: Option<u64>,
    execs_per_s: Option<u64>,
    /// Entries in the in-memory corpus at the end (libFuzzer's `corp:`).
    corpus: Option<u64>,
    /// Files in `fuzz/corpus/TARGET` afterwards.
    corpus_files: usize,
    crashed: bool,
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    if args.time == 0 {
        bail!("--time must be at least 1 second");
    }
    let root = root();
    ensure_tools()?;
    let known = list_targets(&root)?;
    let targets = if args.targets.is_empty() {
        known.clone()
    } else {
        for t in &args.targets {
            if !known.contains(t) {
                bail!("no fuzz target {t:?}; the targets are {}", known.join(", "));
            }
        }
        args.targets.clone()
    };
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_target(&root, t, args.time)?);
    }
    eprintln!();
    eprintln!(
        "{:<14} {:>8} {:>12} {:>9} {:>8} {:>8}  result",
        "target", "seconds", "execs", "exec/s", "corpus", "files"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    for o in &outcomes {
        eprintln!(
            "{:<14} {:>8.0} {:>12} {:>9} {:>8} {:>8}  {}",
            o.target,
            o.seconds,
            show(o.execs),
            show(o.execs_per_s),
            show(o.corpus),
            o.corpus_files,
            if o.crashed { "CRASHED" } else { "no crash" }
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz target(s) {} crashed; inputs and logs are in fuzz/artifacts/",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// The nightly toolchain (cargo-fuzz needs sanitizer flags) and cargo-fuzz.
fn ensure_tools() -> Result<()> {
    let quiet = |cmd: &mut Command| {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !quiet(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"])) {
        eprintln!("[fuzz] installing the {TOOLCHAIN} toolchain");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    if !quiet(Command::new("cargo").args([&format!("+{TOOLCHAIN}"), "fuzz", "--version"])) {
        eprintln!("[fuzz] installing cargo-fuzz");
        run_cmd(Command::new("cargo").args([
            &format!("+{TOOLCHAIN}"),
            "install",
            "cargo-fuzz",
            "--locked",
        ]))?;
    }
    Ok(())
}

fn list_targets(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .args([&format!("+{TOOLCHAIN}"), "fuzz", "list"])
        .current_dir(root)
        .output()
        .context("cannot run `cargo fuzz list`")?;
    if !out.status.success() {
        bail!(
            "`cargo fuzz list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` found no targets in fuzz/");
    }
    Ok(targets)
}

fn run_target(root: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log_path = artifacts.join("fuzz.log");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    eprintln!("[fuzz] {target}: building, then fuzzing for {seconds} s");
    let mut cmd = Command::new("cargo");
    cmd.args([&format!("+{TOOLCHAIN}"), "fuzz", "run", target])
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    // In this process: one job, no worker processes. libFuzzer's own
    // memory limit (2 GiB) turns an unbounded allocation into a crash;
    // cargo fuzz puts crash inputs in fuzz/artifacts/TARGET.
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .current_dir(root)
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("cannot start `cargo fuzz run`")?;
    // libFuzzer and cargo report on stderr.
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut execs = None;
    let mut execs_per_s = None;
    let mut corp = None;
    let mut crash_line = false;
    let mut fuzzed_s = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz output")?;
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        // Every new corpus entry or covered function, and the recommended
        // dictionary, is a line: keep those in the log only.
        if !(line.contains("\tNEW") || line.contains("\tREDUCE ") || line.contains("# Uses: ")) {
            eprintln!("{line}");
        }
        if let Some(v) = stat(&line, "stat::number_of_executed_units:") {
            execs = Some(v);
        }
        if let Some(v) = stat(&line, "stat::average_exec_per_sec:") {
            execs_per_s = Some(v);
        }
        if let Some(v) = line
            .split_once("corp: ")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|n| n.trim().parse().ok())
        {
            corp = Some(v);
        }
        // `Done N runs in S second(s)`: the fuzzing time, without the build.
        if let Some(v) = line
            .strip_prefix("Done ")
            .and_then(|l| l.split_once(" runs in "))
            .and_then(|(_, s)| s.split(' ').next())
            .and_then(|s| s.parse().ok())
        {
            fuzzed_s = Some(v);
        }
        if line.contains("==ERROR:")
            || line.contains("panicked at")
            || line.contains("deadly signal")
            || line.starts_with("SUMMARY: ")
        {
            crash_line = true;
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if execs.is_none() && !crash_line && !status.success() {
        bail!(
            "`cargo fuzz run {target}` failed before fuzzing ({status}); see {}",
            log_path.display()
        );
    }
    let corpus_files = std::fs::read_dir(&corpus)
        .with_context(|| format!("reading {}", corpus.display()))?
        .count();
    Ok(Outcome {
        target: target.to_string(),
        seconds: fuzzed_s.unwrap_or_else(|| t0.elapsed().as_secs_f64()),
        execs,
        execs_per_s,
        corpus: corp,
        corpus_files,
        crashed: crash_line || !status.success(),
    })
}

/// The number after `key` in a libFuzzer `-print_final_stats` line.
fn stat(line: &str, key: &str) -> Option<u64> {
    line.trim().strip_prefix(key)?.trim().parse().ok()
}
