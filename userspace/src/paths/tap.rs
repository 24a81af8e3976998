//! tap/tun and vhost: the host side of a virtual NIC (backend layer).

use super::{Path, func};
use crate::catalog::Layer::Backend;

pub const PATH: Path = Path {
    name: "tap",
    frames: &[
        ("tun_", Backend),
        ("__tun_", Backend),
        ("tap_", Backend),
        ("vhost_", Backend),
        ("handle_tx", Backend),
        ("handle_rx", Backend),
    ],
    rows: &[
        func(
            "tap:tun_net_xmit",
            Backend,
            "tap",
            "tun_net_xmit",
            Some("tun"),
            &["skb", "len", "dev"],
        ),
        func(
            "tap:tun_get_user",
            Backend,
            "tap",
            "tun_get_user",
            Some("tun"),
            &["len"],
        ),
        func(
            "tap:tun_do_read",
            Backend,
            "tap",
            "tun_do_read",
            Some("tun"),
            &["len"],
        ),
        func(
            "vhost:handle_tx",
            Backend,
            "vhost",
            "handle_tx",
            Some("vhost_net"),
            &[],
        ),
        func(
            "vhost:handle_rx",
            Backend,
            "vhost",
            "handle_rx",
            Some("vhost_net"),
            &[],
        ),
    ],
};
