//! The probe catalog: every probe point hvprof knows, as data — its layer,
//! NIC path, hook (function or tracepoint), the fields it extracts and the
//! eBPF program behind each attach method. Rows live with their path in
//! `crate::paths`; this module owns the vocabulary and the lookup.

use serde::Serialize;

use crate::paths;

/// Where a cost is charged (canonical names, see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Proxy,
    Socket,
    Netfilter,
    Switch,
    Vnic,
    Irq,
    Vmexit,
    Backend,
    Sched,
    Loadgen,
    Other,
}

impl Layer {
    pub const ALL: [Layer; 11] = [
        Layer::Proxy,
        Layer::Socket,
        Layer::Netfilter,
        Layer::Switch,
        Layer::Vnic,
        Layer::Irq,
        Layer::Vmexit,
        Layer::Backend,
        Layer::Sched,
        Layer::Loadgen,
        Layer::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layer::Proxy => "proxy",
            Layer::Socket => "socket",
            Layer::Netfilter => "netfilter",
            Layer::Switch => "switch",
            Layer::Vnic => "vnic",
            Layer::Irq => "irq",
            Layer::Vmexit => "vmexit",
            Layer::Backend => "backend",
            Layer::Sched => "sched",
            Layer::Loadgen => "loadgen",
            Layer::Other => "other",
        }
    }
}

/// How a probe is attached, best first (DESIGN.md: fentry/fexit → kprobe →
/// tracepoint → stack sampling only; a raw tracepoint — the tracepoint's
/// arguments, no record filled — before the classic one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Fentry,
    Kprobe,
    RawTracepoint,
    Tracepoint,
    Sampling,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Fentry => "fentry",
            Method::Kprobe => "kprobe",
            Method::RawTracepoint => "raw_tracepoint",
            Method::Tracepoint => "tracepoint",
            Method::Sampling => "sampling",
        }
    }
}

/// What a probe hooks.
#[derive(Debug, Clone, Copy)]
pub enum Hook {
    /// A kernel function, in vmlinux (`module: None`) or a module. An
    /// optional tracepoint carries the same event when function probes are
    /// unavailable.
    Function {
        func: &'static str,
        module: Option<&'static str>,
        tracepoint: Option<(&'static str, &'static str)>,
    },
    /// A tracepoint `category:name`, and others carrying the same event
    /// that the same program also attaches to.
    Tracepoint {
        category: &'static str,
        name: &'static str,
        /// Module defining it where it is not built in (e.g. `kvm`).
        module: Option<&'static str>,
    },
    /// Software CPU-clock sampling on every CPU.
    PerfEvent,
}

/// The eBPF programs (by name in the object) that implement a probe, per
/// method. `None`: hvprof has no program for that method yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Programs {
    pub fentry: Option<&'static str>,
    pub kprobe: Option<&'static str>,
    pub raw_tracepoint: Option<&'static str>,
    pub tracepoint: Option<&'static str>,
    pub perf_event: Option<&'static str>,
}

impl Programs {
    /// Every program named, whatever its method.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        [
            self.fentry,
            self.kprobe,
            self.raw_tracepoint,
            self.tracepoint,
            self.perf_event,
        ]
        .into_iter()
        .flatten()
    }
}

/// One catalog row.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    /// `path:point`, unique; what `--probe` takes.
    pub name: &'static str,
    pub layer: Layer,
    /// NIC path or subsystem (`virtio`, `vmxnet3`, `tcp`, `bridge`, ...).
    pub path: &'static str,
    pub hook: Hook,
    /// Fields each event of this probe carries.
    pub fields: &'static [&'static str],
    pub programs: Programs,
    /// Counter index (`hvprof_common::probe`) for probes with a program.
    pub id: Option<u16>,
}

impl ProbeSpec {
    /// The best method this row can use at all.
    pub fn wanted(&self) -> Method {
        match self.hook {
            Hook::Function { .. } => Method::Fentry,
            Hook::Tracepoint { .. } if self.programs.raw_tracepoint.is_some() => {
                Method::RawTracepoint
            }
            Hook::Tracepoint { .. } => Method::Tracepoint,
            Hook::PerfEvent => Method::Sampling,
        }
    }

    /// The hooked point as text: `func [module]` or `category:name`.
    pub fn point(&self) -> String {
        match self.hook {
            Hook::Function {
                func,
                module: Some(m),
                ..
            } => format!("{func} [{m}]"),
            Hook::Function {
                func, module: None, ..
            } => func.to_string(),
            Hook::Tracepoint { category, name, .. } => format!("{category}:{name}"),
            Hook::PerfEvent => "perf_event:cpu-clock".into(),
        }
    }
}

/// Every catalog row, path by path.
pub fn all() -> Vec<&'static ProbeSpec> {
    paths::ALL.iter().flat_map(|p| p.rows.iter()).collect()
}

/// Looks up `name`: a probe name (`tcp:inet_sock_set_state`), a path
/// (`virtio`, `netback`), a path module (`xen`: netfront and netback) or a
/// layer (`socket`).
pub fn select(name: &str) -> Vec<&'static ProbeSpec> {
    paths::ALL
        .iter()
        .flat_map(|p| p.rows.iter().map(move |s| (p.name, s)))
        .filter(|(module, s)| {
            s.name == name || s.path == name || *module == name || s.layer.name() == name
        })
        .map(|(_, s)| s)
        .collect()
}
