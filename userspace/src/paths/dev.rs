//! Device boundaries: TCP/IPv4 packets as they are handed to a device's
//! driver (`net_dev_start_xmit`) or
//! enter (`netif_receive_skb`) a traced device — its catalog rows, the
//! `sk_buff`/`net_device` offsets its programs need (from BTF), the
//! in-kernel device filter, and its decoder.

use std::{net::Ipv4Addr, os::unix::fs::MetadataExt as _, process::Command};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, maps::HashMap};
use hvprof_common::{DevOffsets, DevPacketEvent, probe};
use serde::Serialize;

use super::{Path, raw, tp, traced};
use crate::{
    catalog::Layer,
    kernel::{btf, tracefs},
};

const FIELDS: &[&str] = &[
    "dev", "netns", "saddr", "sport", "daddr", "dport", "seq", "ack", "flags", "payload",
];

pub const PATH: Path = Path {
    name: "dev",
    frames: &[],
    rows: &[
        raw(
            traced(
                tp(
                    "dev:net_dev_start_xmit",
                    Layer::Backend,
                    "dev",
                    "net",
                    "net_dev_start_xmit",
                    FIELDS,
                ),
                "hvp_dev_xmit",
                probe::DEV_XMIT,
            ),
            XMIT_RAW_PROGRAM,
        ),
        raw(
            traced(
                tp(
                    "dev:netif_receive_skb",
                    Layer::Backend,
                    "dev",
                    "net",
                    "netif_receive_skb",
                    FIELDS,
                ),
                "hvp_dev_recv",
                probe::DEV_RECV,
            ),
            RECV_RAW_PROGRAM,
        ),
    ],
};

/// The raw-tracepoint programs (the rows' preferred method): they read the
/// packet's length in the `sk_buff` rather than in a record.
pub const XMIT_RAW_PROGRAM: &str = "hvp_dev_xmit_raw";
pub const RECV_RAW_PROGRAM: &str = "hvp_dev_recv_raw";

pub const OFFSETS_GLOBAL: &str = "HVP_DEV_OFFSETS";
const DEVICES_MAP: &str = "HVP_DEVICES";
/// Packets waiting to cross together, per CPU.
const BATCH_MAP: &str = "HVP_DEV_BATCH";

/// Packets still waiting in the CPUs' batches when the programs were
/// detached.
pub fn unsent_packets(ebpf: &Ebpf) -> Result<Vec<Vec<u8>>> {
    crate::batch::unsent::<DevPacketEvent, { hvprof_common::DEV_BATCH }>(
        ebpf,
        BATCH_MAP,
        DevPacketEvent::as_bytes,
    )
}

/// Offsets for this kernel; `valid == 0` (device probes record nothing)
/// when something is missing.
pub fn offsets(kbtf: Option<&btf_rs::Btf>, filter: bool) -> DevOffsets {
    resolve_offsets(kbtf, filter).unwrap_or_else(|e| {
        log::warn!("device probes disabled: {e:#}");
        DevOffsets::default()
    })
}

/// Why the raw-tracepoint programs can't be used here (`None`: they can).
pub fn raw_unready(kbtf: Option<&btf_rs::Btf>) -> Option<String> {
    resolve_offsets(kbtf, false).err().map(|e| format!("{e:#}"))
}

fn resolve_offsets(kbtf: Option<&btf_rs::Btf>, filter: bool) -> Result<DevOffsets> {
    let b = kbtf.ok_or_else(|| anyhow!("no kernel BTF"))?;
    let xmit = tracefs::format("net", "net_dev_start_xmit")?;
    let recv = tracefs::format("net", "netif_receive_skb")?;
    Ok(DevOffsets {
        skb_head: btf::member_offset(b, "sk_buff", "head")?,
        skb_data: btf::member_offset(b, "sk_buff", "data")?,
        skb_network_header: btf::member_offset(b, "sk_buff", "network_header")?,
        skb_dev: btf::member_offset(b, "sk_buff", "dev")?,
        dev_ifindex: btf::member_offset(b, "net_device", "ifindex")?,
        dev_name: btf::member_offset(b, "net_device", "name")?,
        dev_nd_net: btf::member_offset(b, "net_device", "nd_net")?,
        net_inum: btf::member_offset(b, "net", "ns")? + btf::member_offset(b, "ns_common", "inum")?,
        tp_xmit_skbaddr: tracefs::offset_of(&xmit, "skbaddr", 8)?,
        tp_xmit_len: tracefs::offset_of(&xmit, "len", 4)?,
        tp_recv_skbaddr: tracefs::offset_of(&recv, "skbaddr", 8)?,
        tp_recv_len: tracefs::offset_of(&recv, "len", 4)?,
        valid: 1,
        filter: u32::from(filter),
        skb_len: btf::member_offset(b, "sk_buff", "len")?,
    })
}

