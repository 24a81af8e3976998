//! hvprof's eBPF programs. One module per layer or NIC path (its hooks
//! live together, as its catalog rows and decoder do in user space); the
//! shared maps — the event ring buffer and the per-probe lost counters —
//! live here.
//!
//! Programs are named `hvp_*` so that user space and tests can tell them
//! from anyone else's in `bpftool prog`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Compare-and-exchange (`sock.rs`): the BPF target's atomics have none.
#![cfg_attr(
    target_arch = "bpf",
    allow(internal_features),
    feature(core_intrinsics)
)]

#[cfg(target_arch = "bpf")]
mod batch;
#[cfg(target_arch = "bpf")]
mod dev;
#[cfg(target_arch = "bpf")]
mod features;
#[cfg(target_arch = "bpf")]
mod filter;
#[cfg(target_arch = "bpf")]
mod func;
#[cfg(target_arch = "bpf")]
mod kvm;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sampler;
#[cfg(target_arch = "bpf")]
mod sched;
#[cfg(target_arch = "bpf")]
mod sock;

/// Dual licence string the kernel reads to allow GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// On the host this binary is empty: the crate is only ever built for the
/// BPF target by `userspace/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
