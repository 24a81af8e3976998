//! e1000 and e1000e: fully emulated Intel NICs (guest side).

use super::{Path, func};
use crate::catalog::Layer::{Irq, Vnic};

const SKB: &[&str] = &["skb", "len", "dev"];

pub const PATH: Path = Path {
    name: "e1000",
    frames: &[("e1000_", Vnic), ("e1000e_", Vnic), ("__e1000", Vnic)],
    rows: &[
        func(
            "e1000:xmit_frame",
            Vnic,
            "e1000",
            "e1000_xmit_frame",
            Some("e1000"),
            SKB,
        ),
        func(
            "e1000:clean",
            Vnic,
            "e1000",
            "e1000_clean",
            Some("e1000"),
            &["budget"],
        ),
        func(
            "e1000:clean_rx_irq",
            Vnic,
            "e1000",
            "e1000_clean_rx_irq",
            Some("e1000"),
            &["work_done"],
        ),
        func(
            "e1000:intr",
            Irq,
            "e1000",
            "e1000_intr",
            Some("e1000"),
            &["irq"],
        ),
        func(
            "e1000e:xmit_frame",
            Vnic,
            "e1000e",
            "e1000_xmit_frame",
            Some("e1000e"),
            SKB,
        ),
        func(
            "e1000e:poll",
            Vnic,
            "e1000e",
            "e1000e_poll",
            Some("e1000e"),
            &["budget"],
        ),
        func(
            "e1000e:clean_rx_irq",
            Vnic,
            "e1000e",
            "e1000_clean_rx_irq",
            Some("e1000e"),
            &["work_done"],
        ),
        func(
            "e1000e:intr_msi",
            Irq,
            "e1000e",
            "e1000_intr_msi",
            Some("e1000e"),
            &["irq"],
        ),
    ],
};
