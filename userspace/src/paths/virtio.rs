//! virtio_net: the paravirtual NIC of KVM/QEMU guests (guest side).

use super::{Path, func};
use crate::catalog::Layer::{Irq, Vnic};

const SKB: &[&str] = &["skb", "len", "dev"];

pub const PATH: Path = Path {
    name: "virtio",
    frames: &[
        ("virtnet_", Vnic),
        ("virtqueue_", Vnic),
        ("vring_", Vnic),
        ("virtio_", Vnic),
        ("start_xmit", Vnic),
        ("receive_buf", Vnic),
        ("skb_recv_done", Vnic),
        ("free_old_xmit", Vnic),
        ("xmit_skb", Vnic),
    ],
    rows: &[
        func(
            "virtio:start_xmit",
            Vnic,
            "virtio",
            "start_xmit",
            Some("virtio_net"),
            SKB,
        ),
        func(
            "virtio:virtnet_poll",
            Vnic,
            "virtio",
            "virtnet_poll",
            Some("virtio_net"),
            &["budget", "work_done"],
        ),
        func(
            "virtio:skb_recv_done",
            Irq,
            "virtio",
            "skb_recv_done",
            Some("virtio_net"),
            &["vq"],
        ),
        func(
            "virtio:receive_buf",
            Vnic,
            "virtio",
            "receive_buf",
            Some("virtio_net"),
            &["len"],
        ),
        func(
            "virtio:virtqueue_add_outbuf",
            Vnic,
            "virtio",
            "virtqueue_add_outbuf",
            Some("virtio_ring"),
            &["vq"],
        ),
        func(
            "virtio:virtqueue_kick_prepare",
            Vnic,
            "virtio",
            "virtqueue_kick_prepare",
            Some("virtio_ring"),
            &["vq"],
        ),
        func(
            "virtio:virtqueue_notify",
            Vnic,
            "virtio",
            "virtqueue_notify",
            Some("virtio_ring"),
            &["vq"],
        ),
    ],
};
