//! TCP/IP stack (socket layer): connection lifecycle from
//! `sock:inet_sock_set_state` — its catalog row, the offsets its programs
//! need from this kernel, the programs that send its batched lives, the
//! open and unsent lives read back at the end, the listening sockets open
//! when a recording starts (whose owners own the sockets they accept),
//! and its event decoder (one event per socket life, aggregated in the
//! kernel).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use hvprof_common::{
    KernelOffsets, ListenKey, SOCK_COMMON_HEAD, SockLifeEvent, SockOffsets, SockSlot,
    SockStateTpOffsets, probe, sock_life,
};
use serde::Serialize;

use super::Path;
use crate::{
    catalog::{Hook, Layer, ProbeSpec, Programs},
    kernel::{btf, tracefs},
};

pub const PATH: Path = Path {
    name: "tcp",
    frames: &[
        ("tcp_", Layer::Socket),
        ("__tcp", Layer::Socket),
        ("inet_", Layer::Socket),
        ("__inet", Layer::Socket),
        ("inet6_", Layer::Socket),
        ("ip_", Layer::Socket),
        ("__ip", Layer::Socket),
        ("ip6_", Layer::Socket),
        ("ipv4_", Layer::Socket),
        ("udp_", Layer::Socket),
        ("sock_", Layer::Socket),
        ("__sock", Layer::Socket),
        ("sk_", Layer::Socket),
        ("__sk_", Layer::Socket),
        ("skb_", Layer::Socket),
        ("__skb", Layer::Socket),
        ("kfree_skb", Layer::Socket),
        ("consume_skb", Layer::Socket),
        ("__sys_", Layer::Socket),
        ("__x64_sys_", Layer::Socket),
        ("do_syscall_64", Layer::Socket),
        ("entry_SYSCALL", Layer::Socket),
        ("syscall_", Layer::Socket),
        ("__napi_alloc", Layer::Socket),
        ("dst_", Layer::Socket),
        ("fib_", Layer::Socket),
        ("lock_sock", Layer::Socket),
        ("release_sock", Layer::Socket),
        ("__dev_queue_xmit", Layer::Socket),
        ("dev_hard_start_xmit", Layer::Socket),
        ("sch_direct_xmit", Layer::Socket),
        ("__qdisc_run", Layer::Socket),
        ("loopback_xmit", Layer::Socket),
        ("__netif_receive_skb", Layer::Socket),
        ("netif_receive_skb", Layer::Socket),
        ("process_backlog", Layer::Socket),
        ("__netif_rx", Layer::Socket),
        ("netif_rx", Layer::Socket),
        ("__dev_xmit", Layer::Socket),
        ("validate_xmit", Layer::Socket),
        ("neigh_", Layer::Socket),
        ("ep_", Layer::Socket),
        ("do_epoll", Layer::Socket),
        ("__x64_sys_epoll", Layer::Socket),
        ("sys_epoll", Layer::Socket),
        ("__close_fd", Layer::Socket),
        ("sockfd_", Layer::Socket),
        ("__fput", Layer::Socket),
    ],
    rows: &[ProbeSpec {
        name: PROBE,
        layer: Layer::Socket,
        path: "tcp",
        hook: Hook::Tracepoint {
            category: "sock",
            name: "inet_sock_set_state",
            module: None,
        },
        fields: &[
            "sk",
            "family",
            "saddr",
            "sport",
            "daddr",
            "dport",
            "transitions",
            "bytes_received",
            "bytes_acked",
        ],
        programs: Programs {
            fentry: None,
            kprobe: None,
            raw_tracepoint: Some(RAW_PROGRAM),
            tracepoint: Some("hvp_sock_state"),
            perf_event: None,
        },
        id: Some(probe::SOCK_STATE),
    }],
};

/// The raw-tracepoint program (the row's preferred method).
pub const RAW_PROGRAM: &str = "hvp_sock_raw";
/// Global names in the eBPF object.
pub const TP_GLOBAL: &str = "HVP_SOCK_STATE_TP";
pub const KERNEL_GLOBAL: &str = "HVP_KERNEL_OFFSETS";
/// The catalog row's name.
pub const PROBE: &str = "tcp:inet_sock_set_state";
pub const SOCK_GLOBAL: &str = "HVP_SOCK_OFFSETS";
/// Open socket lives: a slot per socket by a hash of its address, and the
/// lives whose slot another socket holds by address.
pub const SLOTS_MAP: &str = "HVP_SOCK_SLOTS";
pub const SLOT_COUNT_GLOBAL: &str = "HVP_SOCK_SLOT_COUNT";
pub const SOCKS_MAP: &str = "HVP_SOCKS";
/// Closed lives waiting to cross together, per CPU.
const BATCH_MAP: &str = "HVP_SOCK_BATCH";
/// The owners of listening sockets, by local end.
pub const LISTENERS_MAP: &str = "HVP_LISTENERS";
/// Non-zero: follow every state change (`record --all-tcp-states`).
pub const ALL_STATES_GLOBAL: &str = "HVP_SOCK_ALL_STATES";
/// Sockets followed at once at most by default (`record --max-sockets`):
/// about 15 MiB of kernel memory; a socket that finds no room is counted
/// lost.
pub const DEFAULT_MAX_SOCKETS: u32 = 65536;

