//! `hvprof profile`: the main job. Benchmarks the proxy natively and on
//! the virtual paths this machine can run, records every point (host
//! probes, guest agents), and writes the report that explains each
//! topology's loss layer by layer.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::Args;

use crate::{
    bench::{BenchArgs, Sizes},
    report::ReportArgs,
    topology::TopologyArgs,
};

/// Topologies profiled when none is named: one of each kind that runs
/// here (netfilter on a bridge, a paravirtual and an emulated NIC).
const DEFAULT_TOPOLOGIES: &[&str] = &["native", "bridge-nf", "vm-virtio", "vm-e1000"];

/// Benchmark native vs virtual paths with probes, then explain the loss.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  hvprof profile                       # native, bridge-nf, vm-virtio, vm-e1000 at 0, 4k, 64k\n  hvprof profile --sizes all -d 5s     # the seed's full sweep\n  hvprof profile --topology native --topology vm-vmxnet3"
)]
pub struct ProfileArgs {
    /// Topologies (repeatable); default: native, bridge-nf, vm-virtio and
    /// vm-e1000, those available here.
    #[arg(long = "topology", value_name = "NAME")]
    pub topologies: Vec<String>,
    /// Object sizes: a list (0,4k,64k) or `all` (0 to 64K as in the seed).
    #[arg(long, value_name = "LIST", default_value = "0,4k,64k", value_parser = crate::bench::parse_sizes)]
    pub sizes: Sizes,
    /// Load duration per size.
    #[arg(short, long, value_name = "DUR", default_value = "3s", value_parser = loadgen::cli::parse_duration)]
    pub duration: Duration,
    /// Connections in flight.
    #[arg(short, long, value_name = "CONC", default_value = "16", value_parser = loadgen::cli::parse_concurrency)]
    pub concurrency: usize,
    /// iptables rules (plus conntrack) on `bridge-nf` [default: 500].
    #[arg(long, value_name = "N")]
    pub nf_rules: Option<u32>,
    /// CPU sampling frequency per CPU, in Hz.
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = 499, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub freq: u64,
    /// Output directory (benchmark, recordings, report/).
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
}

impl ProfileArgs {
    pub fn run(self) -> Result<ExitCode> {
        let topologies = if self.topologies.is_empty() {
            let mut ok = Vec::new();
            for name in DEFAULT_TOPOLOGIES {
                let args = TopologyArgs {
                    topologies: vec![(*name).into()],
                    ..TopologyArgs::default()
                };
                match args.specs() {
                    Ok(_) => ok.push((*name).to_string()),
                    Err(e) => eprintln!("hvprof profile: skipping {name}: {e}"),
                }
            }
            ok
        } else {
            self.topologies.clone()
        };
        let output = self.output.clone().unwrap_or_else(|| {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from(format!("runs/profile-{stamp}"))
        });
        let nf_rules = self
            .nf_rules
            .filter(|_| topologies.iter().any(|t| t == "bridge-nf"));
        let bench = BenchArgs {
            topo: TopologyArgs {
                topologies,
                nf_rules,
                ..TopologyArgs::default()
            },
            sizes: self.sizes.clone(),
            duration: self.duration,
            concurrency: self.concurrency,
            output: output.clone(),
            client_threads: 1,
            haproxy_threads: 1,
            origin_threads: 1,
            record: true,
            freq: self.freq,
            serve: false,
            label: None,
        };
        let bench_exit = bench.run()?;
        let report = output.join("report");
        ReportArgs {
            runs: vec![output.clone()],
            output: report.clone(),
        }
        .run()?;
        println!(
            "\nprofile: {}  (open {} in a browser)",
            output.display(),
            report.join("index.html").display()
        );
        Ok(bench_exit)
    }
}
