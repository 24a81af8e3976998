//! VM exits and emulation: KVM's exit/entry tracepoints (per vCPU thread:
//! exits and time exited, aggregated in the kernel; exits by reason), the
//! kernel frames of exit handling, and the snapshot user space reads.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use hvprof_common::{KvmTpOffsets, VcpuExits, probe};
use serde::{Deserialize, Serialize};

use super::{Path, tp_in, traced};
use crate::{catalog::Layer::Vmexit, kernel::tracefs};

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
        traced(
            tp_in(
                "kvm:kvm_exit",
                Vmexit,
                "kvm",
                "kvm",
                "kvm_exit",
                Some("kvm"),
                &["exit_reason", "vcpu_id"],
            ),
            "hvp_kvm_exit",
            probe::KVM_EXIT,
        ),
        traced(
            tp_in(
                "kvm:kvm_entry",
                Vmexit,
                "kvm",
                "kvm",
                "kvm_entry",
                Some("kvm"),
                &["vcpu_id"],
            ),
            "hvp_kvm_entry",
            probe::KVM_ENTRY,
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

pub const TP_GLOBAL: &str = "HVP_KVM_TP";

/// `exit_reason`'s offset, when the kvm tracepoints exist here.
pub fn tp_offsets() -> KvmTpOffsets {
    tracefs::format("kvm", "kvm_exit")
        .and_then(|f| tracefs::offset_of(&f, "exit_reason", 4))
        .map(|exit_reason| KvmTpOffsets {
            exit_reason,
            _pad: 0,
        })
        .unwrap_or_default()
}

/// `kvm.json`: exits per vCPU thread and by reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KvmSnapshot {
    /// vCPU thread id → (exits, ns exited).
    pub vcpus: BTreeMap<u32, (u64, u64)>,
    /// Exit reason (architecture code) → exits.
    pub reasons: BTreeMap<u32, u64>,
}

impl KvmSnapshot {
    pub fn exit_ns(&self) -> u64 {
        self.vcpus.values().map(|(_, ns)| ns).sum()
    }
}

pub fn snapshot(ebpf: &Ebpf) -> Result<KvmSnapshot> {
    let map = |n: &str| ebpf.map(n).ok_or_else(|| anyhow!("map {n} missing"));
    let vcpus: HashMap<&MapData, u32, VcpuExits> = HashMap::try_from(map("HVP_VCPUS")?)?;
    let reasons: HashMap<&MapData, u32, u64> = HashMap::try_from(map("HVP_EXIT_REASONS")?)?;
    Ok(KvmSnapshot {
        vcpus: vcpus
            .iter()
            .flatten()
            .map(|(t, v)| (t, (v.exits, v.exit_ns)))
            .collect(),
        reasons: reasons.iter().flatten().collect(),
    })
}