/// Slots at most: a table that stays in the CPUs' caches (about 750 KiB);
/// more slots made each state change slower here (cache misses), and
/// lives beyond them go to the hash map.
const MAX_SLOTS: u32 = 4096;

/// Slots and hash-map entries for `max_sockets` (2 at least), adding up to
/// it (so that no more are ever followed at once): an eighth at least (one
/// at least) take the lives whose slot another socket holds.
pub fn map_sizes(max_sockets: u32) -> (u32, u32) {
    let max = max_sockets.max(2);
    let slots = (max - (max / 8).max(1)).min(MAX_SLOTS);
    (slots, max - slots)
}

/// Tracepoint record offsets for this kernel.
pub fn tp_offsets() -> Result<SockStateTpOffsets> {
    let f = tracefs::format("sock", "inet_sock_set_state")?;
    let o = |name, size| tracefs::offset_of(&f, name, size);
    (|| -> Result<SockStateTpOffsets> {
        Ok(SockStateTpOffsets {
            skaddr: o("skaddr", 8)?,
            oldstate: o("oldstate", 4)?,
            newstate: o("newstate", 4)?,
            sport: o("sport", 2)?,
            dport: o("dport", 2)?,
            family: o("family", 2)?,
            protocol: o("protocol", 2)?,
            saddr: o("saddr", 4)?,
            daddr: o("daddr", 4)?,
            saddr_v6: o("saddr_v6", 16)?,
            daddr_v6: o("daddr_v6", 16)?,
        })
    })()
    .context("sock:inet_sock_set_state has an unexpected format on this kernel")
}

/// `tcp_sock` byte counters, when this kernel's BTF has them; otherwise
/// the events carry zero bytes (the offsets stay `valid == 0`).
pub fn kernel_offsets(btf: Option<&btf_rs::Btf>) -> KernelOffsets {
    let Some(btf) = btf else {
        return KernelOffsets::default();
    };
    match (
        btf::member_offset(btf, "tcp_sock", "bytes_received"),
        btf::member_offset(btf, "tcp_sock", "bytes_acked"),
    ) {
        (Ok(rx), Ok(acked)) => KernelOffsets {
            tcp_bytes_received: rx,
            tcp_bytes_acked: acked,
            valid: 1,
            _pad: 0,
        },
        (rx, acked) => {
            log::warn!(
                "tcp_sock byte counters unavailable ({:?} / {:?}); bytes will read 0",
                rx.err(),
                acked.err()
            );
            KernelOffsets::default()
        }
    }
}

/// One state change of a socket.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub old: &'static str,
    pub new: &'static str,
}

/// A decoded socket life: its state changes, in order.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SockLife {
    /// Kernel address of the socket, hex: one endpoint for its lifetime.
    pub sk: String,
    pub family: &'static str,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub transitions: Vec<Transition>,
    /// It reached CLOSE (else still open when the recording stopped).
    pub closed: bool,
    /// More state changes happened than an event keeps (middle ones
    /// dropped).
    pub steps_dropped: bool,
    pub bytes_received: u64,
    pub bytes_acked: u64,
}

/// TCP state number to its kernel name (without the `TCP_` prefix).
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

pub fn decode(ev: &SockLifeEvent) -> SockLife {
    let (family, saddr, daddr) = if ev.family == 10 {
        (
            "inet6",
            IpAddr::V6(Ipv6Addr::from(ev.saddr)),
            IpAddr::V6(Ipv6Addr::from(ev.daddr)),
        )
    } else {
        let v4 = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        ("inet", v4(&ev.saddr), v4(&ev.daddr))
    };
    let n = usize::from(ev.steps).min(hvprof_common::SOCK_STEPS);
    SockLife {
        sk: format!("{:#x}", ev.skaddr),
        family,
        saddr,
        sport: ev.sport,
        daddr,
        dport: ev.dport,
        transitions: (0..n)
            .map(|i| Transition {
                ts_ns: ev.step_ns[i],
                old: state_name(ev.step_old[i]),
                new: state_name(ev.step_new[i]),
            })
            .collect(),
        closed: ev.flags & sock_life::CLOSED != 0,
        steps_dropped: ev.flags & sock_life::STEPS_DROPPED != 0,
        bytes_received: ev.bytes_received,
        bytes_acked: ev.bytes_acked,
    }
}

