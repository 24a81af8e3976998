//! The `hvprof` library: everything behind the `hvprof` binary — eBPF
//! attachment and recording, the run directory (`meta.json`, the framed
//! event log), event decoding, reports and the guest-agent protocol. It is
//! a library so that tools beside the binary (the fuzz targets in `fuzz/`)
//! can reach the readers of untrusted input; the command line itself is
//! [`cli::Cli`].

pub mod agent;
pub mod attach;
pub mod attribution;
pub mod batch;
pub mod bench;
pub mod capture;
pub mod catalog;
pub mod classify;
pub mod cli;
pub mod correlate;
pub mod dump;
pub mod event;
pub mod kernel;
pub mod paths;
pub mod probes;
pub mod profile;
pub mod record;
pub mod recorder;
pub mod report;
pub mod rundir;
pub mod stacks;
pub mod timeline;
pub mod topology;
