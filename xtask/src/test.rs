//! `cargo xtask test`: format check, clippy, release build, then every
//! test (unit and end-to-end) against the release binary. Tests that need
//! something this host lacks record a skip (see `hvprof_tests::skip`);
//! the closing line counts them as skipped, never as passed.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{build_release, root, run_cmd};

pub fn run(extra: &[String]) -> Result<()> {
    let root = root();
    eprintln!("[test] cargo fmt --check");
    run_cmd(
        Command::new("cargo")
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root),
    )?;
    eprintln!("[test] cargo clippy");
    run_cmd(
        Command::new("cargo")
            .args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(&root),
    )?;
    eprintln!("[test] cargo build --release");
    build_release()?;
    eprintln!("[test] VM test bed");
    crate::testbed::run(&crate::testbed::TestbedArgs {
        dir: None,
        kernel: None,
        force: false,
    })?;

    let skip_file = root.join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skip_file);
    eprintln!("[test] cargo test --release");
    let mut child = Command::new("cargo")
        .args(["test", "--release", "--no-fail-fast"])
        .args(extra)
        .env("HVPROF_BIN", root.join("target/release/hvprof"))
        .env("HVPROF_SKIP_FILE", &skip_file)
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.trim().strip_prefix("test result: ") {
                passed += count(rest, "passed");
                failed += count(rest, "failed");
                ignored += count(rest, "ignored");
            }
        }
    }
    let status = child.wait()?;
    let skips: Vec<String> = std::fs::read_to_string(&skip_file)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if !skips.is_empty() {
        println!("\nskipped (this host lacks what they need):");
        for s in &skips {
            println!("  {s}");
        }
    }
    let skipped = skips.len() as u64;
    println!(
        "\nhvprof: {} passed, {failed} failed, {} skipped",
        passed.saturating_sub(skipped),
        skipped + ignored
    );
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// `N passed` → N, from a `test result:` line.
fn count(line: &str, what: &str) -> u64 {
    line.split(';')
        .filter_map(|part| {
            let part = part
                .trim()
                .trim_start_matches("ok.")
                .trim_start_matches("FAILED.")
                .trim();
            part.strip_suffix(what)?.trim().parse::<u64>().ok()
        })
        .sum()
}
