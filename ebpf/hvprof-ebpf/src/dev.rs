//! Device boundaries: every TCP/IPv4 packet handed to (before the driver
//! runs, so the timestamp precedes anything the device does with it) or
//! received from a traced device (TAP, veth, bridge port, a guest's NIC), with its
//! 4-tuple and sequence numbers so packets can be matched across layers
//! and across the host/guest boundary. Devices are filtered in the kernel
//! (netns inode + ifindex), so untraced traffic costs a map lookup. Two
//! entry points each: the raw tracepoints (the `sk_buff` in a register, no
//! record built: the classic tracepoint fills its whole record, device
//! name included, before a program runs, for every packet of every
//! device) and, where those can't be used, the classic ones. Packets
//! cross to user space in a batch per CPU (`batch`).

use aya_ebpf::{
    Global,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use hvprof_common::{DevOffsets, DevPacketEvent, DevPacketsEvent, kind, probe};

use crate::maps::{header_at, kernel_comm_into};

#[unsafe(no_mangle)]
static HVP_DEV_OFFSETS: Global<DevOffsets> = Global::new(DevOffsets {
    skb_head: 0,
    skb_data: 0,
    skb_network_header: 0,
    skb_dev: 0,
    dev_ifindex: 0,
    dev_name: 0,
    dev_nd_net: 0,
    net_inum: 0,
    tp_xmit_skbaddr: 0,
    tp_xmit_len: 0,
    tp_recv_skbaddr: 0,
    tp_recv_len: 0,
    valid: 0,
    filter: 0,
    skb_len: 0,
});

/// Devices to trace: key `netns inode << 32 | ifindex`.
#[map(name = "HVP_DEVICES")]
static DEVICES: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// Packets waiting to cross together, per CPU.
#[map(name = "HVP_DEV_BATCH")]
static BATCH: PerCpuArray<DevPacketsEvent> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's batch of packets.
#[inline(always)]
pub fn batch() -> Option<*mut DevPacketsEvent> {
    BATCH.get_ptr_mut(0)
}

#[tracepoint(category = "net", name = "net_dev_start_xmit")]
pub fn hvp_dev_xmit(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let o = HVP_DEV_OFFSETS.load();
    let _ = classic(&ctx, o.tp_xmit_skbaddr, o.tp_xmit_len, 0, probe::DEV_XMIT);
    0
}

#[tracepoint(category = "net", name = "netif_receive_skb")]
pub fn hvp_dev_recv(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let o = HVP_DEV_OFFSETS.load();
    let _ = classic(&ctx, o.tp_recv_skbaddr, o.tp_recv_len, 1, probe::DEV_RECV);
    0
}

#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn hvp_dev_xmit_raw(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(const struct sk_buff *skb, const struct net_device *dev)
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    let _ = packet(skb, Some(dev), 0, probe::DEV_XMIT, |o| read(skb, o.skb_len));
    0
}

#[raw_tracepoint(tracepoint = "netif_receive_skb")]
pub fn hvp_dev_recv_raw(ctx: RawTracePointContext) -> i32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // TP_PROTO(struct sk_buff *skb)
    let skb: u64 = ctx.arg(0);
    let _ = packet(skb, None, 1, probe::DEV_RECV, |o| read(skb, o.skb_len));
    0
}

/// A classic tracepoint's packet: the `sk_buff` and its length at these
/// offsets of the record.
#[inline(always)]
fn classic(
    ctx: &TracePointContext,
    skb_off: u32,
    len_off: u32,
    dir: u8,
    probe_id: u16,
) -> Result<(), i32> {
    // SAFETY: offsets from this kernel's tracepoint format.
    let skb: u64 = unsafe { ctx.read_at(skb_off as usize) }?;
    // SAFETY: as above.
    packet(skb, None, dir, probe_id, |_| unsafe {
        ctx.read_at::<u32>(len_off as usize)
    })
}

#[inline(always)]
fn read<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: kernel pointers; bpf_probe_read_kernel tolerates faults.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }
}

/// One packet `skb` on its device (`dev` when the tracepoint gives it,
/// else read from the `sk_buff`), going out (`dir` 0) or in (1); `len`
/// reads its length, once the packet is known to be wanted.
#[inline(always)]
fn packet(
    skb: u64,
    dev: Option<u64>,
    dir: u8,
    probe_id: u16,
    len: impl FnOnce(&DevOffsets) -> Result<u32, i32>,
) -> Result<(), i32> {
    let o = HVP_DEV_OFFSETS.load();
    if o.valid == 0 {
        return Ok(());
    }
    let dev: u64 = match dev {
        Some(d) => d,
        None => read(skb, o.skb_dev)?,
    };
    let ifindex: u32 = read(dev, o.dev_ifindex)?;
    let net: u64 = read(dev, o.dev_nd_net)?;
    let netns: u32 = if net != 0 {
        read(net, o.net_inum).unwrap_or(0)
    } else {
        0
    };
    if o.filter != 0 {
        let key = (u64::from(netns) << 32) | u64::from(ifindex);
        // SAFETY: read-only lookup.
        if unsafe { DEVICES.get(&key) }.is_none() {
            return Ok(());
        }
    }
    // The IP header: from the stack's network header on transmit, at
    // `data` on receive (before the stack sets the network header).
    let ip_at: u64 = if dir == 0 {
        let head: u64 = read(skb, o.skb_head)?;
        let nh: u16 = read(skb, o.skb_network_header)?;
        head + u64::from(nh)
    } else {
        read(skb, o.skb_data)?
    };
    // Headers read as words: a byte array would be copied a byte at a time
    // on this target.
    let ip: [u32; 5] = read(ip_at, 0)?;
    // SAFETY: same size, any bit pattern is valid.
    let ip: [u8; 20] = unsafe { core::mem::transmute(ip) };
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return Ok(());
    }
    let ihl = u32::from(ip[0] & 0x0f) * 4;
    let tcp: [u32; 5] = read(ip_at, ihl)?;
    // SAFETY: as above.
    let tcp: [u8; 20] = unsafe { core::mem::transmute(tcp) };
    let tot = u16::from_be_bytes([ip[2], ip[3]]);
    let doff = u16::from(tcp[12] >> 4) * 4;
    let len = len(&o).unwrap_or(0);
    // SAFETY: plain helper call.
    let ts = unsafe { bpf_ktime_get_ns() };
    // Every field is written, in place (a copy from the stack would move
    // the names a byte at a time).
    crate::batch::emit(batch(), ts, probe_id, |ev: &mut DevPacketEvent| {
        header_at(&mut ev.header, kind::DEV_PACKET, probe_id, ts);
        ev.skbaddr = skb;
        ev.netns = netns;
        ev.ifindex = ifindex;
        ev.len = len;
        ev.seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        ev.ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        ev.saddr = [ip[12], ip[13], ip[14], ip[15]];
        ev.daddr = [ip[16], ip[17], ip[18], ip[19]];
        ev.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        ev.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        ev.payload = tot.saturating_sub(ihl as u16).saturating_sub(doff);
        ev.flags = tcp[13];
        ev.dir = dir;
        ev._pad = 0;
        kernel_comm_into(&mut ev.ifname, dev + u64::from(o.dev_name));
    });
    Ok(())
}
