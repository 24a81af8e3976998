//! Scheduling and interrupts: run-queue delay and on-CPU time of every
//! thread (vCPU, backend and proxy threads included), aggregated in the
//! kernel; softirq and NAPI rows for later per-event probes.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use hvprof_common::{CpuIdle, SchedTpOffsets, TaskOffsets, ThreadStats, probe};
use serde::{Deserialize, Serialize};

use super::{Path, raw, tp, traced};
use crate::{
    catalog::Layer::{Irq, Sched},
    kernel::{btf, tracefs},
};

const FIELDS: &[&str] = &["tid", "tgid", "comm", "oncpu_ns", "runq_ns"];

pub const PATH: Path = Path {
    name: "sched",
    frames: &[
        ("__do_softirq", Irq),
        ("do_softirq", Irq),
        ("handle_softirqs", Irq),
        ("net_rx_action", Irq),
        ("net_tx_action", Irq),
        ("napi_", Irq),
        ("__napi_poll", Irq),
        ("irq_", Irq),
        ("__irq", Irq),
        ("handle_irq", Irq),
        ("common_interrupt", Irq),
        ("asm_common_interrupt", Irq),
        ("asm_sysvec", Irq),
        ("sysvec_", Irq),
        ("ksoftirqd", Irq),
    ],
    rows: &[
        raw(
            traced(
                tp(
                    "sched:sched_switch",
                    Sched,
                    "sched",
                    "sched",
                    "sched_switch",
                    FIELDS,
                ),
                "hvp_sched_switch",
                probe::SCHED_SWITCH,
            ),
            SWITCH_RAW_PROGRAM,
        ),
        raw(
            traced(
                tp(
                    "sched:sched_wakeup",
                    Sched,
                    "sched",
                    "sched",
                    "sched_wakeup",
                    FIELDS,
                ),
                "hvp_sched_wakeup",
                probe::SCHED_WAKEUP,
            ),
            WAKEUP_RAW_PROGRAM,
        ),
        tp(
            "irq:softirq_entry",
            Irq,
            "irq",
            "irq",
            "softirq_entry",
            &["vec"],
        ),
        tp(
            "irq:softirq_exit",
            Irq,
            "irq",
            "irq",
            "softirq_exit",
            &["vec"],
        ),
        tp(
            "napi:napi_poll",
            Irq,
            "irq",
            "napi",
            "napi_poll",
            &["dev", "work", "budget"],
        ),
    ],
};

/// The raw-tracepoint programs (their rows' preferred method).
pub const SWITCH_RAW_PROGRAM: &str = "hvp_sched_switch_raw";
pub const WAKEUP_RAW_PROGRAM: &str = "hvp_sched_wakeup_raw";

/// Tracepoints the wakeup program also attaches to.
pub const WAKEUP_ALSO: &[(&str, &str)] = &[("sched", "sched_wakeup_new")];

pub const TP_GLOBAL: &str = "HVP_SCHED_TP";
pub const TASK_GLOBAL: &str = "HVP_TASK_OFFSETS";
const THREADS_MAP: &str = "HVP_THREADS";
const IDLE_MAP: &str = "HVP_IDLE";

pub fn tp_offsets() -> Result<SchedTpOffsets> {
    let sw = tracefs::format("sched", "sched_switch")?;
    let wk = tracefs::format("sched", "sched_wakeup")?;
    (|| -> Result<SchedTpOffsets> {
        Ok(SchedTpOffsets {
            prev_comm: tracefs::offset_of(&sw, "prev_comm", 16)?,
            prev_pid: tracefs::offset_of(&sw, "prev_pid", 4)?,
            prev_state: tracefs::offset_of(&sw, "prev_state", 8)?,
            next_comm: tracefs::offset_of(&sw, "next_comm", 16)?,
            next_pid: tracefs::offset_of(&sw, "next_pid", 4)?,
            wakeup_pid: tracefs::offset_of(&wk, "pid", 4)?,
        })
    })()
    .context("sched tracepoints have an unexpected format on this kernel")
}

/// `struct task_struct` offsets for the raw-tracepoint programs, from
/// `btf`; with `valid == 0` (and the reason) when this kernel's BTF lacks
/// one.
pub fn task_offsets(btf: Option<&btf_rs::Btf>) -> (TaskOffsets, Option<String>) {
    btf::offsets_or_why(btf, |btf| {
        let task = |m: &str| btf::member_offset(btf, "task_struct", m);
        Ok(TaskOffsets {
            pid: task("pid")?,
            comm: task("comm")?,
            // Renamed in 5.14.
            state: task("__state").or_else(|_| task("state"))?,
            valid: 1,
        })
    })
}

/// One thread's scheduler accounting over the recording.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadTimes {
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    pub oncpu_ns: u64,
    pub runq_ns: u64,
    pub switches: u64,
    pub wakeups: u64,
}

/// `threads.json`: per-thread times and per-CPU idle time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SchedSnapshot {
    pub threads: Vec<ThreadTimes>,
    /// Idle ns per CPU.
    pub cpu_idle_ns: BTreeMap<u32, u64>,
}

/// Reads the kernel-side aggregates.
pub fn snapshot(ebpf: &Ebpf) -> Result<SchedSnapshot> {
    let map = ebpf
        .map(THREADS_MAP)
        .ok_or_else(|| anyhow!("map {THREADS_MAP} missing"))?;
    let threads: HashMap<&MapData, u32, ThreadStats> = HashMap::try_from(map)?;
    let now = crate::kernel::monotonic_ns();
    let mut out = SchedSnapshot::default();
    for entry in threads.iter() {
        let Ok((tid, mut st)) = entry else { continue };
        // Still on CPU: count up to now.
        if st.last_on_ns != 0 && st.last_on_ns < now {
            st.oncpu_ns += now - st.last_on_ns;
        }
        if st.oncpu_ns == 0 && st.runq_ns == 0 {
            continue;
        }
        out.threads.push(ThreadTimes {
            tid,
            pid: st.tgid,
            comm: crate::event::comm(&st.comm),
            oncpu_ns: st.oncpu_ns,
            runq_ns: st.runq_ns,
            switches: st.switches,
            wakeups: st.wakeups,
        });
    }
    out.threads.sort_by_key(|t| std::cmp::Reverse(t.oncpu_ns));
    let map = ebpf
        .map(IDLE_MAP)
        .ok_or_else(|| anyhow!("map {IDLE_MAP} missing"))?;
    let idle: PerCpuArray<&MapData, CpuIdle> = PerCpuArray::try_from(map)?;
    let per_cpu = idle.get(&0, 0)?;
    for (cpu, v) in per_cpu.iter().enumerate() {
        let open = if v.idle_since_ns != 0 && v.idle_since_ns < now {
            now - v.idle_since_ns
        } else {
            0
        };
        out.cpu_idle_ns.insert(cpu as u32, v.idle_ns + open);
    }
    Ok(out)
}
