//! vmxnet3: VMware's paravirtual NIC (guest side; QEMU emulates it too).

use super::{Path, func};
use crate::catalog::Layer::{Irq, Vnic};

pub const PATH: Path = Path {
    name: "vmxnet3",
    frames: &[("vmxnet3_", Vnic)],
    rows: &[
        func(
            "vmxnet3:xmit_frame",
            Vnic,
            "vmxnet3",
            "vmxnet3_xmit_frame",
            Some("vmxnet3"),
            &["skb", "len", "dev"],
        ),
        func(
            "vmxnet3:poll_rx_only",
            Vnic,
            "vmxnet3",
            "vmxnet3_poll_rx_only",
            Some("vmxnet3"),
            &["budget"],
        ),
        func(
            "vmxnet3:rq_rx_complete",
            Vnic,
            "vmxnet3",
            "vmxnet3_rq_rx_complete",
            Some("vmxnet3"),
            &["budget"],
        ),
        func(
            "vmxnet3:intr",
            Irq,
            "vmxnet3",
            "vmxnet3_intr",
            Some("vmxnet3"),
            &["irq"],
        ),
    ],
};
