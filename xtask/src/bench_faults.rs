//! `cargo xtask bench faults`: the teardown-under-faults test
//! (`tests/tests/faults.rs`) with more trials than CI runs. `hvprof bench`
//! and `hvprof record` are interrupted with SIGINT, SIGTERM or SIGKILL at
//! random points, and after each trial nothing of the run may be left
//! (namespaces, links, iptables rules, QEMU, HAProxy, BPF programs, state
//! files). The test prints one line per trial and a closing count; this
//! fails when any trial left something. Without `--seed` each run draws a
//! new plan (its seed is printed, to replay it).

use std::process::Command;

use anyhow::Result;

use crate::{build_release, root, run_cmd};

/// Options of `cargo xtask bench faults`.
#[derive(clap::Args, Debug, Clone)]
pub struct FaultsArgs {
    /// Trials (a fifth of them in a QEMU guest when the test bed is built).
    #[arg(short, long, default_value_t = 60)]
    pub trials: usize,
    /// Seed of the plan [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Don't build; use target/release/hvprof as it is.
    #[arg(long)]
    pub no_build: bool,
}

pub fn run(a: &FaultsArgs) -> Result<()> {
    if !a.no_build {
        build_release()?;
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    eprintln!("[bench faults] {} trials, seed {seed}", a.trials);
    let root = root();
    run_cmd(
        Command::new("cargo")
            .args([
                "test",
                "--release",
                "-p",
                "hvprof-tests",
                "--test",
                "faults",
                "--",
                "--exact",
                "teardown_under_faults",
                "--nocapture",
            ])
            .env("HVPROF_FAULT_TRIALS", a.trials.to_string())
            .env("HVPROF_FAULT_SEED", seed.to_string())
            .env("HVPROF_BIN", root.join("target/release/hvprof"))
            .current_dir(&root),
    )
}
