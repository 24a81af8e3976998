//! Which attach methods this kernel offers, detected at run time: the kprobe
//! PMU, perf-event sampling, tracepoints, and the symbols that exist (from
//! `/proc/kallsyms`, modules included). fentry support is tested by really
//! loading a program, in `attach`.

use std::{collections::HashMap, path::Path};

/// Facts about the running kernel that decide attach methods.
#[derive(Debug)]
pub struct Features {
    /// `Err(reason)` when the kernel has no kprobe PMU.
    pub kprobe: Result<(), String>,
    /// `Err(reason)` when software perf events can't be sampled.
    pub sampling: Result<(), String>,
    /// Function symbols (`t`/`T`) of the kernel and loaded modules: the
    /// module name (empty for vmlinux) and address.
    pub symbols: HashMap<String, (String, u64)>,
}

impl Features {
    pub fn detect() -> Self {
        let kprobe = if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
            Ok(())
        } else {
            Err("the kernel has no kprobe PMU (CONFIG_KPROBES off)".to_string())
        };
        let sampling = if Path::new("/sys/bus/event_source/devices/software/type").exists() {
            Ok(())
        } else {
            Err("no software perf-event PMU".to_string())
        };
        Self {
            kprobe,
            sampling,
            symbols: kallsyms_functions(),
        }
    }

    /// Where `func` lives (`Some("")` for vmlinux, `Some(module)`), or `None`.
    pub fn symbol(&self, func: &str) -> Option<&str> {
        self.symbols.get(func).map(|(m, _)| m.as_str())
    }

    /// Address of `func` (0 when addresses are hidden from this user).
    pub fn address(&self, func: &str) -> Option<u64> {
        self.symbols.get(func).map(|(_, a)| *a)
    }
}

/// Text symbols from `/proc/kallsyms`. Requires root to see addresses but
/// names are listed regardless.
fn kallsyms_functions() -> HashMap<String, (String, u64)> {
    let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
        return HashMap::new();
    };
    let mut out = HashMap::with_capacity(200_000);
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let module = it
            .next()
            .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_string())
            .unwrap_or_default();
        // Local symbols may carry a `.cold`/`.isra` suffix; keep the base too.
        let base = name.split('.').next().unwrap_or(name);
        let addr = u64::from_str_radix(addr, 16).unwrap_or(0);
        out.entry(base.to_string()).or_insert((module, addr));
    }
    out
}
