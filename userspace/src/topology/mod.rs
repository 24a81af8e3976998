//! Topologies: where the seed's benchmark runs on this machine — the
//! "hypervisors" of DESIGN.md. Owns the topology names and their options
//! (`--topology`, `--nf-rules`, `--vm-*`), availability (`hvprof
//! topologies`), bringing one up ([`Up::start`]: namespaces, links, rules,
//! a QEMU guest) and tearing it down on drop, on error and on Ctrl-C.
//!
//! An [`Up`] implements [`loadgen::sweep::Topology`], so the sweep drives
//! it like `native`. Except for `native` (loopback), the origin and the
//! load generator run on a thread that entered the topology's client-side
//! network namespace ([`Up::run_inside`]); HAProxy runs in the proxy
//! namespace or in the guest. All traffic stays in namespaces hvprof
//! created (10.77.x.0/24, no routes out).
//!
//! Submodules: `netns` (namespaces, veth, bridge, iptables), `vm` (test
//! bed, QEMU, the guest's control channel, HAProxy in the guest),
//! `cleanup` (the state file under /run/hvprof, signal teardown, `hvprof
//! cleanup`).

pub mod cleanup;
pub mod netns;
pub mod vm;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use loadgen::haproxy::Launcher;
use loadgen::sweep::{self, SweepError};
use serde::Serialize;

