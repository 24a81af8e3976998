//! CPU sampling: the catalog row of the perf-event sampler, attaching a
//! program to every CPU's clock, and the decoder of its samples.
//! Symbolisation and folding live in `crate::stacks`.

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{
    PerfEvent,
    perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
};
use hvprof_common::{SampleEvent, probe};
use serde::Serialize;

use super::Path;
use crate::catalog::{Hook, Layer, ProbeSpec, Programs};

pub const PATH: Path = Path {
    name: "cpu",
    frames: &[],
    rows: &[ProbeSpec {
        name: "cpu:samples",
        layer: Layer::Other,
        path: "cpu",
        hook: Hook::PerfEvent,
        fields: &["kernel_stack", "user_stack"],
        programs: Programs {
            fentry: None,
            kprobe: None,
            raw_tracepoint: None,
            tracepoint: None,
            perf_event: Some("hvp_cpu_sample"),
        },
        id: Some(probe::CPU_SAMPLE),
    }],
};

/// Default sampling frequency per CPU.
pub const DEFAULT_HZ: u64 = 99;

/// Attaches the loaded `prog` to every online CPU's CPU clock, every
/// `period_ns` (a fixed period, not a frequency the kernel adapts: every
/// run then stands for the same CPU time). `name` names it in errors.
pub fn attach_clock(prog: &mut PerfEvent, period_ns: u64, name: &str) -> Result<()> {
    let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow!("reading {what}: {e}"))?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(period_ns),
            false,
        )
        .with_context(|| format!("{name} on CPU {cpu}'s clock every {period_ns} ns"))?;
    }
    Ok(())
}

/// A decoded sample: raw addresses, innermost first (symbolised stacks are
/// in the run's `stacks.folded`).
#[derive(Debug, Clone, Serialize)]
pub struct CpuSample {
    pub kernel_stack: Vec<String>,
    pub user_stack: Vec<String>,
}

pub fn decode(ev: &SampleEvent) -> CpuSample {
    let hex = |a: &u64| format!("{a:#x}");
    CpuSample {
        kernel_stack: ev.kernel_frames().iter().map(hex).collect(),
        user_stack: ev.user_frames().iter().map(hex).collect(),
    }
}
