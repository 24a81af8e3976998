//! Capability probes: tiny programs user space loads to learn whether an
//! attach method works on this kernel (fentry loads can fail with EPERM
//! even where BTF is present). They record nothing.

use aya_ebpf::{macros::fentry, programs::FEntryContext};

/// Loaded against any BTF function to test fentry support; never attached.
#[fentry]
pub fn hvp_fentry_test(_ctx: FEntryContext) -> u32 {
    0
}
