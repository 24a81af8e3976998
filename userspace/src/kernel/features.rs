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

/// Function symbols of the kernel and its modules by name (the base name:
/// local symbols may carry a `.cold`/`.isra` suffix).
fn kallsyms_functions() -> HashMap<String, Vec<(String, u64)>> {
    let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::with_capacity(200_000);
    for sym in super::kallsyms::text_symbols() {
        if !matches!(sym.kind, 't' | 'T') {
            continue;
        }
        let base = sym.name.split('.').next().unwrap_or(&sym.name);
        let defs = out.entry(base.to_string()).or_default();
        if !defs.iter().any(|(m, _)| **m == *sym.module) {
            defs.push((sym.module.to_string(), sym.addr));
        }
    }
    out
}
