//! VM exits and emulation: KVM's exit/entry tracepoints.

use super::Path;
use super::tp;
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
        tp(
            "kvm:kvm_exit",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_exit",
            &["exit_reason", "vcpu_id"],
        ),
        tp(
            "kvm:kvm_entry",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_entry",
            &["vcpu_id"],
        ),
        tp(
            "kvm:kvm_mmio",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_mmio",
            &["type", "len", "gpa"],
        ),
        tp(
            "kvm:kvm_pio",
            Vmexit,
            "kvm",
            "kvm",
            "kvm_pio",
            &["rw", "port", "size"],
        ),
    ],
};
