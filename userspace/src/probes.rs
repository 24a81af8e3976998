//! `hvprof probes`: the catalog as this kernel sees it — each probe's
//! layer, path, the method it wants, the method it gets here, and why the
//! better ones failed.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::{
    attach::{self, LoadOptions, Probe},
    catalog,
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
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// JSON (a list of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only probes of this path or layer.
    #[arg(long, value_name = "NAME")]
    pub filter: Option<String>,
}

impl ProbesArgs {
    pub fn run(self) -> Result<ExitCode> {
        match self.command {
            ProbesCommand::List(a) => a.run(),
        }
    }
}

impl ListArgs {
    fn run(self) -> Result<ExitCode> {
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
        let mut ebpf = attach::load(&LoadOptions {
            ringbuf_bytes: 4096 * 16,
        })?;
        let probe = Probe::detect(&mut ebpf);
        drop(ebpf);
        let statuses: Vec<_> = probe.resolve(&specs).iter().map(|r| r.status()).collect();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&statuses)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<30} {:<9} {:<9} {:<10} {:<10} REASON",
            "NAME", "LAYER", "PATH", "WANTED", "OBTAINED"
        );
        for s in &statuses {
            println!(
                "{:<30} {:<9} {:<9} {:<10} {:<10} {}",
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
