//! `cargo xtask`: developer and CI tasks — installing what a fresh machine
//! lacks (`setup`), running the whole test suite (`test`), the main job
//! (`run`), benchmarks (`bench`) and the fuzz targets (`fuzz`).

mod bench;
mod bench_faults;
mod bench_programs;
mod bench_report;
mod bench_soak;
mod fuzz;
mod setup;
mod test;
mod testbed;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "hvprof developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker, the `debian`
    /// rustup toolchain for the eBPF target). Idempotent.
    Setup,
    /// Setup, then fmt check, clippy, release build and every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks (not tests): numbers side by side.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Setup, build, test bed, then the main job: `hvprof profile` (native
    /// vs bridge-nf vs QEMU guests, recorded and explained) and its report.
    Run {
        /// Extra arguments for `hvprof profile` (e.g. `--sizes all`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build (or confirm, when cached) the QEMU test bed for the `vm-*`
    /// topologies: Debian kernel + modules, busybox, HAProxy, static hvprof.
    Testbed(testbed::TestbedArgs),
    /// Run the cargo-fuzz targets of `fuzz/` (default 600 s each).
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// `hvprof load` vs `wrk -H 'Connection: close'` through HAProxy at 0
    /// and 64K, and hvprof origin vs nginx vs HAProxy as origins.
    Load(bench::BenchLoadArgs),
    /// Probe overhead: the 0-byte close-mode benchmark on `native` with the
    /// full catalog attached vs nothing, alternating A/B.
    Overhead(bench::OverheadArgs),
    /// Two builds' eBPF programs side by side: ns per run and per
    /// connection in short recordings taking turns under one load.
    Programs(bench_programs::ProgramsArgs),
    /// Teardown under faults: `hvprof bench`/`record` interrupted with
    /// SIGINT, SIGTERM or SIGKILL at random points, nothing may be left
    /// (the faults test with more trials).
    Faults(bench_faults::FaultsArgs),
    /// Report generation time on a recorded run of a million events.
    Report(bench_report::ReportArgs),
    /// Soak: full-load recording on `native` with the full catalog for 10
    /// minutes; recorder RSS over time, lost events, run directory size
    /// per million connections.
    Soak(bench_soak::SoakArgs),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => setup::run().and_then(|()| test::run(&args)),
        Cmd::Bench(BenchCmd::Load(a)) => bench::bench_load(&a),
        Cmd::Bench(BenchCmd::Overhead(a)) => bench::bench_overhead(&a),
        Cmd::Bench(BenchCmd::Programs(a)) => bench_programs::bench_programs(&a),
        Cmd::Bench(BenchCmd::Faults(a)) => bench_faults::run(&a),
        Cmd::Bench(BenchCmd::Report(a)) => bench_report::bench_report(&a),
        Cmd::Bench(BenchCmd::Soak(a)) => bench_soak::bench_soak(&a),
        Cmd::Run { args } => setup::run().and_then(|()| run_main_job(&args)),
        Cmd::Testbed(args) => testbed::run(&args),
        Cmd::Fuzz(args) => fuzz::run(&args),
    };
    if let Err(e) = res {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Runs a command, inheriting stdio; fails on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the release binary.
pub fn build_release() -> Result<()> {
    run_cmd(
        Command::new("cargo")
            .args(["build", "--release", "--bins"])
            .current_dir(root()),
    )
}

fn run_main_job(args: &[String]) -> Result<()> {
    build_release()?;
    testbed::run(&testbed::TestbedArgs {
        dir: None,
        kernel: None,
        force: false,
    })?;
    run_cmd(
        Command::new(root().join("target/release/hvprof"))
            .arg("profile")
            .args(args)
            .current_dir(root()),
    )
}
