//! Layers and NIC paths, one module each: its catalog rows, its event
//! decoder and its program set-up live together, so adding a path is adding
//! one module here (and its hooks in `ebpf/hvprof-ebpf`).

use crate::catalog::ProbeSpec;

pub mod bridge;
pub mod cpu;
pub mod dev;
pub mod e1000;
pub mod netfilter;
pub mod netvsc;
pub mod rtl8139;
pub mod sched;
pub mod tap;
pub mod tcp;
pub mod virtio;
pub mod vmexit;
pub mod vmxnet3;
pub mod xen;

/// A path: its name, catalog rows, and the kernel-function name prefixes
/// whose stack frames are charged to a layer (innermost match wins).
pub struct Path {
    pub name: &'static str,
    pub frames: &'static [(&'static str, crate::catalog::Layer)],
    pub rows: &'static [ProbeSpec],
}

/// Every path, in the order `probes list` shows them.
pub const ALL: &[Path] = &[
    tcp::PATH,
    cpu::PATH,
    dev::PATH,
    netfilter::PATH,
    bridge::PATH,
    tap::PATH,
    virtio::PATH,
    vmxnet3::PATH,
    e1000::PATH,
    rtl8139::PATH,
    netvsc::PATH,
    xen::PATH,
    vmexit::PATH,
    sched::PATH,
];

/// Shorthand for a catalog row on a kernel function: probed with the
/// generic function-entry kprobe where kprobes exist, else seen only in
/// CPU samples.
pub(crate) const fn func(
    name: &'static str,
    layer: crate::catalog::Layer,
    path: &'static str,
    func: &'static str,
    module: Option<&'static str>,
    fields: &'static [&'static str],
) -> ProbeSpec {
    ProbeSpec {
        name,
        layer,
        path,
        hook: crate::catalog::Hook::Function {
            func,
            module,
            tracepoint: None,
        },
        fields,
        programs: crate::catalog::Programs {
            fentry: None,
            kprobe: Some(FUNC_PROGRAM),
            raw_tracepoint: None,
            tracepoint: None,
            perf_event: None,
        },
        id: None,
    }
}

/// `spec` with its tracepoint program and counter id: a row hvprof
/// records.
pub(crate) const fn traced(spec: ProbeSpec, program: &'static str, id: u16) -> ProbeSpec {
    ProbeSpec {
        programs: crate::catalog::Programs {
            tracepoint: Some(program),
            ..spec.programs
        },
        id: Some(id),
        ..spec
    }
}

/// `spec` with a raw-tracepoint program too (preferred where this kernel's
/// BTF gives the offsets it reads).
pub(crate) const fn raw(spec: ProbeSpec, program: &'static str) -> ProbeSpec {
    ProbeSpec {
        programs: crate::catalog::Programs {
            raw_tracepoint: Some(program),
            ..spec.programs
        },
        ..spec
    }
}

/// The one kprobe program behind every function row.
pub const FUNC_PROGRAM: &str = "hvp_fn_entry";

/// Shorthand for a tracepoint row with no hvprof program yet.
pub(crate) const fn tp(
    name: &'static str,
    layer: crate::catalog::Layer,
    path: &'static str,
    category: &'static str,
    tp_name: &'static str,
    fields: &'static [&'static str],
) -> ProbeSpec {
    tp_in(name, layer, path, category, tp_name, None, fields)
}

/// A tracepoint row whose tracepoint is defined by `module` when not built
/// in.
pub(crate) const fn tp_in(
    name: &'static str,
    layer: crate::catalog::Layer,
    path: &'static str,
    category: &'static str,
    tp_name: &'static str,
    module: Option<&'static str>,
    fields: &'static [&'static str],
) -> ProbeSpec {
    ProbeSpec {
        name,
        layer,
        path,
        hook: crate::catalog::Hook::Tracepoint {
            category,
            name: tp_name,
            module,
        },
        fields,
        programs: crate::catalog::Programs {
            fentry: None,
            kprobe: None,
            raw_tracepoint: None,
            tracepoint: None,
            perf_event: None,
        },
        id: None,
    }
}
