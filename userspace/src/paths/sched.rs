//! Scheduling and interrupts: run-queue delay and on-CPU time of the vCPU,
//! backend and proxy threads; softirq and NAPI time.

use super::{Path, tp};
use crate::catalog::Layer::{Irq, Sched};

pub const PATH: Path = Path {
    name: "sched",
    rows: &[
        tp("sched:sched_switch", Sched, "sched", "sched", "sched_switch", &["prev_pid", "prev_state", "next_pid"]),
        tp("sched:sched_wakeup", Sched, "sched", "sched", "sched_wakeup", &["pid", "target_cpu"]),
        tp("irq:softirq_entry", Irq, "irq", "irq", "softirq_entry", &["vec"]),
        tp("irq:softirq_exit", Irq, "irq", "irq", "softirq_exit", &["vec"]),
        tp("napi:napi_poll", Irq, "irq", "napi", "napi_poll", &["dev", "work", "budget"]),
    ],
};
