//! Xen: netfront in the guest (vnic) and netback in dom0 (backend).

use super::{Path, func};
use crate::catalog::Layer::{Backend, Vnic};

pub const PATH: Path = Path {
    name: "xen",
    frames: &[
        ("xennet_", Vnic),
        ("xenvif_", Backend),
        ("xen_netbk", Backend),
    ],
    rows: &[
        func(
            "netfront:start_xmit",
            Vnic,
            "netfront",
            "xennet_start_xmit",
            Some("xen_netfront"),
            &["skb", "len", "dev"],
        ),
        func(
            "netfront:poll",
            Vnic,
            "netfront",
            "xennet_poll",
            Some("xen_netfront"),
            &["budget"],
        ),
        func(
            "netback:start_xmit",
            Backend,
            "netback",
            "xenvif_start_xmit",
            Some("xen_netback"),
            &["skb", "len", "dev"],
        ),
        func(
            "netback:poll",
            Backend,
            "netback",
            "xenvif_poll",
            Some("xen_netback"),
            &["budget"],
        ),
        func(
            "netback:tx_action",
            Backend,
            "netback",
            "xenvif_tx_action",
            Some("xen_netback"),
            &["budget"],
        ),
        func(
            "netback:kthread_guest_rx",
            Backend,
            "netback",
            "xenvif_kthread_guest_rx",
            Some("xen_netback"),
            &[],
        ),
    ],
};
