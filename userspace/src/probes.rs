//! `hvprof probes`: the catalog as this kernel sees it — each probe's
//! layer, path, the method it wants, the method it gets here, and why the
//! better ones failed.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{
    attach::{self, LoadOptions, Probe},
    catalog::{self, Hook},
    kernel::btf as kbtf,
};

/// Inspect the probe catalog.
#[derive(Args, Debug)]
pub struct ProbesArgs {
    #[command(subcommand)]
    pub command: ProbesCommand,
}

#[derive(Subcommand, Debug)]
pub enum ProbesCommand {
    /// Every catalog entry with the attach method it gets on this kernel.
    List(ListArgs),
    /// Check catalog functions against another kernel's BTF (e.g. a guest's).
    Check(CheckArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The other kernel: raw BTF, a vmlinux ELF, or a compressed boot image
    /// (/boot/vmlinuz-*).
    #[arg(long, value_name = "FILE")]
    pub btf: PathBuf,
    /// Directory holding that kernel's modules (`*.ko`, searched
    /// recursively), for functions that live in modules.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// JSON (a list of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of `probes check`.
#[derive(Debug, serde::Serialize)]
pub struct CheckRow {
    pub name: &'static str,
    pub layer: &'static str,
    pub path: &'static str,
    pub function: String,
    pub module: Option<&'static str>,
    pub found: bool,
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// JSON (a list of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only probes of this path or layer.
    #[arg(long, value_name = "NAME")]
    pub filter: Option<String>,
    /// Instead of the catalog: each hvprof program loaded right now (by a
    /// running `hvprof record`), its runs and run time over --interval,
    /// from the kernel's BPF statistics (turned on for the interval if
    /// they are off).
    #[arg(long)]
    pub stats: bool,
    /// How long --stats measures.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::record::parse_duration, requires = "stats")]
    pub interval: std::time::Duration,
}

/// Kernel statistics of one loaded hvprof program over an interval.
#[derive(Debug, serde::Serialize)]
pub struct LiveStats {
    pub id: u32,
    /// Catalog probe using the program (kernel names are cut at 15 bytes).
    pub probe: String,
    pub program: String,
    pub interval_s: f64,
    pub run_time_ns: u64,
    pub run_count: u64,
    pub ns_per_run: f64,
    pub runs_per_s: f64,
    /// Its run time as a share of one CPU.
    pub cpu_pct: f64,
}

/// Run time and count of every loaded program whose name says it is
/// hvprof's, by id.
fn snapshot() -> Result<std::collections::BTreeMap<u32, (String, u64, u64)>> {
    let mut out = std::collections::BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| anyhow::anyhow!("listing loaded BPF programs: {e}"))?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if name.starts_with("hvp_") {
            let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            out.insert(info.id(), (name.to_string(), ns, info.run_count()));
        }
    }
    Ok(out)
}

/// hvprof's loaded programs, measured over `interval`.
pub fn live_stats(interval: std::time::Duration) -> Result<Vec<LiveStats>> {
    let _on = crate::attach::enable_stats()?;
    let before = snapshot()?;
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let t0 = std::time::Instant::now();
    std::thread::sleep(interval);
    let after = snapshot()?;
    let secs = t0.elapsed().as_secs_f64();
    let catalog = catalog::all();
    let spec_of = |name: &str| {
        catalog
            .iter()
            .find(|s| s.programs.names().any(|p| p.starts_with(name)))
    };
    // The programs sending the batches serve the first batched probe
    // loaded, in catalog order (as `summary.json` lists them).
    let batched = catalog
        .iter()
        .find(|s| {
            crate::batch::batched(s)
                && after
                    .values()
                    .any(|(name, ..)| spec_of(name).is_some_and(|loaded| loaded.name == s.name))
        })
        .map(|s| s.name);
    let mut out = Vec::new();
    for (id, (name, ns, runs)) in after.iter() {
        // Programs loaded meanwhile count from zero.
        let (ns0, runs0) = before.get(id).map_or((0, 0), |b| (b.1, b.2));
        let (ns, runs) = (ns.saturating_sub(ns0), runs.saturating_sub(runs0));
        let helps = crate::batch::FLUSH_PROGRAMS
            .iter()
            .any(|p| p.starts_with(name.as_str()))
            .then_some(batched)
            .flatten();
        out.push(LiveStats {
            id: *id,
            probe: spec_of(name)
                .map(|s| s.name)
                .or(helps)
                .map_or_else(|| "?".into(), str::to_string),
            program: name.clone(),
            interval_s: secs,
            run_time_ns: ns,
            run_count: runs,
            ns_per_run: if runs > 0 {
                ns as f64 / runs as f64
            } else {
                0.0
            },
            runs_per_s: runs as f64 / secs,
            cpu_pct: 100.0 * ns as f64 / (secs * 1e9),
        });
    }
    Ok(out)
}

impl ProbesArgs {
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            ProbesCommand::List(a) => a.run(),
            ProbesCommand::Check(a) => a.run(),
        }
    }
}

