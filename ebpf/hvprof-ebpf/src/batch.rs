//! Per-CPU batches: events a CPU gathers in a map value of its own (socket
//! lives, device packets) and sends in one ring-buffer record when the
//! batch is full or its first event has waited long enough, and the two
//! programs that send what waits on a CPU where no more events come: a
//! timer on every CPU and the CPU going idle. What is left when the
//! recording stops, user space reads from the maps. Without those two
//! programs running (user space sets `HVP_BATCHING` once they are), each
//! event is sent alone: a batch nobody sends could wait forever on a quiet
//! CPU.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{
    helpers::bpf_get_smp_processor_id,
    macros::{map, perf_event, raw_tracepoint},
    maps::Array,
    programs::{PerfEventContext, RawTracePointContext},
};
use hvprof_common::{Batch, DevPacketEvent, SockLifeEvent, kind};

use crate::maps::{EVENTS, count_lost, submit_flags};

/// 1 once `hvp_batch_flush` and `hvp_batch_idle` run. Set by user space
/// after attaching them.
#[map(name = "HVP_BATCHING")]
static BATCHING: Array<u32> = Array::with_max_entries(1, 0);

/// How long an event may wait in its CPU's batch while events keep coming
/// there (the programs below send what waits on a CPU where none come).
const WAIT_NS: u64 = 100_000_000;

/// An event that travels in a batch: the kind of the batch's record and
/// the probe its loss is counted for.
pub trait Item: 'static {
    const BATCH_KIND: u16;
    fn probe(&self) -> u16;
}

impl Item for SockLifeEvent {
    const BATCH_KIND: u16 = kind::SOCK_LIVES;
    fn probe(&self) -> u16 {
        self.header.probe
    }
}

impl Item for DevPacketEvent {
    const BATCH_KIND: u16 = kind::DEV_PACKETS;
    fn probe(&self) -> u16 {
        self.header.probe
    }
}

/// Sends one event from `probe`, written in place by `fill`: through this
/// CPU's batch `b`, or alone in a ring record of its own when batching is
/// off or a program this one interrupted holds the batch (counted lost
/// for `probe` when the ring is full).
#[inline(always)]
pub fn emit<T: Item, const N: usize>(
    b: Option<*mut Batch<T, N>>,
    now: u64,
    probe: u16,
    fill: impl Fn(&mut T),
) {
    if add(b, now, &fill) {
        return;
    }
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            // SAFETY: the reserved record, every byte of which `fill`
            // writes.
            fill(unsafe { &mut *entry.as_mut_ptr() });
            entry.submit(submit_flags(now));
        }
        None => count_lost(probe),
    }
}

/// Adds one event to this CPU's batch `b`, written in place by `fill`,
/// and sends the batch if it is full or has waited long enough. `false`
/// (nothing done): batching is off, or a program this one interrupted
/// holds the batch.
#[inline(always)]
fn add<T: Item, const N: usize>(
    b: Option<*mut Batch<T, N>>,
    now: u64,
    fill: impl FnOnce(&mut T),
) -> bool {
    let batching = BATCHING.get(0).is_some_and(|on| *on != 0);
    let Some(b) = b.filter(|b| batching && hold(*b)) else {
        return false;
    };
    const { assert!(N.is_power_of_two()) };
    // SAFETY: this CPU's batch, held: the programs that flush it can't
    // change it meanwhile, and a program doesn't run twice at once on a
    // CPU (the kernel skips a nested run).
    let batch = unsafe { &mut *b };
    // Below `N` always (a full batch is sent at once). Read afresh and
    // masked so that the verifier sees the bound on the value itself: one
    // learned from a comparison is lost by older verifiers (6.1) when the
    // register is spilled, and the compiler drops a mask it can prove
    // changes nothing.
    // SAFETY: an aligned u32 of the held batch.
    let n = unsafe { core::ptr::read_volatile(&raw const batch.count) } as usize & (N - 1);
    fill(&mut batch.items[n]);
    batch.count = n as u32 + 1;
    if n == 0 {
        batch.first_ns = now;
    }
    if batch.count as usize >= N || now.wrapping_sub(batch.first_ns) >= WAIT_NS {
        send(batch, now);
    }
    release(b);
    true
}

