//! VM exits and emulation: KVM's exit/entry tracepoints.

use super::Path;
use super::tp_in;
use crate::catalog::Layer::Vmexit;

pub const PATH: Path = Path {
    name: "kvm",
    frames: &[
        ("kvm_", Vmexit),
        ("vmx_", Vmexit),
        ("svm_", Vmexit),
        ("vcpu_", Vmexit),
        ("handle_exit", Vmexit),
        ("__vmx", Vmexit),
        ("vmx_vmexit", Vmexit),
    ],
    rows: &[
        tp_in(
            "kvm:kvm_exit",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_exit",
            Some("kvm"),
            &["exit_reason", "vcpu_id"],
        ),
        tp_in(
            "kvm:kvm_entry",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_entry",
            Some("kvm"),
            &["vcpu_id"],
        ),
        tp_in(
            "kvm:kvm_mmio",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_mmio",
            Some("kvm"),
            &["type", "len", "gpa"],
        ),
        tp_in(
            "kvm:kvm_pio",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_pio",
            Some("kvm"),
            &["rw", "port", "size"],
        ),
    ],
};