impl ListArgs {
    fn run(self) -> Result<ExitCode> {
        if self.stats {
            let stats = live_stats(self.interval)?;
            if self.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else if stats.is_empty() {
                println!("no hvprof program is loaded; start `hvprof record` first");
            } else {
                println!(
                    "over {:.1}s:\n{:>6} {:<26} {:<16} {:>10} {:>12} {:>8} {:>7}",
                    stats[0].interval_s,
                    "ID",
                    "PROBE",
                    "PROGRAM",
                    "RUNS",
                    "RUNS/S",
                    "NS/RUN",
                    "CPU %"
                );
                for s in &stats {
                    println!(
                        "{:>6} {:<26} {:<16} {:>10} {:>12.0} {:>8.0} {:>7.2}",
                        s.id,
                        s.probe,
                        s.program,
                        s.run_count,
                        s.runs_per_s,
                        s.ns_per_run,
                        s.cpu_pct
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        let specs = match &self.filter {
            Some(f) => {
                let s = catalog::select(f);
                if s.is_empty() {
                    anyhow::bail!(
                        "no probe, path or layer named {f:?}; run `hvprof probes list` for the names"
                    );
                }
                s
            }
            None => catalog::all(),
        };
        let mut loaded = attach::load(&LoadOptions {
            ringbuf_bytes: 4096 * 16,
            max_sockets: 1,
            dev_filter: true,
            tasks: &attach::TaskFilter::default(),
            all_tcp_states: false,
        })?;
        let probe = Probe::detect(&mut loaded.ebpf);
        drop(loaded);
        let statuses: Vec<_> = probe.resolve(&specs).iter().map(|r| r.status()).collect();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&statuses)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<30} {:<9} {:<9} {:<14} {:<14} REASON",
            "NAME", "LAYER", "PATH", "WANTED", "OBTAINED"
        );
        for s in &statuses {
            println!(
                "{:<30} {:<9} {:<9} {:<14} {:<14} {}",
                s.name,
                s.layer,
                s.path,
                s.wanted,
                s.obtained.as_deref().unwrap_or("-"),
                s.reason
            );
        }
        let ok = statuses.iter().filter(|s| s.obtained.is_some()).count();
        println!(
            "\n{ok} of {} probes available on this kernel",
            statuses.len()
        );
        Ok(ExitCode::SUCCESS)
    }
}

impl CheckArgs {
    fn run(self) -> Result<ExitCode> {
        if let Some(dir) = &self.modules
            && !dir.is_dir()
        {
            anyhow::bail!(
                "--modules {} is not a directory; give the kernel's module tree (lib/modules/VERSION)",
                dir.display()
            );
        }
        let base = kbtf::load_any(&self.btf)?;
        let kos = self
            .modules
            .as_deref()
            .map(index_modules)
            .unwrap_or_default();
        let mut module_btf: HashMap<&str, std::result::Result<btf_rs::Btf, String>> =
            HashMap::new();
        let mut rows = Vec::new();
        for spec in catalog::all() {
            let mut in_module = |m: &'static str,
                                 f: &dyn Fn(&btf_rs::Btf) -> bool|
             -> (bool, String) {
                let btf = module_btf
                    .entry(m)
                    .or_insert_with(|| match kos.get(&normalize(m)) {
                        Some(path) => kbtf::load_module(path, &base).map_err(|e| format!("{e:#}")),
                        None if self.modules.is_none() => {
                            Err(format!("not built in; module {m}: give --modules DIR"))
                        }
                        None => Err(format!(
                            "not built in, and module {m} is not in the module directory"
                        )),
                    });
                match btf {
                    Ok(b) => (f(b), String::new()),
                    Err(e) => (false, e.clone()),
                }
            };
            let (function, module, found, mut reason) = match spec.hook {
                Hook::Function { func, module, .. } => {
                    let has = |b: &btf_rs::Btf| kbtf::has_function(b, func);
                    let (found, reason) = match (has(&base), module) {
                        (true, _) => (true, String::new()),
                        (false, Some(m)) => in_module(m, &has),
                        (false, None) => (false, String::new()),
                    };
                    (func.to_string(), module, found, reason)
                }
                Hook::Tracepoint {
                    category,
                    name,
                    module,
                } => {
                    let typedef = format!("btf_trace_{name}");
                    let has = |b: &btf_rs::Btf| {
                        b.resolve_ids_by_name(&typedef).is_ok_and(|v| !v.is_empty())
                    };
                    let (found, reason) = match (has(&base), module) {
                        (true, _) => (true, String::new()),
                        (false, Some(m)) => in_module(m, &has),
                        (false, None) => (false, String::new()),
                    };
                    (format!("{category}:{name}"), module, found, reason)
                }
                Hook::PerfEvent => ("perf_event:cpu-clock".into(), None, true, String::new()),
            };
            if !found && reason.is_empty() {
                reason = format!("{function} is not in this kernel's BTF");
            }
            rows.push(CheckRow {
                name: spec.name,
                layer: spec.layer.name(),
                path: spec.path,
                function,
                module,
                found,
                reason,
            });
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<30} {:<10} {:<32} {:<6} REASON",
            "NAME", "PATH", "FUNCTION", "FOUND"
        );
        for r in &rows {
            println!(
                "{:<30} {:<10} {:<32} {:<6} {}",
                r.name,
                r.path,
                r.function,
                if r.found { "yes" } else { "no" },
                r.reason
            );
        }
        let found = rows.iter().filter(|r| r.found).count();
        println!(
            "\n{found} of {} catalog entries found in {}",
            rows.len(),
            self.btf.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Module names use `_` where file names may use `-`.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `module name -> path` of every `.ko` below `dir`.
fn index_modules(dir: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(normalize(stem), p);
            }
        }
    }
    out
}
