//! RTL8139: QEMU's `rtl8139` model, driven by 8139cp (C+ mode) or 8139too.

use super::{Path, func};
use crate::catalog::Layer::{Irq, Vnic};

pub const PATH: Path = Path {
    name: "rtl8139",
    frames: &[("cp_", Vnic), ("rtl8139_", Vnic)],
    rows: &[
        func(
            "rtl8139:cp_start_xmit",
            Vnic,
            "rtl8139",
            "cp_start_xmit",
            Some("8139cp"),
            &["skb", "len", "dev"],
        ),
        func(
            "rtl8139:cp_rx_poll",
            Vnic,
            "rtl8139",
            "cp_rx_poll",
            Some("8139cp"),
            &["budget"],
        ),
        func(
            "rtl8139:cp_interrupt",
            Irq,
            "rtl8139",
            "cp_interrupt",
            Some("8139cp"),
            &["irq"],
        ),
        func(
            "rtl8139:rtl8139_start_xmit",
            Vnic,
            "rtl8139",
            "rtl8139_start_xmit",
            Some("8139too"),
            &["skb", "len", "dev"],
        ),
        func(
            "rtl8139:rtl8139_poll",
            Vnic,
            "rtl8139",
            "rtl8139_poll",
            Some("8139too"),
            &["budget"],
        ),
    ],
};