/// Why a topology can't be used or brought up.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("unknown topology '{0}' (available: {list})", list = NAMES.join(", "))]
    Unknown(String),
    #[error(
        "--nf-rules applies only to bridge-nf, not to {0}: add --topology bridge-nf or drop --nf-rules"
    )]
    NfRulesWithout(String),
    #[error("topology '{name}' is not available here: {why}")]
    Unavailable { name: String, why: String },
    #[error("{what}: {detail}")]
    Setup { what: String, detail: String },
    #[error("{0}")]
    Vm(#[from] vm::VmError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl TopologyError {
    pub(crate) fn setup(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Setup {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// Every topology name, in the order results list them.
pub const NAMES: &[&str] = &[
    "native",
    "veth",
    "bridge",
    "bridge-nf",
    "vm-virtio",
    "vm-vmxnet3",
    "vm-e1000",
    "vm-e1000e",
    "vm-rtl8139",
];

/// iptables rules `bridge-nf` installs when `--nf-rules` is not given:
/// enough for the netfilter cost to show in conn/s (see docs/topologies.md).
pub const DEFAULT_NF_RULES: u32 = 500;

/// A topology's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Native,
    Veth,
    Bridge,
    BridgeNf,
    Vm(vm::Nic),
}

impl Kind {
    pub fn parse(name: &str) -> Result<Self, TopologyError> {
        Ok(match name {
            "native" => Self::Native,
            "veth" => Self::Veth,
            "bridge" => Self::Bridge,
            "bridge-nf" => Self::BridgeNf,
            other => match other.strip_prefix("vm-").and_then(vm::Nic::parse) {
                Some(nic) => Self::Vm(nic),
                None => return Err(TopologyError::Unknown(name.to_string())),
            },
        })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Native => "native".into(),
            Self::Veth => "veth".into(),
            Self::Bridge => "bridge".into(),
            Self::BridgeNf => "bridge-nf".into(),
            Self::Vm(nic) => format!("vm-{}", nic.name()),
        }
    }

    /// The path a connection takes, for listings and results.
    pub fn path(&self) -> String {
        match self {
            Self::Native => "client → HAProxy → origin over loopback".into(),
            Self::Veth => "client/origin netns ⇄ veth ⇄ HAProxy netns".into(),
            Self::Bridge => {
                "client/origin netns ⇄ veth ⇄ Linux bridge ⇄ veth ⇄ HAProxy netns".into()
            }
            Self::BridgeNf => {
                "bridge, with iptables FORWARD rules + conntrack on the bridge".into()
            }
            Self::Vm(nic) => format!(
                "client/origin netns ⇄ TAP ⇄ QEMU {} ⇄ guest {} ⇄ HAProxy in the guest",
                nic.qemu_model(),
                nic.guest_driver()
            ),
        }
    }
}

/// Topology options shared by `bench` (and later `record`, `profile`).
#[derive(Args, Debug, Clone)]
pub struct TopologyArgs {
    /// Where the proxy runs; repeatable (see `hvprof topologies`):
    /// native, veth, bridge, bridge-nf, vm-virtio, vm-vmxnet3, vm-e1000,
    /// vm-e1000e, vm-rtl8139.
    #[arg(long = "topology", value_name = "NAME", default_value = "native")]
    pub topologies: Vec<String>,
    /// iptables rules (plus conntrack) on the bridge of `bridge-nf`
    /// [default: 500].
    #[arg(long, value_name = "N")]
    pub nf_rules: Option<u32>,
    /// vCPUs of the guest in `vm-*` topologies (the seed used 2).
    #[arg(long, value_name = "N", default_value = "2", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vm_cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value = "512", value_parser = clap::value_parser!(u32).range(128..=65536))]
    pub vm_memory: u32,
    /// Guest accelerator: auto (KVM when /dev/kvm boots a normal guest,
    /// else software emulation), kvm or tcg.
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    pub accel: vm::Accel,
    /// The test bed built by `cargo xtask testbed` [default: $HVPROF_TESTBED,
    /// else target/testbed next to this binary].
    #[arg(long, value_name = "DIR")]
    pub testbed: Option<PathBuf>,
}

impl Default for TopologyArgs {
    fn default() -> Self {
        Self {
            topologies: vec!["native".into()],
            nf_rules: None,
            vm_cpus: 2,
            vm_memory: 512,
            accel: vm::Accel::Auto,
            testbed: None,
        }
    }
}

impl TopologyArgs {
    /// The requested topologies, checked (names, option combinations,
    /// availability) before anything is created. Duplicates are dropped.
    pub fn specs(&self) -> Result<Vec<Spec>, TopologyError> {
        let mut kinds: Vec<Kind> = Vec::new();
        for name in &self.topologies {
            for part in name.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let k = Kind::parse(part)?;
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        if self.nf_rules.is_some() && !kinds.contains(&Kind::BridgeNf) {
            let names: Vec<String> = kinds.iter().map(Kind::name).collect();
            return Err(TopologyError::NfRulesWithout(names.join(", ")));
        }
        let mut specs = Vec::new();
        for kind in kinds {
            let spec = Spec {
                kind,
                nf_rules: self.nf_rules.unwrap_or(DEFAULT_NF_RULES),
                vm: vm::VmOptions {
                    cpus: self.vm_cpus,
                    memory_mib: self.vm_memory,
                    accel: self.accel,
                    testbed: self.testbed.clone(),
                },
            };
            if let Err(why) = spec.available() {
                return Err(TopologyError::Unavailable {
                    name: kind.name(),
                    why,
                });
            }
            specs.push(spec);
        }
        Ok(specs)
    }
}

/// One topology with its options, not yet created.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub nf_rules: u32,
    pub vm: vm::VmOptions,
}

impl Spec {
    pub fn name(&self) -> String {
        self.kind.name()
    }

    /// `Ok` when this topology can be brought up here, else why not (with
    /// what to do).
    pub fn available(&self) -> Result<(), String> {
        if self.kind == Kind::Native {
            return Ok(());
        }
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (network namespaces)".into());
        }
        netns::tools_available()?;
        if self.kind == Kind::BridgeNf {
            netns::iptables_available()?;
        }
        if let Kind::Vm(nic) = self.kind {
            vm::available(nic, &self.vm)?;
        }
        Ok(())
    }
}

/// What a result was measured on, written next to each result.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Environment {
    pub topology: String,
    pub path: String,
    pub host_kernel: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nf_rules: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<vm::VmEnvironment>,
}

/// How a topology's pieces are placed: the address plan and the HAProxy
/// launcher.
enum Placement {
    Native(sweep::NativeTopology),
    Netns {
        net: netns::NetnsSet,
        launcher: loadgen::haproxy::Prefix,
    },
    Vm(Box<vm::Vm>),
}

