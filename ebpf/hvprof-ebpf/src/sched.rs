//! Scheduling: per-thread on-CPU time and run-queue delay, and per-CPU
//! idle time, aggregated in the kernel (no event per context switch
//! crosses to user space).

use aya_ebpf::{
    EbpfContext, Global,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use hvprof_common::{COMM_LEN, CpuIdle, SchedTpOffsets, ThreadStats};

#[unsafe(no_mangle)]
static HVP_SCHED_TP: Global<SchedTpOffsets> = Global::new(SchedTpOffsets {
    prev_comm: 0,
    prev_pid: 0,
    prev_state: 0,
    next_comm: 0,
    next_pid: 0,
    wakeup_pid: 0,
});

/// Per-thread accounting, by tid.
#[map(name = "HVP_THREADS")]
static THREADS: HashMap<u32, ThreadStats> = HashMap::with_max_entries(32768, 0);

/// Per-CPU idle time (slot 0).
#[map(name = "HVP_IDLE")]
static IDLE: PerCpuArray<CpuIdle> = PerCpuArray::with_max_entries(1, 0);

/// Sleeping states occupy the low byte of `prev_state`; none set means the
/// task was preempted while runnable.
const SLEEP_STATES: i64 = 0xff;

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn hvp_sched_switch(ctx: TracePointContext) -> u32 {
    let off = HVP_SCHED_TP.load();
    // SAFETY: offsets from this kernel's tracepoint format.
    let (prev, next, state) = unsafe {
        (
            ctx.read_at::<i32>(off.prev_pid as usize).unwrap_or(0) as u32,
            ctx.read_at::<i32>(off.next_pid as usize).unwrap_or(0) as u32,
            ctx.read_at::<i64>(off.prev_state as usize).unwrap_or(1),
        )
    };
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
        let tgid = (ctx.tgid()) as u32;
        let comm = unsafe { ctx.read_at::<[u8; COMM_LEN]>(off.prev_comm as usize) }
            .unwrap_or([0; COMM_LEN]);
        let st = stats(prev, comm);
        if let Some(st) = st {
            // SAFETY: map value pointer; racy adds are tolerated.
            unsafe {
                (*st).tgid = tgid;
                if (*st).last_on_ns != 0 {
                    (*st).oncpu_ns += now - (*st).last_on_ns;
                    (*st).last_on_ns = 0;
                }
                if state & SLEEP_STATES == 0 {
                    (*st).last_enq_ns = now;
                }
                (*st).switches += 1;
            }
        }
    }
    if next != 0 {
        let comm = unsafe { ctx.read_at::<[u8; COMM_LEN]>(off.next_comm as usize) }
            .unwrap_or([0; COMM_LEN]);
        if let Some(st) = stats(next, comm) {
            // SAFETY: as above.
            unsafe {
                (*st).last_on_ns = now;
                if (*st).last_enq_ns != 0 {
                    (*st).runq_ns += now - (*st).last_enq_ns;
                    (*st).last_enq_ns = 0;
                }
                (*st).comm = comm;
            }
        }
    }
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn hvp_sched_wakeup(ctx: TracePointContext) -> u32 {
    let off = HVP_SCHED_TP.load();
    // SAFETY: offset from this kernel's tracepoint format.
    let pid = unsafe { ctx.read_at::<i32>(off.wakeup_pid as usize) }.unwrap_or(0) as u32;
    if pid == 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(st) = stats(pid, [0; COMM_LEN]) {
        // SAFETY: map value pointer.
        unsafe {
            if (*st).last_enq_ns == 0 {
                (*st).last_enq_ns = now;
            }
            (*st).wakeups += 1;
        }
    }
    0
}

/// The stats slot of `tid`, created on first sight.
#[inline(always)]
fn stats(tid: u32, comm: [u8; COMM_LEN]) -> Option<*mut ThreadStats> {
    if let Some(p) = THREADS.get_ptr_mut(tid) {
        return Some(p);
    }
    let fresh = ThreadStats {
        comm,
        ..ThreadStats::default()
    };
    THREADS.insert(tid, fresh, 0).ok()?;
    THREADS.get_ptr_mut(tid)
}
