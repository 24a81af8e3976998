//! Socket layer: TCP connection lifecycle from `sock:inet_sock_set_state`.
//! Field offsets of the tracepoint record and of `struct tcp_sock` come
//! from user space (read from the running kernel), never compiled in.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use hvprof_common::{KernelOffsets, SockStateEvent, SockStateTpOffsets, kind, probe};

use crate::filter::task_wanted;
use crate::maps::{EVENTS, count_lost, header, submit_flags};

#[unsafe(no_mangle)]
static HVP_SOCK_STATE_TP: Global<SockStateTpOffsets> = Global::new(SockStateTpOffsets {
    skaddr: 0,
    oldstate: 0,
    newstate: 0,
    sport: 0,
    dport: 0,
    family: 0,
    protocol: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
});

#[unsafe(no_mangle)]
static HVP_KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    tcp_bytes_received: 0,
    tcp_bytes_acked: 0,
    valid: 0,
    _pad: 0,
});

const IPPROTO_TCP: u16 = 6;
const AF_INET6: u16 = 10;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn hvp_sock_state(ctx: TracePointContext) -> u32 {
    let _ = try_sock_state(&ctx);
    0
}

#[inline(always)]
fn try_sock_state(ctx: &TracePointContext) -> Result<(), i32> {
    let off = HVP_SOCK_STATE_TP.load();
    // SAFETY: offsets come from this kernel's tracepoint format.
    let Some(rec) = Record::copy(ctx) else {
        return Ok(());
    };
    let protocol: u16 = rec.get(ctx, off.protocol);
    if protocol != IPPROTO_TCP || !task_wanted() {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SockStateEvent>(0) else {
        count_lost(probe::SOCK_STATE);
        return Ok(());
    };
    let ev = fill(ctx, &rec, &off);
    entry.write(ev);
    entry.submit(submit_flags());
    Ok(())
}

/// The start of the tracepoint record, copied to the stack with one
/// helper call; fields are then read from the copy (a helper call per
/// field would cost more than the rest of the program).
struct Record([u8; RECORD_BYTES]);

const RECORD_BYTES: usize = 64;

impl Record {
    #[inline(always)]
    fn copy(ctx: &TracePointContext) -> Option<Self> {
        let mut r = Record([0; RECORD_BYTES]);
        // SAFETY: probe_read tolerates faults; the destination is ours.
        let rc = unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, &mut r.0) };
        rc.ok().map(|()| r)
    }

    /// The `T` at `off`, from the copy (or the record itself beyond it).
    #[inline(always)]
    fn get<T: Copy + Default>(&self, ctx: &TracePointContext, off: u32) -> T {
        let off = off as usize;
        if off > RECORD_BYTES - core::mem::size_of::<T>() {
            // SAFETY: the offset comes from this kernel's tracepoint format.
            return unsafe { ctx.read_at::<T>(off) }.unwrap_or_default();
        }
        // SAFETY: bounds checked above; unaligned read from the stack.
        unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(off).cast::<T>()) }
    }
}

#[inline(always)]
fn fill(ctx: &TracePointContext, rec: &Record, off: &SockStateTpOffsets) -> SockStateEvent {
    // Offsets come from this kernel's tracepoint format.
    let read_u16 = |o: u32| rec.get::<u16>(ctx, o);
    let read_i32 = |o: u32| rec.get::<i32>(ctx, o);
    let skaddr: u64 = rec.get(ctx, off.skaddr);
    let family = read_u16(off.family);
    let mut ev = SockStateEvent {
        header: header(kind::SOCK_STATE, probe::SOCK_STATE),
        skaddr,
        bytes_received: 0,
        bytes_acked: 0,
        family,
        sport: read_u16(off.sport),
        dport: read_u16(off.dport),
        oldstate: read_i32(off.oldstate) as u8,
        newstate: read_i32(off.newstate) as u8,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == AF_INET6 {
        ev.saddr = unsafe { ctx.read_at(off.saddr_v6 as usize) }.unwrap_or([0; 16]);
        ev.daddr = unsafe { ctx.read_at(off.daddr_v6 as usize) }.unwrap_or([0; 16]);
    } else {
        let s: u32 = rec.get(ctx, off.saddr);
        let d: u32 = rec.get(ctx, off.daddr);
        ev.saddr[..4].copy_from_slice(&s.to_ne_bytes());
        ev.daddr[..4].copy_from_slice(&d.to_ne_bytes());
    }
    let k = HVP_KERNEL_OFFSETS.load();
    if k.valid != 0 && skaddr != 0 {
        let base = skaddr as *const u8;
        // SAFETY: kernel pointer from the tracepoint; probe_read tolerates
        // faults.
        unsafe {
            ev.bytes_received =
                bpf_probe_read_kernel(base.add(k.tcp_bytes_received as usize).cast::<u64>())
                    .unwrap_or(0);
            ev.bytes_acked =
                bpf_probe_read_kernel(base.add(k.tcp_bytes_acked as usize).cast::<u64>())
                    .unwrap_or(0);
        }
    }
    ev
}