/// A topology that is up. Dropping it tears everything down.
pub struct Up {
    name: String,
    placement: Placement,
    env: Environment,
}

/// Frontend port of HAProxy inside a proxy namespace or guest (they are
/// ours alone, so a fixed port is free).
const PROXY_PORT: u16 = 8080;

impl Up {
    /// Creates the topology: namespaces and links, rules, or a booted guest.
    pub fn start(spec: &Spec) -> Result<Self, TopologyError> {
        let name = spec.name();
        let mut env = Environment {
            topology: name.clone(),
            path: spec.kind.path(),
            host_kernel: host_kernel(),
            ..Environment::default()
        };
        let placement = match spec.kind {
            Kind::Native => Placement::Native(sweep::NativeTopology::default()),
            Kind::Veth | Kind::Bridge | Kind::BridgeNf => {
                let nf = (spec.kind == Kind::BridgeNf).then_some(spec.nf_rules);
                let net = netns::NetnsSet::create(&name, spec.kind != Kind::Veth, nf)?;
                env.namespaces = net.names();
                env.nf_rules = nf;
                let launcher = loadgen::haproxy::Prefix(vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    net.proxy_ns().to_string(),
                ]);
                Placement::Netns { net, launcher }
            }
            Kind::Vm(nic) => {
                let vm = vm::Vm::start(&name, nic, &spec.vm)?;
                env.namespaces = vec![vm.netns().to_string()];
                env.vm = Some(vm.environment().clone());
                Placement::Vm(Box::new(vm))
            }
        };
        Ok(Self {
            name,
            placement,
            env,
        })
    }

    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// The namespace the origin and load generator run in (`None`: this
    /// one, for `native`).
    pub fn client_netns(&self) -> Option<&str> {
        match &self.placement {
            Placement::Native(_) => None,
            Placement::Netns { net, .. } => Some(net.client_ns()),
            Placement::Vm(vm) => Some(vm.netns()),
        }
    }

    /// Runs `f` on a thread inside the client-side namespace (directly for
    /// `native`). Sockets and threads `f` creates stay in that namespace.
    pub fn run_inside<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, TopologyError> {
        match self.client_netns() {
            None => Ok(f()),
            Some(ns) => netns::run_in(ns, f),
        }
    }

    /// Host-side devices of the path, as `NETNS:IFNAME` for `--dev`: the
    /// TAP of a guest, both ends of a namespace topology (so that a
    /// packet's crossing is timed).
    pub fn host_devices(&self) -> Vec<String> {
        match &self.placement {
            Placement::Native(_) => Vec::new(),
            Placement::Netns { net, .. } => net
                .client_devices()
                .into_iter()
                .map(|d| format!("{}:{d}", net.client_ns()))
                .chain(
                    net.proxy_devices()
                        .into_iter()
                        .map(|d| format!("{}:{d}", net.proxy_ns())),
                )
                .collect(),
            Placement::Vm(vm) => vec![format!("{}:{}", vm.netns(), vm.tap())],
        }
    }

    /// The guest of a `vm-*` topology.
    pub fn vm(&self) -> Option<&vm::Vm> {
        match &self.placement {
            Placement::Vm(vm) => Some(vm),
            _ => None,
        }
    }

    /// Tears the topology down now (also done on drop).
    pub fn stop(self) {
        drop(self);
    }
}

