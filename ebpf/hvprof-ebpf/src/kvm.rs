//! VM exits under KVM: per vCPU thread, how many exits and how long from
//! each exit to the next entry (the `vmexit` layer), and exits by reason —
//! aggregated in the kernel, nothing per exit crosses to user space.

use aya_ebpf::{
    EbpfContext, Global,
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use hvprof_common::{KvmTpOffsets, VcpuExits};

#[unsafe(no_mangle)]
static HVP_KVM_TP: Global<KvmTpOffsets> = Global::new(KvmTpOffsets {
    exit_reason: 0,
    _pad: 0,
});

/// By vCPU thread id.
#[map(name = "HVP_VCPUS")]
static VCPUS: HashMap<u32, VcpuExits> = HashMap::with_max_entries(1024, 0);

/// Exits by reason.
#[map(name = "HVP_EXIT_REASONS")]
static REASONS: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

#[tracepoint(category = "kvm", name = "kvm_exit")]
pub fn hvp_kvm_exit(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let tid = ctx.pid();
    match VCPUS.get_ptr_mut(tid) {
        // SAFETY: map value pointer.
        Some(v) => unsafe {
            (*v).exits += 1;
            (*v).last_exit_ns = now;
        },
        None => {
            let _ = VCPUS.insert(
                tid,
                VcpuExits {
                    exits: 1,
                    exit_ns: 0,
                    last_exit_ns: now,
                },
                0,
            );
        }
    }
    let off = HVP_KVM_TP.load();
    // SAFETY: offset from this kernel's tracepoint format.
    let reason = unsafe { ctx.read_at::<u32>(off.exit_reason as usize) }.unwrap_or(u32::MAX);
    match REASONS.get_ptr_mut(reason) {
        // SAFETY: map value pointer.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = REASONS.insert(reason, 1, 0);
        }
    }
    0
}

#[tracepoint(category = "kvm", name = "kvm_entry")]
pub fn hvp_kvm_entry(ctx: TracePointContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(v) = VCPUS.get_ptr_mut(ctx.pid()) {
        // SAFETY: map value pointer.
        unsafe {
            if (*v).last_exit_ns != 0 && now > (*v).last_exit_ns {
                (*v).exit_ns += now - (*v).last_exit_ns;
            }
            (*v).last_exit_ns = 0;
        }
    }
    0
}
