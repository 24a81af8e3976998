//! Per-CPU batches (`ebpf/hvprof-ebpf/src/batch.rs`): starting the two
//! programs that send what waits on a quiet CPU, taking a batch record
//! apart into the records the event log keeps, and reading what still
//! waits in the kernel's maps when the recording stops.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{PerfEvent, RawTracePoint},
};
use hvprof_common::{Batch, DevPacketsEvent, SockLivesEvent, kind};

use crate::{
    catalog::ProbeSpec,
    paths::{cpu, dev, tcp},
};

/// The programs that send a CPU's waiting batches: a timer on the CPU
/// clock (on a busy CPU) and one at `power:cpu_idle` (a CPU going idle,
/// where that timer doesn't fire).
pub const FLUSH_PROGRAMS: [&str; 2] = ["hvp_batch_flush", "hvp_batch_idle"];

/// Whether `spec`'s events cross in batches (socket lives and packets):
/// the flush programs serve the first such probe attached.
pub fn batched(spec: &ProbeSpec) -> bool {
    spec.name == tcp::PROBE || spec.path == dev::PATH.name
}

/// How often the timer looks at the batches of a busy CPU: an event waits
/// at most this long there (plus the reader's own period).
const FLUSH_HZ: u64 = 10;
/// Whether events wait in batches (set once the programs that send them
/// run).
const BATCHING_MAP: &str = "HVP_BATCHING";

/// Attaches the programs that send waiting batches and turns batching on.
/// Until then (or if this fails) every event is sent alone.
pub fn start(ebpf: &mut Ebpf) -> Result<()> {
    let [timer, idle] = FLUSH_PROGRAMS;
    let prog: &mut PerfEvent = ebpf
        .program_mut(timer)
        .with_context(|| format!("program {timer} missing"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {timer}"))?;
    cpu::attach_clock(prog, 1_000_000_000 / FLUSH_HZ, timer)?;
    let prog: &mut RawTracePoint = ebpf
        .program_mut(idle)
        .with_context(|| format!("program {idle} missing"))?
        .try_into()?;
    prog.load().with_context(|| format!("loading {idle}"))?;
    prog.attach("cpu_idle")
        .with_context(|| format!("attaching {idle} to raw tracepoint cpu_idle"))?;
    let mut on: Array<_, u32> = Array::try_from(
        ebpf.map_mut(BATCHING_MAP)
            .with_context(|| format!("map {BATCHING_MAP} missing"))?,
    )?;
    on.set(0, 1, 0).context("turning batching on")
}

/// The records a batch record from the ring carries, each as the event
/// log keeps it; `None` for a record that is not a batch.
pub fn items(record: &[u8], kind: u16) -> Option<Box<dyn Iterator<Item = &[u8]> + '_>> {
    match kind {
        kind::SOCK_LIVES => Some(Box::new(SockLivesEvent::items_in(record))),
        kind::DEV_PACKETS => Some(Box::new(DevPacketsEvent::items_in(record))),
        _ => None,
    }
}

/// What still waits in every CPU's batch in map `name`, as event-log
/// records (`bytes` gives an event's).
pub fn unsent<T: aya::Pod, const N: usize>(
    ebpf: &Ebpf,
    name: &str,
    bytes: impl Fn(&T) -> &[u8],
) -> Result<Vec<Vec<u8>>> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing"))?;
    let batch: PerCpuArray<_, Batch<T, N>> = PerCpuArray::try_from(map)?;
    let per_cpu = batch
        .get(&0, 0)
        .with_context(|| format!("reading what waits in {name}"))?;
    Ok(per_cpu
        .iter()
        .flat_map(|b| {
            let n = (b.count as usize).min(N);
            b.items[..n].iter().map(|e| bytes(e).to_vec())
        })
        .collect())
}