/// A device to trace: `IFNAME` in hvprof's own network namespace, or
/// `NETNS:IFNAME` in a named namespace (`ip netns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub spec: String,
    pub netns: u32,
    pub ifindex: u32,
}

/// Resolves `--dev` arguments.
pub fn resolve(spec: &str) -> Result<Device> {
    let (ns, ifname) = match spec.split_once(':') {
        Some((ns, ifname)) => (Some(ns), ifname),
        None => (None, spec),
    };
    if ifname.is_empty() || ifname.contains('/') {
        bail!("--dev {spec:?}: give IFNAME or NETNS:IFNAME");
    }
    let ns_path = match ns {
        Some(n) => format!("/run/netns/{n}"),
        None => "/proc/self/ns/net".into(),
    };
    let netns = std::fs::metadata(&ns_path)
        .with_context(|| format!("--dev {spec:?}: no network namespace at {ns_path}"))?
        .ino() as u32;
    let ifindex = match ns {
        None => std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        Some(n) => Command::new("ip")
            .args(["-n", n, "-o", "link", "show", "dev", ifname])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.split(':').next().and_then(|i| i.trim().parse().ok())
            }),
    }
    .ok_or_else(|| anyhow!("--dev {spec:?}: no such network device; `ip link` lists them"))?;
    Ok(Device {
        spec: spec.to_string(),
        netns,
        ifindex,
    })
}

/// Puts the devices into the kernel filter.
pub fn install(ebpf: &mut Ebpf, devices: &[Device]) -> Result<()> {
    let map = ebpf
        .map_mut(DEVICES_MAP)
        .ok_or_else(|| anyhow!("map {DEVICES_MAP} missing"))?;
    let mut m: HashMap<_, u64, u8> = HashMap::try_from(map)?;
    for d in devices {
        m.insert((u64::from(d.netns) << 32) | u64::from(d.ifindex), 1, 0)?;
    }
    Ok(())
}

/// A decoded packet event.
#[derive(Debug, Clone, Serialize)]
pub struct DevPacket {
    pub dev: String,
    pub netns: u32,
    pub ifindex: u32,
    /// `xmit` or `recv`.
    pub dir: &'static str,
    pub skb: String,
    pub len: u32,
    pub saddr: Ipv4Addr,
    pub sport: u16,
    pub daddr: Ipv4Addr,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: String,
    pub payload: u16,
}

/// TCP flags as letters (`S`, `A`, `F`, `R`, `P`), tcpdump style.
pub fn flags(f: u8) -> String {
    [
        (0x02, 'S'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x10, 'A'),
    ]
    .iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, c)| *c)
    .collect()
}

pub fn decode(ev: &DevPacketEvent) -> DevPacket {
    DevPacket {
        dev: crate::event::comm(&ev.ifname),
        netns: ev.netns,
        ifindex: ev.ifindex,
        dir: if ev.dir == 0 { "xmit" } else { "recv" },
        skb: format!("{:#x}", ev.skbaddr),
        len: ev.len,
        saddr: Ipv4Addr::from(ev.saddr),
        sport: ev.sport,
        daddr: Ipv4Addr::from(ev.daddr),
        dport: ev.dport,
        seq: ev.seq,
        ack: ev.ack,
        flags: flags(ev.flags),
        payload: ev.payload,
    }
}
