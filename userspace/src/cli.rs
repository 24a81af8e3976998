//! The command line: one subcommand per user task, each handing its
//! arguments to the module that owns the work.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// eBPF network profiler for virtualized network paths: explains, layer by
/// layer, where a proxy's throughput goes when it moves into a VM.
#[derive(Parser, Debug)]
#[command(name = "hvprof", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The main job: benchmark native vs virtual paths with probes, then
    /// explain each topology's loss layer by layer.
    Profile(crate::profile::ProfileArgs),
    /// Record probes on a live system into a run directory.
    Record(crate::record::RecordArgs),
    /// Print a run's events (or connections) as JSON lines.
    Dump(crate::dump::DumpArgs),
    /// In a guest: record and stream to the host's collector.
    Agent(crate::agent::AgentArgs),
    /// Flamegraphs and per-layer breakdowns from run directories.
    Report(crate::report::ReportArgs),
    /// The probe catalog and what this kernel offers for it.
    Probes(crate::probes::ProbesArgs),
    /// httpterm-style origin server: GET /?s=SIZE returns SIZE bytes.
    Origin(loadgen::cli::OriginArgs),
    /// HTTP load generator (close mode by default: one request per connection).
    Load(loadgen::cli::LoadArgs),
    /// The seed's benchmark: origin + HAProxy + close-mode load per object size.
    Bench(crate::bench::BenchArgs),
    /// The topologies `--topology` accepts and whether each can run here.
    Topologies(crate::topology::TopologiesArgs),
    /// Remove namespaces, links, guests, proxies and scratch directories a
    /// killed hvprof left.
    Cleanup(crate::topology::cleanup::CleanupArgs),
    /// Internal: stands in for HAProxy while it runs in a guest.
    #[command(hide = true)]
    GuestHaproxy(crate::topology::vm::GuestHaproxyArgs),
}

impl Command {
    /// Commands that create topologies, start HAProxy or QEMU, or load
    /// probes: they first remove what killed hvprof runs left.
    fn cleans_up_first(&self) -> bool {
        matches!(self, Self::Profile(_) | Self::Bench(_) | Self::Record(_))
    }
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        if self.command.cleans_up_first() {
            crate::topology::cleanup::cleanup_at_start();
        }
        if matches!(self.command, Command::Bench(_) | Command::Profile(_)) {
            // Ctrl-C/SIGTERM: an orderly teardown and exit 128+signal, on
            // every topology (`record` stops on these signals itself).
            crate::topology::cleanup::install_signal_teardown();
        }
        if matches!(self.command, Command::Probes(_) | Command::Topologies(_)) {
            // Listings end quietly when the reader does (`| head`), as ls
            // does. Only here: elsewhere a closed socket must be an error,
            // not a signal.
            // SAFETY: resetting a signal disposition at start-up, before
            // any thread exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        }
        let res = self.dispatch();
        // After Ctrl-C/SIGTERM the teardown owns the exit.
        crate::topology::cleanup::finish();
        res
    }

    fn dispatch(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Profile(args) => args.run(),
            Command::Record(args) => args.run(),
            Command::Dump(args) => args.run(),
            Command::Probes(args) => args.run(),
            Command::Report(args) => args.run(),
            Command::Agent(args) => args.run(),
            Command::Origin(args) => args.run(),
            Command::Load(args) => args.run(),
            Command::Bench(args) => args.run(),
            Command::Topologies(args) => args.run(),
            Command::Cleanup(args) => args.run(),
            Command::GuestHaproxy(args) => args.run(),
        }
    }
}

/// Formats an error chain on one line: `outer: cause: root cause`.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for (i, cause) in err.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 {
            // Skip causes whose text the outer message already carries.
            if out.contains(&text) {
                continue;
            }
            out.push_str(": ");
        }
        out.push_str(text.trim());
    }
    out.replace('\n', " ")
}
