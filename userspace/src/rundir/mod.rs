//! The run directory: what `record` writes and every later step reads.
//! Layout (documented in docs/run-format.md):
//!
//! - `meta.json`   — versioned description of the run ([`meta::Meta`])
//! - `events.log`  — append-only framed event records ([`log`])
//! - `summary.json` — counts, lost events and per-program BPF stats
//! - `stacks.folded` — symbolised CPU samples (inferno's folded format)
//! - `threads.json` — per-thread on-CPU and run-queue time, per-CPU idle
//! - `bench-point.json`, `environment.json` — with `bench --record`
//! - `guest-N/` — a guest agent's recording, same layout

pub mod log;
pub mod meta;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

pub const META: &str = "meta.json";
pub const EVENTS: &str = "events.log";
pub const SUMMARY: &str = "summary.json";
pub const STACKS: &str = "stacks.folded";
pub const THREADS: &str = "threads.json";
/// VM exits per vCPU thread and by reason, when KVM ran guests.
pub const KVM: &str = "kvm.json";
/// With `bench --record`: the benchmark point measured during the capture.
pub const BENCH_POINT: &str = "bench-point.json";
/// With `bench --record`: where the topology ran (accelerator, NIC, ...).
pub const ENVIRONMENT: &str = "environment.json";

/// Creates (or reuses, if empty of runs) `dir` and checks it is writable,
/// before anything is attached.
pub fn create(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create output directory {}; pick a writable -o",
            dir.display()
        )
    })?;
    if dir.join(EVENTS).exists() {
        bail!(
            "{} already holds a recording; pick another -o or remove it",
            dir.display()
        );
    }
    let probe = dir.join(".hvprof-write-test");
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "output directory {} is not writable; pick a writable -o",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(dir.to_path_buf())
}

/// `dir`'s `summary.json` as loose JSON, for the fields a reader wants
/// (`None` if it is missing or unreadable: a cut run directory, a run
/// recorded before a field existed).
pub fn summary(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join(SUMMARY)).ok()?).ok()
}

/// Writes `value` as pretty JSON to `path` atomically (temp file + rename),
/// so a crash leaves either the old or the new file.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value)?;
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Checks `dir` looks like a run directory.
pub fn open(dir: &Path) -> Result<meta::Meta> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory; give a run directory written by `hvprof record -o`",
            dir.display()
        );
    }
    meta::Meta::read(&dir.join(META))
}