impl sweep::Topology for Up {
    fn name(&self) -> &str {
        &self.name
    }
    fn launcher(&self) -> &dyn Launcher {
        match &self.placement {
            Placement::Native(n) => n.launcher(),
            Placement::Netns { launcher, .. } => launcher,
            Placement::Vm(vm) => vm.launcher(),
        }
    }
    fn origin_listen(&self) -> SocketAddr {
        match &self.placement {
            Placement::Native(n) => n.origin_listen(),
            Placement::Netns { net, .. } => (net.client_ip(), 0).into(),
            Placement::Vm(vm) => (vm.host_ip(), 0).into(),
        }
    }
    fn proxy_frontend(&self) -> Result<SocketAddr, SweepError> {
        match &self.placement {
            Placement::Native(n) => n.proxy_frontend(),
            Placement::Netns { net, .. } => Ok((net.proxy_ip(), PROXY_PORT).into()),
            Placement::Vm(vm) => Ok((vm.guest_ip(), PROXY_PORT).into()),
        }
    }
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The address plan: 10.77.NET.1 on the client side, .2 for the proxy.
pub(crate) fn plan(net: u8) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(10, 77, net, 1), Ipv4Addr::new(10, 77, net, 2))
}

/// `hvprof topologies`: every topology and whether it can run here.
#[derive(Args, Debug)]
pub struct TopologiesArgs {
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub vm: VmOnlyArgs,
}

/// The VM options that matter for availability.
#[derive(Args, Debug)]
pub struct VmOnlyArgs {
    /// The test bed built by `cargo xtask testbed`.
    #[arg(long, value_name = "DIR")]
    pub testbed: Option<PathBuf>,
    /// Guest accelerator: auto, kvm or tcg.
    #[arg(long, value_name = "ACCEL", default_value = "auto")]
    pub accel: vm::Accel,
}

#[derive(Serialize)]
struct Row {
    name: String,
    available: bool,
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    accel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    why_not: Option<String>,
}

impl TopologiesArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let opts = vm::VmOptions {
            testbed: self.vm.testbed.clone(),
            accel: self.vm.accel,
            ..vm::VmOptions::default()
        };
        let accel = vm::choose_accel(self.vm.accel);
        let rows: Vec<Row> = NAMES
            .iter()
            .filter_map(|n| Kind::parse(n).ok())
            .map(|kind| {
                let spec = Spec {
                    kind,
                    nf_rules: DEFAULT_NF_RULES,
                    vm: opts.clone(),
                };
                let why = spec.available().err();
                Row {
                    name: kind.name(),
                    available: why.is_none(),
                    path: kind.path(),
                    accel: matches!(kind, Kind::Vm(_)).then(|| accel.describe()),
                    why_not: why,
                }
            })
            .collect();
        let mut out = String::new();
        if self.json {
            for r in &rows {
                let _ = writeln!(out, "{}", serde_json::to_string(r)?);
            }
        } else {
            let _ = writeln!(out, "{:<11} {:<9} path", "topology", "available");
            for r in &rows {
                let avail = if r.available { "yes" } else { "no" };
                let _ = write!(out, "{:<11} {:<9} {}", r.name, avail, r.path);
                if let Some(a) = &r.accel {
                    let _ = write!(out, " [{a}]");
                }
                if let Some(w) = &r.why_not {
                    let _ = write!(out, "\n{:<21} not available: {w}", "");
                }
                out.push('\n');
            }
        }
        print!("{out}");
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in NAMES {
            assert_eq!(Kind::parse(n).unwrap().name(), *n);
        }
        assert!(matches!(Kind::parse("kvm"), Err(TopologyError::Unknown(_))));
        assert!(matches!(
            Kind::parse("vm-foo"),
            Err(TopologyError::Unknown(_))
        ));
    }

    #[test]
    fn nf_rules_need_bridge_nf() {
        let args = TopologyArgs {
            topologies: vec!["native".into(), "veth".into()],
            nf_rules: Some(10),
            ..TopologyArgs::default()
        };
        let e = args.specs().unwrap_err().to_string();
        assert!(e.contains("--nf-rules applies only to bridge-nf"), "{e}");
    }

    #[test]
    fn unknown_topology_lists_names() {
        let args = TopologyArgs {
            topologies: vec!["kvm".into()],
            ..TopologyArgs::default()
        };
        let e = args.specs().unwrap_err().to_string();
        assert!(
            e.contains("unknown topology 'kvm'") && e.contains("vm-virtio"),
            "{e}"
        );
    }
}
