//! CPU sampling: a perf-event program on every CPU's CPU clock that
//! records who runs and both stacks. Frames of functions no probe can
//! reach here (no kprobe, no fentry) are still attributed from these.

use aya_ebpf::{
    EbpfContext, bindings::BPF_F_USER_STACK, helpers::generated::bpf_get_stack, macros::perf_event,
    programs::PerfEventContext,
};
use hvprof_common::{MAX_FRAMES, SampleEvent, kind, probe};

use crate::filter::task_wanted;
use crate::maps::{EVENTS, count_lost, header_into, submit_flags};

#[perf_event]
pub fn hvp_cpu_sample(ctx: PerfEventContext) -> u32 {
    if crate::maps::hooks_only() {
        return 0;
    }
    // The idle task is sampled too: softirq work (bridge, netfilter, the
    // stack's receive path) often runs on top of it. User space drops the
    // samples of the idle loop itself.
    if !task_wanted() {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<SampleEvent>(0) else {
        count_lost(probe::CPU_SAMPLE);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    const BYTES: u32 = (MAX_FRAMES * 8) as u32;
    // SAFETY: `ev` points at reserved ring-buffer memory of the right size;
    // bpf_get_stack writes at most BYTES into each array.
    let ts = unsafe {
        let ts = header_into(&mut (*ev).header, kind::CPU_SAMPLE, probe::CPU_SAMPLE);
        let k = bpf_get_stack(ctx.as_ptr(), (*ev).kstack.as_mut_ptr().cast(), BYTES, 0);
        (*ev).kstack_bytes = k as i32;
        let u = bpf_get_stack(
            ctx.as_ptr(),
            (*ev).ustack.as_mut_ptr().cast(),
            BYTES,
            u64::from(BPF_F_USER_STACK),
        );
        (*ev).ustack_bytes = u as i32;
        ts
    };
    entry.submit(submit_flags(ts));
    0
}
