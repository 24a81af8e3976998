//! Netfilter: the hook walk and conntrack.

use super::{Path, func};
use crate::catalog::Layer::Netfilter;

pub const PATH: Path = Path {
    name: "netfilter",
    frames: &[
        ("nf_", Netfilter),
        ("__nf_", Netfilter),
        ("ipt_", Netfilter),
        ("ip6t_", Netfilter),
        ("nft_", Netfilter),
        ("__nft_", Netfilter),
        ("iptable_", Netfilter),
        ("xt_", Netfilter),
        ("ipv4_conntrack", Netfilter),
        ("ipv4_confirm", Netfilter),
        ("nf_conntrack", Netfilter),
        ("hash_conntrack", Netfilter),
        ("____nf_conntrack", Netfilter),
    ],
    rows: &[
        func(
            "netfilter:nf_hook_slow",
            Netfilter,
            "netfilter",
            "nf_hook_slow",
            None,
            &["skb", "hook", "verdict"],
        ),
        func(
            "netfilter:nf_conntrack_in",
            Netfilter,
            "netfilter",
            "nf_conntrack_in",
            Some("nf_conntrack"),
            &["skb"],
        ),
        func(
            "netfilter:ipt_do_table",
            Netfilter,
            "netfilter",
            "ipt_do_table",
            Some("ip_tables"),
            &["skb", "hook"],
        ),
        func(
            "netfilter:nft_do_chain",
            Netfilter,
            "netfilter",
            "nft_do_chain",
            Some("nf_tables"),
            &["skb"],
        ),
    ],
};
