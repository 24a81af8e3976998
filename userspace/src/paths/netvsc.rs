//! hv_netvsc: Hyper-V's synthetic NIC (guest side). Not runnable on this
//! kind of machine; checked against module BTF with `probes check`.

use super::{Path, func};
use crate::catalog::Layer::Vnic;

pub const PATH: Path = Path {
    name: "netvsc",
    frames: &[("netvsc_", Vnic), ("rndis_", Vnic), ("vmbus_", Vnic)],
    rows: &[
        func(
            "netvsc:start_xmit",
            Vnic,
            "netvsc",
            "netvsc_start_xmit",
            Some("hv_netvsc"),
            &["skb", "len", "dev"],
        ),
        func(
            "netvsc:poll",
            Vnic,
            "netvsc",
            "netvsc_poll",
            Some("hv_netvsc"),
            &["budget"],
        ),
        func(
            "netvsc:recv_callback",
            Vnic,
            "netvsc",
            "netvsc_recv_callback",
            Some("hv_netvsc"),
            &["len"],
        ),
        func(
            "netvsc:send_pkt",
            Vnic,
            "netvsc",
            "netvsc_send_pkt",
            Some("hv_netvsc"),
            &["len"],
        ),
    ],
};