/// Sends what `batch` (held) holds, in one record of just its events.
#[inline(always)]
fn send<T: Item, const N: usize>(batch: &mut Batch<T, N>, now: u64) {
    // Read afresh: the caller's bound on the count, which the compiler
    // knows, is not one the verifier can see, and the length of the output
    // below must be bounded where it is computed.
    // SAFETY: an aligned u32 of the batch.
    let count = unsafe { core::ptr::read_volatile(&raw const batch.count) };
    let n = (count as usize).min(N);
    if n == 0 {
        return;
    }
    batch.header.ts_ns = now;
    batch.header.kind = T::BATCH_KIND;
    batch.header.probe = batch.items[0].probe();
    // SAFETY: plain helper call.
    batch.header.cpu = unsafe { bpf_get_smp_processor_id() };
    let len = Batch::<T, N>::ITEMS_AT + n * core::mem::size_of::<T>();
    // SAFETY: the first `len` bytes of the batch (`n` is at most `N`), a
    // plain `#[repr(C)]` value.
    let bytes = unsafe { core::slice::from_raw_parts((&raw const *batch).cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(bytes, submit_flags(now)).is_err() {
        for item in batch.items.iter().take(n) {
            count_lost(item.probe());
        }
    }
    batch.count = 0;
}

/// Takes this CPU's batch (1 in `held`): fails only while a program this
/// one interrupted holds it. Only programs on this CPU touch its batch,
/// and an interrupting one runs to its end before the interrupted one
/// goes on, so plain reads and writes in program order suffice; the
/// fences keep the compiler from moving the batch's reads and writes out
/// from between `hold` and `release`.
#[inline(always)]
fn hold<T, const N: usize>(batch: *mut Batch<T, N>) -> bool {
    // SAFETY: an aligned u64 of this CPU's batch.
    unsafe {
        if core::ptr::read_volatile(&raw const (*batch).held) != 0 {
            return false;
        }
        core::ptr::write_volatile(&raw mut (*batch).held, 1);
    }
    compiler_fence(Ordering::SeqCst);
    true
}

#[inline(always)]
fn release<T, const N: usize>(batch: *mut Batch<T, N>) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: an aligned u64 of this CPU's batch, held by this program.
    unsafe { core::ptr::write_volatile(&raw mut (*batch).held, 0) };
}

/// A timer on every CPU (a CPU-clock perf event, a few times a second):
/// sends the events waiting in the batches of a CPU kept busy by work
/// that adds none.
#[perf_event]
pub fn hvp_batch_flush(_ctx: PerfEventContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    flush_all();
    0
}

/// `power:cpu_idle`: sends the events waiting in the batches of a CPU
/// going idle (the timer above doesn't fire on an idle CPU).
#[raw_tracepoint(tracepoint = "cpu_idle")]
pub fn hvp_batch_idle(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(unsigned int state, unsigned int cpu_id); leaving idle is
    // PWR_EVENT_EXIT, -1.
    let state: u64 = ctx.arg(0);
    if state as u32 != u32::MAX {
        flush_all();
    }
    0
}

#[inline(always)]
fn flush_all() {
    flush(crate::sock::batch());
    flush(crate::dev::batch());
}

/// Sends what waits in this CPU's batch `b`, unless a program it
/// interrupted holds the batch (then the next tick, idle entry or event
/// sends it).
#[inline(always)]
fn flush<T: Item, const N: usize>(b: Option<*mut Batch<T, N>>) {
    let Some(b) = b else {
        return;
    };
    // SAFETY: this CPU's batch; a racy peek, decided again once held.
    if unsafe { core::ptr::read_volatile(&raw const (*b).count) } == 0 || !hold(b) {
        return;
    }
    // SAFETY: plain helper call.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: held (see `add`).
    send(unsafe { &mut *b }, now);
    release(b);
}
