//! Kernel function entries: one kprobe program attached to every catalog
//! function this kernel lets hvprof probe (NIC drivers, bridge, netfilter,
//! tun…). The event carries the function's address; user space maps it
//! back to the catalog row.

use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_func_ip, macros::kprobe, programs::ProbeContext,
};
use hvprof_common::{FuncEvent, kind, probe};

use crate::filter::task_wanted;
use crate::maps::{EVENTS, count_lost, header_into, submit_flags};

#[kprobe]
pub fn hvp_fn_entry(ctx: ProbeContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    if !task_wanted() {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<FuncEvent>(0) else {
        count_lost(probe::FUNC);
        return 0;
    };
    // SAFETY: the reserved record, every field of which is written here.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    let ts = header_into(&mut ev.header, kind::FUNC, probe::FUNC);
    // SAFETY: kprobe context.
    ev.ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    ev.arg0 = ctx.arg::<u64>(0).unwrap_or(0);
    entry.submit(submit_flags(ts));
    0
}
