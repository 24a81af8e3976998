//! Scheduling: per-thread on-CPU time and run-queue delay, and per-CPU
//! idle time, aggregated in the kernel (no event per context switch
//! crosses to user space). Two entry points each: the raw tracepoints
//! (tasks read at `struct task_struct` offsets from BTF, no record built)
//! and, where those can't be used, the classic ones.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use hvprof_common::{COMM_LEN, CpuIdle, SchedTpOffsets, TaskOffsets, ThreadStats};

use crate::maps::{current_comm_into, kernel_comm_into};

#[unsafe(no_mangle)]
static HVP_SCHED_TP: Global<SchedTpOffsets> = Global::new(SchedTpOffsets {
    prev_comm: 0,
    prev_pid: 0,
    prev_state: 0,
    next_comm: 0,
    next_pid: 0,
    wakeup_pid: 0,
});

#[unsafe(no_mangle)]
static HVP_TASK_OFFSETS: Global<TaskOffsets> = Global::new(TaskOffsets {
    pid: 0,
    comm: 0,
    state: 0,
    valid: 0,
});

/// Per-thread accounting, by tid.
#[map(name = "HVP_THREADS")]
static THREADS: HashMap<u32, ThreadStats> = HashMap::with_max_entries(32768, 0);

/// One all-zero entry, never written: the value a new thread's entry is
/// made from (one on the stack would be zeroed a byte at a time).
#[map(name = "HVP_THREAD_ZERO")]
static ZERO: Array<ThreadStats> = Array::with_max_entries(1, 0);

/// Per-CPU idle time (slot 0).
#[map(name = "HVP_IDLE")]
static IDLE: PerCpuArray<CpuIdle> = PerCpuArray::with_max_entries(1, 0);

/// Sleeping states occupy the low byte of `prev_state`; none set means the
/// task was preempted while runnable.
const SLEEP_STATES: i64 = 0xff;

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn hvp_sched_switch(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let off = HVP_SCHED_TP.load();
    // SAFETY: offsets from this kernel's tracepoint format.
    let (prev, next, state) = unsafe {
        (
            ctx.read_at::<i32>(off.prev_pid as usize).unwrap_or(0) as u32,
            ctx.read_at::<i32>(off.next_pid as usize).unwrap_or(0) as u32,
            ctx.read_at::<i64>(off.prev_state as usize).unwrap_or(1),
        )
    };
    let record = ctx.as_ptr() as u64;
    // The record's state of a preempted task has no sleeping bit.
    on_switch(
        prev,
        |comm| {
            kernel_comm_into(comm, record + u64::from(off.prev_comm));
            ctx.tgid()
        },
        next,
        |comm| kernel_comm_into(comm, record + u64::from(off.next_comm)),
        state & SLEEP_STATES == 0,
    );
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn hvp_sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct
    // *next, ...): `prev` is the current task.
    let off = HVP_TASK_OFFSETS.load();
    let preempt: u64 = ctx.arg(0);
    let prev_task: u64 = ctx.arg(1);
    let next_task: u64 = ctx.arg(2);
    let pid_tgid = bpf_get_current_pid_tgid();
    let next = read_task::<i32>(next_task, off.pid) as u32;
    // A task that stays runnable (preempted, or left running) waits in the
    // run queue from now.
    let runnable = preempt & 1 != 0 || read_task::<u32>(prev_task, off.state) & 0xff == 0;
    on_switch(
        pid_tgid as u32,
        |comm| {
            current_comm_into(comm);
            (pid_tgid >> 32) as u32
        },
        next,
        |comm| kernel_comm_into(comm, next_task + u64::from(off.comm)),
        runnable,
    );
    0
}

/// One context switch on this CPU from thread `prev` to `next` (0: the
/// idle task); `prev_info` writes prev's comm where it is told and gives
/// its tgid, `next_comm` writes next's comm (only while its entry has
/// none); `runnable`: prev stays runnable.
#[inline(always)]
fn on_switch(
    prev: u32,
    prev_info: impl FnOnce(&mut [u8; COMM_LEN]) -> u32,
    next: u32,
    next_comm: impl FnOnce(&mut [u8; COMM_LEN]),
    runnable: bool,
) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if prev == 0 || next == 0 {
        if let Some(idle) = IDLE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot.
            unsafe {
                if next == 0 {
                    (*idle).idle_since_ns = now;
                } else if (*idle).idle_since_ns != 0 {
                    (*idle).idle_ns += now - (*idle).idle_since_ns;
                    (*idle).idle_since_ns = 0;
                }
            }
        }
    }
    if prev != 0 {
        if let Some(st) = stats(prev) {
            // SAFETY: map value pointer; racy adds are tolerated.
            unsafe {
                // The comm is kept current (a thread may exec or rename
                // itself) from the thread leaving the CPU, where it is at
                // hand.
                (*st).tgid = prev_info(&mut (*st).comm);
                if (*st).last_on_ns != 0 {
                    (*st).oncpu_ns += now - (*st).last_on_ns;
                    (*st).last_on_ns = 0;
                }
                if runnable {
                    (*st).last_enq_ns = now;
                }
                (*st).switches += 1;
            }
        }
    }
    if next != 0
        && let Some(st) = stats(next)
    {
        // SAFETY: as above.
        unsafe {
            if (*st).comm[0] == 0 {
                // First seen here, or woken before.
                next_comm(&mut (*st).comm);
            }
            (*st).last_on_ns = now;
            if (*st).last_enq_ns != 0 {
                (*st).runq_ns += now - (*st).last_enq_ns;
                (*st).last_enq_ns = 0;
            }
        }
    }
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn hvp_sched_wakeup(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let off = HVP_SCHED_TP.load();
    // SAFETY: offset from this kernel's tracepoint format.
    let pid = unsafe { ctx.read_at::<i32>(off.wakeup_pid as usize) }.unwrap_or(0) as u32;
    on_wakeup(pid);
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn hvp_sched_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(struct task_struct *p)
    let task: u64 = ctx.arg(0);
    on_wakeup(read_task::<i32>(task, HVP_TASK_OFFSETS.load().pid) as u32);
    0
}

/// Thread `pid` woken: it waits in the run queue from now.
#[inline(always)]
fn on_wakeup(pid: u32) {
    if pid == 0 {
        return;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(st) = stats(pid) {
        // SAFETY: map value pointer.
        unsafe {
            if (*st).last_enq_ns == 0 {
                (*st).last_enq_ns = now;
            }
            (*st).wakeups += 1;
        }
    }
}

/// A `T` at `off` in the task at `task` (zero if unreadable).
#[inline(always)]
fn read_task<T: Default>(task: u64, off: u32) -> T {
    // SAFETY: a kernel pointer from the tracepoint, offsets from this
    // kernel's BTF; probe_read tolerates faults.
    unsafe { bpf_probe_read_kernel((task as *const u8).add(off as usize).cast::<T>()) }
        .unwrap_or_default()
}

/// The stats slot of `tid`, created on first sight (with no comm yet).
#[inline(always)]
fn stats(tid: u32) -> Option<*mut ThreadStats> {
    if let Some(p) = THREADS.get_ptr_mut(tid) {
        return Some(p);
    }
    THREADS.insert(tid, ZERO.get(0)?, 0).ok()?;
    THREADS.get_ptr_mut(tid)
}
