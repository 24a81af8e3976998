//! Socket layer: TCP connection lifecycle from `sock:inet_sock_set_state`.
//! Field offsets of the tracepoint record and of `struct tcp_sock` come
//! from user space (read from the running kernel), never compiled in.

use aya_ebpf::{
    Global, helpers::bpf_probe_read_kernel, macros::tracepoint, programs::TracePointContext,
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
    let protocol: u16 = unsafe { ctx.read_at(off.protocol as usize)? };
    if protocol != IPPROTO_TCP || !task_wanted() {
        return Ok(());
    }
    let Some(mut entry) = EVENTS.reserve::<SockStateEvent>(0) else {
        count_lost(probe::SOCK_STATE);
        return Ok(());
    };
    let ev = fill(ctx, &off);
    entry.write(ev);
    entry.submit(submit_flags());
    Ok(())
}

#[inline(always)]
fn fill(ctx: &TracePointContext, off: &SockStateTpOffsets) -> SockStateEvent {
    // SAFETY (all reads): offsets come from this kernel's tracepoint format;
    // a failed read leaves the field zero.
    let read_u16 = |o: u32| unsafe { ctx.read_at::<u16>(o as usize) }.unwrap_or(0);
    let read_i32 = |o: u32| unsafe { ctx.read_at::<i32>(o as usize) }.unwrap_or(0);
    let skaddr: u64 = unsafe { ctx.read_at(off.skaddr as usize) }.unwrap_or(0);
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
        let s: [u8; 4] = unsafe { ctx.read_at(off.saddr as usize) }.unwrap_or([0; 4]);
        let d: [u8; 4] = unsafe { ctx.read_at(off.daddr as usize) }.unwrap_or([0; 4]);
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
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
