//! Switching: Linux bridge, veth, macvlan and Open vSwitch.

use super::{Path, func};
use crate::catalog::Layer::{Backend, Switch};

const SKB: &[&str] = &["skb", "len", "dev"];

pub const PATH: Path = Path {
    name: "bridge",
    frames: &[
        ("br_", Switch),
        ("__br_", Switch),
        ("veth_", Switch),
        ("macvlan_", Switch),
        ("ovs_", Switch),
        ("__ovs_", Switch),
        ("nbp_", Switch),
    ],
    rows: &[
        func(
            "bridge:br_handle_frame",
            Switch,
            "bridge",
            "br_handle_frame",
            Some("bridge"),
            SKB,
        ),
        func(
            "bridge:br_forward",
            Switch,
            "bridge",
            "br_forward",
            Some("bridge"),
            SKB,
        ),
        func(
            "bridge:br_dev_xmit",
            Switch,
            "bridge",
            "br_dev_xmit",
            Some("bridge"),
            SKB,
        ),
        func(
            "veth:veth_xmit",
            Switch,
            "veth",
            "veth_xmit",
            Some("veth"),
            SKB,
        ),
        func(
            "ovs:ovs_vport_receive",
            Switch,
            "ovs",
            "ovs_vport_receive",
            Some("openvswitch"),
            SKB,
        ),
        func(
            "ovs:ovs_dp_process_packet",
            Switch,
            "ovs",
            "ovs_dp_process_packet",
            Some("openvswitch"),
            SKB,
        ),
        func(
            "ovs:ovs_dp_upcall",
            Backend,
            "ovs",
            "ovs_dp_upcall",
            Some("openvswitch"),
            SKB,
        ),
    ],
};
