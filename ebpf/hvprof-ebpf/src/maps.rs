//! What every program shares: the event ring buffer, the per-probe
//! lost-event counters, the common event header filler, and the switch
//! that makes every program return at once (`HVP_HOOKS_ONLY`).

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, generated},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use hvprof_common::{COMM_LEN, EventHeader, MAX_PROBES};

/// All events, in the order the CPUs reserve them. User space resizes it at
/// load time (`--ringbuf-size`).
#[map(name = "HVP_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Events dropped because the ring buffer was full, per probe id.
#[map(name = "HVP_LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_PROBES, 0);

/// Bytes waiting in the ring at which a submit wakes the reader: a quarter
/// of the ring, set by user space with the ring's size.
#[unsafe(no_mangle)]
static HVP_WAKEUP_BYTES: Global<u64> = Global::new(2 * 1024 * 1024);

/// Non-zero: every program returns at once, so a recording costs what its
/// attachment points alone cost and records nothing — the floor under any
/// program, for `cargo xtask bench overhead --floor`. Set at load time.
#[unsafe(no_mangle)]
static HVP_HOOKS_ONLY: Global<u32> = Global::new(0);

/// Whether the programs are to return at once ([`HVP_HOOKS_ONLY`]): each
/// program's first test.
#[inline(always)]
pub fn hooks_only() -> bool {
    HVP_HOOKS_ONLY.load() != 0
}

/// Wake the reader only once a quarter of the ring is waiting; user space
/// drains on a short timer anyway, so this is for bursts. A wakeup per
/// event would cost more than the event itself, and so would asking the
/// ring its fill at every event (its positions are shared by all CPUs):
/// one event in 16, picked by the low bits of its time `ts_ns`, asks.
#[inline(always)]
pub fn submit_flags(ts_ns: u64) -> u64 {
    if ts_ns % 16 == 0 && EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= HVP_WAKEUP_BYTES.load() {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Writes the current task's comm into `dst`, NUL padded (zeros if it
/// fails). Aya's `bpf_get_current_comm` fills a zeroed stack array, and the
/// BPF target zeroes and copies such an array one byte per turn of a loop.
#[inline(always)]
pub fn current_comm_into(dst: &mut [u8; COMM_LEN]) {
    // SAFETY: a valid, writable array.
    unsafe { write_current_comm(dst) };
}

/// [`current_comm_into`] for memory not initialised yet (the helper writes
/// all `COMM_LEN` bytes, zero padded).
///
/// # Safety
/// `dst` is valid for writes of `COMM_LEN` bytes.
#[inline(always)]
pub unsafe fn write_current_comm(dst: *mut [u8; COMM_LEN]) {
    // SAFETY: as the caller promised.
    unsafe { generated::bpf_get_current_comm(dst.cast(), COMM_LEN as u32) };
}

/// Reads `COMM_LEN` bytes at kernel address `src` (a task's comm, a
/// device's name) into `dst` (zeros if it faults), with no copy in
/// between (see [`current_comm_into`]).
#[inline(always)]
pub fn kernel_comm_into(dst: &mut [u8; COMM_LEN], src: u64) {
    // SAFETY: the helper writes at most COMM_LEN bytes at `dst` and
    // tolerates faults at `src`.
    unsafe {
        generated::bpf_probe_read_kernel(dst.as_mut_ptr().cast(), COMM_LEN as u32, src as *const _)
    };
}

/// Counts one lost event for `probe`.
#[inline(always)]
pub fn count_lost(probe: u16) {
    if let Some(slot) = LOST.get_ptr_mut(u32::from(probe)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Writes the common header of an event from `probe` of `kind`, for the
/// current task, into `h` (an event being built where it goes: in the ring;
/// built on the stack and copied, its comm would move a byte at a time).
/// Returns its time.
#[inline(always)]
pub fn header_into(h: &mut EventHeader, kind: u16, probe: u16) -> u64 {
    // SAFETY: plain helper call.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    header_at(h, kind, probe, ts_ns);
    ts_ns
}

/// [`header_into`] with the event's time `ts_ns` already read.
#[inline(always)]
pub fn header_at(h: &mut EventHeader, kind: u16, probe: u16, ts_ns: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    h.ts_ns = ts_ns;
    h.kind = kind;
    h.probe = probe;
    // SAFETY: plain helper call.
    h.cpu = unsafe { bpf_get_smp_processor_id() };
    h.pid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    current_comm_into(&mut h.comm);
}