/// `struct sock` offsets for the raw-tracepoint program, from `btf`; with
/// `valid == 0` (and the reason) when this kernel's BTF lacks one.
pub fn sock_offsets(btf: Option<&btf_rs::Btf>) -> (SockOffsets, Option<String>) {
    btf::offsets_or_why(btf, |btf| {
        let common = |m: &str| btf::member_offset(btf, "sock_common", m);
        let o = SockOffsets {
            daddr: common("skc_daddr")?,
            rcv_saddr: common("skc_rcv_saddr")?,
            dport: common("skc_dport")?,
            sport: btf::member_offset(btf, "inet_sock", "inet_sport")?,
            family: common("skc_family")?,
            v6_daddr: common("skc_v6_daddr")?,
            v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
            // `sock_common` is the first member of `struct sock`.
            protocol: btf::member_offset(btf, "sock", "sk_protocol")?,
            valid: 1,
            num: common("skc_num")?,
            ..SockOffsets::default()
        };
        let head = [
            (o.daddr, 4),
            (o.rcv_saddr, 4),
            (o.dport, 2),
            (o.num, 2),
            (o.family, 2),
        ];
        if head.iter().any(|(off, size)| off + size > SOCK_COMMON_HEAD) {
            anyhow::bail!(
                "sock_common's addresses, ports and family lie beyond its first {SOCK_COMMON_HEAD} bytes"
            );
        }
        // The network namespace, where the kernel has them.
        let net = (|| -> Result<(u32, u32)> {
            let inum = btf::member_offset(btf, "net", "ns")?
                + btf::member_offset(btf, "ns_common", "inum")?;
            Ok((common("skc_net")?, inum))
        })();
        let mut o = o;
        if let Ok((net, inum)) = net {
            (o.net, o.net_inum, o.net_valid) = (net, inum, 1);
        }
        Ok(o)
    })
}

/// The listening TCP sockets open now, with the pid of each process that
/// holds one (a listener a server's workers share comes once per
/// process): every network namespace's `/proc/PID/net/tcp` and `tcp6`
/// (read once per namespace), matched by inode to the processes' open
/// files. Their keys carry the namespace's inode number `with_netns`
/// (when the programs read it too: [`SockOffsets::net_valid`]), else 0.
/// Unreadable entries (processes that exit meanwhile) are passed over.
pub fn listeners(with_netns: bool) -> Vec<(ListenKey, u32)> {
    use std::collections::{HashMap, HashSet};
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut namespaces = HashSet::new();
    let mut by_inode: HashMap<u64, ListenKey> = HashMap::new();
    for pid in &pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !namespaces.insert(ns.clone()) {
            continue;
        }
        let netns = link_number(&ns, "net")
            .and_then(|n| u32::try_from(n).ok())
            .filter(|_| with_netns)
            .unwrap_or(0);
        for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
                let rows = parse_listeners(&text, family).into_iter();
                by_inode.extend(rows.map(|(inode, key)| (inode, ListenKey { netns, ..key })));
            }
        }
    }
    let mut out = Vec::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(key) = link_number(&target, "socket").and_then(|i| by_inode.get(&i)) {
                out.push((*key, pid));
            }
        }
    }
    out
}

/// The inode number in a `/proc` link to a namespace or socket,
/// `KIND:[NUMBER]` (`net:[4026531840]`, `socket:[4242]`).
fn link_number(link: &std::path::Path, kind: &str) -> Option<u64> {
    let rest = link.to_str()?.strip_prefix(kind)?;
    rest.strip_prefix(":[")?.strip_suffix(']')?.parse().ok()
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `/proc/net/tcp`'s state column for LISTEN.
const LISTEN_STATE: &str = "0A";

/// The LISTEN rows of a `/proc/net/tcp` (or `tcp6`, `family`) text: each
/// socket's inode and local end. The address is printed as 32-bit words
/// in this machine's byte order, the port in hex.
fn parse_listeners(text: &str, family: u16) -> Vec<(u64, ListenKey)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&LISTEN_STATE) {
                return None;
            }
            let (addr_hex, port_hex) = f.get(1)?.split_once(':')?;
            let inode = f.get(9)?.parse().ok()?;
            let words = addr_hex.len() / 8;
            if addr_hex.len() % 8 != 0 || !matches!(words, 1 | 4) {
                return None;
            }
            let mut addr = [0u8; 16];
            for (i, chunk) in addr.chunks_mut(4).take(words).enumerate() {
                let w = u32::from_str_radix(addr_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            let key = ListenKey {
                family,
                port: u16::from_str_radix(port_hex, 16).ok()?,
                netns: 0,
                addr,
            };
            Some((inode, key))
        })
        .collect()
}

