//! `meta.json`: the versioned description of a run — kernel, topology,
//! command, probes and how each was attached, lost events, clock offsets.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "hvprof-run";
pub const VERSION: u32 = 1;
/// meta.json larger than this is refused (it is a few KiB in practice).
const MAX_META_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Still recording, or the recorder died (the log holds what was done).
    Recording,
    Complete,
}

/// One probe's status: also the row of `hvprof probes list --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub name: String,
    pub layer: String,
    pub path: String,
    /// `func [module]` or `category:name`.
    pub point: String,
    pub wanted: String,
    /// Method obtained on this kernel; `None` when unavailable.
    pub obtained: Option<String>,
    /// Why better methods (or all methods) failed; empty when `wanted` was
    /// obtained.
    pub reason: String,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    pub hvprof_version: String,
    pub kernel: String,
    pub topology: String,
    /// The command recorded (`-- CMD`), empty for `--duration`.
    pub command: Vec<String>,
    pub status: Status,
    /// Wall clock at start, ns since the Unix epoch.
    pub started_unix_ns: u64,
    /// CLOCK_MONOTONIC at the same instant: event timestamps are on it.
    pub monotonic_start_ns: u64,
    pub ended_unix_ns: Option<u64>,
    pub duration_s: Option<f64>,
    pub ringbuf_bytes: u64,
    /// CPU sampling frequency per CPU, when the sampler ran.
    #[serde(default)]
    pub sample_hz: Option<u64>,
    /// Online CPUs (each sampled at `sample_hz`).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Whether sockets' lives hold every TCP state change
    /// (`--all-tcp-states`); `false`: those into FIN_WAIT2, LAST_ACK and
    /// CLOSING were skipped. Absent from runs made before the option (they
    /// hold every change).
    #[serde(default)]
    pub all_tcp_states: Option<bool>,
    /// The programs returned at once (`$HVPROF_HOOKS_ONLY`): the probes
    /// were attached but recorded nothing. Written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hooks_only: bool,
    /// Every probe considered, attached or not.
    pub probes: Vec<ProbeStatus>,
    /// Addresses of the functions probed on entry, to name their events.
    #[serde(default)]
    pub functions: Vec<crate::attach::FunctionAddr>,
    /// Events dropped in the kernel, per probe name.
    pub lost: BTreeMap<String, u64>,
    /// Offsets of other clocks (guests) against this one; empty for a
    /// host-only run.
    pub clock_offsets: Vec<serde_json::Value>,
}

impl Meta {
    pub fn read(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("{} is missing; is this a run directory?", path.display()))?
            .len();
        if len > MAX_META_BYTES {
            bail!(
                "{} is {len} bytes, larger than any meta.json hvprof writes",
                path.display()
            );
        }
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks the bytes of a `meta.json`; `origin` (a path)
    /// names it in errors. [`Meta::read`] adds the size limit.
    pub fn parse(text: &[u8], origin: &str) -> Result<Self> {
        let meta: Meta = serde_json::from_slice(text)
            .with_context(|| format!("{origin} is not a valid hvprof meta.json"))?;
        if meta.format != FORMAT {
            bail!("{origin}: format {:?} is not {FORMAT:?}", meta.format);
        }
        if meta.version != VERSION {
            bail!(
                "{origin}: run format version {} is not supported (this hvprof reads {VERSION})",
                meta.version
            );
        }
        Ok(meta)
    }
}
