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
    /// Function symbols (`t`/`T`) of the kernel and loaded modules: every
    /// (module name — empty for vmlinux —, address) defining the name.
    pub symbols: HashMap<String, Vec<(String, u64)>>,
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
        self.symbols
            .get(func)
            .and_then(|v| v.first())
            .map(|(m, _)| m.as_str())
    }

    /// Where `func` of `module` (any, when `None`) lives: the kprobe target
    /// to use (`module:func` when the name is defined more than once, as
    /// `e1000_xmit_frame` in e1000 and e1000e) and its address (0 when
    /// addresses are hidden from this user).
    pub fn locate(&self, func: &str, module: Option<&str>) -> Option<(String, u64)> {
        let defs = self.symbols.get(func)?;
        let (m, addr) = match module {
            Some(want) => defs
                .iter()
                .find(|(m, _)| m == want)
                .or_else(|| defs.first())?,
            None => defs.first()?,
        };
        let target = if defs.len() > 1 && !m.is_empty() {
            format!("{m}:{func}")
        } else {
            func.to_string()
        };
        Some((target, *addr))
    }
}

/// Text symbols from `/proc/kallsyms`. Requires root to see addresses but
/// names are listed regardless.
fn kallsyms_functions() -> HashMap<String, Vec<(String, u64)>> {
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
        let defs: &mut Vec<(String, u64)> = out.entry(base.to_string()).or_default();
        if !defs.iter().any(|(m, _)| *m == module) {
            defs.push((module, addr));
        }
    }
    out
}