/// Closed lives still waiting in the CPUs' batches when the programs were
/// detached.
pub fn unsent_lives(ebpf: &aya::Ebpf) -> Result<Vec<Vec<u8>>> {
    crate::batch::unsent::<SockLifeEvent, { hvprof_common::SOCK_BATCH }>(
        ebpf,
        BATCH_MAP,
        SockLifeEvent::as_bytes,
    )
}

/// The lives still open in the kernel's map (sockets not closed when the
/// recording stopped), as event records.
pub fn open_lives(ebpf: &aya::Ebpf) -> Result<Vec<Vec<u8>>> {
    let map = |name: &str| {
        ebpf.map(name)
            .with_context(|| format!("map {name} missing"))
    };
    let slots: aya::maps::Array<_, SockSlot> = aya::maps::Array::try_from(map(SLOTS_MAP)?)?;
    let socks: aya::maps::HashMap<_, u64, SockSlot> =
        aya::maps::HashMap::try_from(map(SOCKS_MAP)?)?;
    let in_slots = slots
        .iter()
        .filter(|l| l.as_ref().map_or(true, |l| l.skaddr != 0));
    let in_map = socks.iter().map(|e| e.map(|(_, life)| life));
    let mut out = Vec::new();
    for slot in in_slots.chain(in_map) {
        let slot = slot.context("reading open socket lives")?;
        let Some(last) = (slot.steps as usize).checked_sub(1) else {
            continue;
        };
        let mut life = SockLifeEvent::default();
        slot.fill(&mut life);
        // The kernel sets the header's time when a life closes.
        life.header.ts_ns = slot.step_ns[last.min(hvprof_common::SOCK_STEPS - 1)];
        out.push(life.as_bytes().to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The rows are written as this machine's words: these are a
    // little-endian one's.
    #[cfg(target_endian = "little")]
    #[test]
    fn listeners_parse_from_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
";
        let got = parse_listeners(v4, AF_INET);
        assert_eq!(got.len(), 2, "{got:?}");
        let (inode, key) = got[0];
        assert_eq!(inode, 4242);
        assert_eq!((key.family, key.port), (AF_INET, 8080));
        assert_eq!(key.addr[..4], [127, 0, 0, 1]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
        assert_eq!((got[1].0, got[1].1.port, got[1].1.addr), (17, 22, [0; 16]));
        // ::1 port 80; a row cut short is passed over.
        let v6 = "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000000000000100000
";
        // The links that tie the rows to namespaces and processes.
        let link = |l: &str| std::path::PathBuf::from(l);
        assert_eq!(
            link_number(&link("net:[4026531840]"), "net"),
            Some(4026531840)
        );
        assert_eq!(link_number(&link("socket:[4242]"), "socket"), Some(4242));
        assert_eq!(link_number(&link("socket:[4242]"), "net"), None);
        assert_eq!(
            link_number(&link("anon_inode:[eventfd]"), "anon_inode"),
            None
        );
        let got = parse_listeners(v6, AF_INET6);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1.port), (99, 80));
        assert_eq!(
            std::net::Ipv6Addr::from(got[0].1.addr),
            std::net::Ipv6Addr::LOCALHOST
        );
    }

    #[test]
    fn slots_and_hash_entries_add_up_to_max_sockets() {
        for max in [2, 8, 100, 4096, DEFAULT_MAX_SOCKETS, 4_194_304] {
            let (slots, overflow) = map_sizes(max);
            assert_eq!(slots + overflow, max, "{max}");
            assert!(slots >= 1 && overflow >= 1, "{max}: {slots} + {overflow}");
            assert!(slots <= MAX_SLOTS, "{max}: {slots} slots");
        }
        assert_eq!(map_sizes(8), (7, 1));
        assert_eq!(map_sizes(DEFAULT_MAX_SOCKETS), (4096, 61440));
    }
}
