//! Network namespaces and links for the `veth`, `bridge` and `bridge-nf`
//! topologies (and the namespace a VM's TAP lives in), made with iproute2
//! and iptables-restore, every object inside a namespace hvprof created
//! (`hvp-<pid>-<topology>-<role>`) and recorded in the state file first, so
//! teardown, Ctrl-C and `hvprof cleanup` find it. Also runs a closure on a
//! thread that entered such a namespace ([`run_in`]).
//!
//! Layout (addresses from [`super::plan`]):
//! - `veth`: `…-c` (client + origin, `hvpc0` 10.77.1.1) ⇄ `…-p` (HAProxy,
//!   `hvpp0` 10.77.1.2);
//! - `bridge`: the same two plus `…-b` holding bridge `hvpbr0` and the
//!   peers `hvpbc0`, `hvpbp0`; `bridge-nf-call-iptables` off;
//! - `bridge-nf`: `bridge` with `bridge-nf-call-iptables` on in `…-b` and
//!   N filler rules (comment `hvprof`) plus conntrack in its FORWARD chain.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};

use super::{TopologyError, cleanup};

/// Runs a command to completion; a failure carries its stderr.
pub(crate) fn sh(what: &str, cmd: &mut Command) -> Result<(), TopologyError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        TopologyError::setup(what, format!("cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if !out.status.success() {
        return Err(TopologyError::setup(
            what,
            format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        ));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

/// `Ok` when iproute2 is usable.
pub fn tools_available() -> Result<(), String> {
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("`ip` (iproute2) not found: apt-get install iproute2".into()),
    }
}

/// `Ok` when iptables-restore is usable.
pub fn iptables_available() -> Result<(), String> {
    match Command::new("iptables-restore").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("iptables-restore not found: apt-get install iptables".into()),
    }
}

/// The name of a namespace of this process for `topology` and `role`.
pub fn ns_name(topology: &str, role: &str) -> String {
    format!("hvp-{}-{topology}-{role}", std::process::id())
}

/// A namespace this process created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (recorded in the state file before it exists, both
    /// under [`cleanup::creating`]) with loopback up.
    pub fn create(name: &str) -> Result<Self, TopologyError> {
        let creating = cleanup::creating();
        cleanup::record_netns(name);
        if let Err(e) = sh(
            &format!("creating network namespace {name}"),
            &mut ip(&["netns", "add", name]),
        ) {
            cleanup::forget_netns(name);
            return Err(e);
        }
        drop(creating);
        let ns = Self { name: name.into() };
        ns.ip(
            &format!("bringing up lo in {name}"),
            &["link", "set", "lo", "up"],
        )?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, what: &str, args: &[&str]) -> Result<(), TopologyError> {
        let mut c = ip(&["-n", &self.name]);
        c.args(args);
        sh(what, &mut c)
    }

    /// `ip netns exec NAME PROGRAM ARGS...`.
    pub fn exec(&self, what: &str, program: &str, args: &[&str]) -> Result<(), TopologyError> {
        let mut c = ip(&["netns", "exec", &self.name, program]);
        c.args(args);
        sh(what, &mut c)
    }

    /// Writes a sysctl of this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TopologyError> {
        self.exec(
            &format!("setting {key} in {}", self.name),
            "sysctl",
            &["-qw", &format!("{key}={value}")],
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
        cleanup::forget_netns(&self.name);
    }
}

/// Deletes a namespace (its links go with it). Errors are ignored: it may
/// already be gone.
pub fn delete_netns(name: &str) {
    let _ = ip(&["netns", "del", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The namespaces of a `veth`/`bridge`/`bridge-nf` topology.
#[derive(Debug)]
pub struct NetnsSet {
    // Field order is drop order: the bridge namespace last.
    client: Netns,
    proxy: Netns,
    bridge: Option<Netns>,
    client_ip: Ipv4Addr,
    proxy_ip: Ipv4Addr,
}

impl NetnsSet {
    /// Creates the namespaces and links; `bridged` puts a Linux bridge
    /// between them; `nf_rules` adds netfilter on the bridge.
    pub fn create(
        topology: &str,
        bridged: bool,
        nf_rules: Option<u32>,
    ) -> Result<Self, TopologyError> {
        let (client_ip, proxy_ip) = super::plan(1);
        let client = Netns::create(&ns_name(topology, "c"))?;
        let proxy = Netns::create(&ns_name(topology, "p"))?;
        let bridge = if bridged {
            Some(Netns::create(&ns_name(topology, "b"))?)
        } else {
            None
        };
        let set = Self {
            client,
            proxy,
            bridge,
            client_ip,
            proxy_ip,
        };
        set.wire(nf_rules)?;
        Ok(set)
    }

    fn wire(&self, nf_rules: Option<u32>) -> Result<(), TopologyError> {
        let (c, p) = (&self.client, &self.proxy);
        match &self.bridge {
            None => {
                c.ip(
                    "creating veth hvpc0/hvpp0",
                    &[
                        "link",
                        "add",
                        "hvpc0",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "hvpp0",
                        "netns",
                        p.name(),
                    ],
                )?;
            }
            Some(b) => {
                c.ip(
                    "creating veth hvpc0/hvpbc0",
                    &[
                        "link",
                        "add",
                        "hvpc0",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "hvpbc0",
                        "netns",
                        b.name(),
                    ],
                )?;
                p.ip(
                    "creating veth hvpp0/hvpbp0",
                    &[
                        "link",
                        "add",
                        "hvpp0",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "hvpbp0",
                        "netns",
                        b.name(),
                    ],
                )?;
                b.ip(
                    "creating bridge hvpbr0",
                    &["link", "add", "hvpbr0", "type", "bridge"],
                )?;
                for port in ["hvpbc0", "hvpbp0"] {
                    b.ip(
                        &format!("adding {port} to hvpbr0"),
                        &["link", "set", port, "master", "hvpbr0", "up"],
                    )?;
                }
                b.ip("bringing up hvpbr0", &["link", "set", "hvpbr0", "up"])?;
                let call = if nf_rules.is_some() { "1" } else { "0" };
                b.sysctl("net.bridge.bridge-nf-call-iptables", call)?;
                if let Some(n) = nf_rules {
                    install_rules(b, n)?;
                }
            }
        }
        c.ip(
            "addressing hvpc0",
            &[
                "addr",
                "add",
                &format!("{}/24", self.client_ip),
                "dev",
                "hvpc0",
            ],
        )?;
        c.ip("bringing up hvpc0", &["link", "set", "hvpc0", "up"])?;
        p.ip(
            "addressing hvpp0",
            &[
                "addr",
                "add",
                &format!("{}/24", self.proxy_ip),
                "dev",
                "hvpp0",
            ],
        )?;
        p.ip("bringing up hvpp0", &["link", "set", "hvpp0", "up"])?;
        Ok(())
    }

    pub fn client_ns(&self) -> &str {
        self.client.name()
    }
    pub fn proxy_ns(&self) -> &str {
        self.proxy.name()
    }
    pub fn client_ip(&self) -> Ipv4Addr {
        self.client_ip
    }
    pub fn proxy_ip(&self) -> Ipv4Addr {
        self.proxy_ip
    }
    /// The client namespace's end of the path (always `hvpc0`).
    pub fn client_devices(&self) -> Vec<&'static str> {
        vec!["hvpc0"]
    }
    /// The proxy namespace's end of the path (always `hvpp0`).
    pub fn proxy_devices(&self) -> Vec<&'static str> {
        vec!["hvpp0"]
    }

    pub fn names(&self) -> Vec<String> {
        [Some(&self.client), Some(&self.proxy), self.bridge.as_ref()]
            .into_iter()
            .flatten()
            .map(|n| n.name().to_string())
            .collect()
    }
}

/// The iptables-restore input of `bridge-nf`: `n` rules every forwarded
/// packet is checked against (sources in 10.78.0.0/16, never matching),
/// then conntrack: INVALID dropped, NEW/ESTABLISHED/RELATED accepted.
pub fn rules_text(n: u32) -> String {
    let mut t =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..n {
        let _ = writeln!(
            t,
            "-A FORWARD -s 10.78.{}.{}/32 -p tcp -m tcp --dport 9 -m comment --comment hvprof -j DROP",
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    t.push_str("-A FORWARD -m conntrack --ctstate INVALID -m comment --comment hvprof -j DROP\n");
    t.push_str("-A FORWARD -m conntrack --ctstate NEW,RELATED,ESTABLISHED -m comment --comment hvprof -j ACCEPT\n");
    t.push_str("COMMIT\n");
    t
}

fn install_rules(ns: &Netns, n: u32) -> Result<(), TopologyError> {
    let what = format!("loading {n} iptables rules into {}", ns.name());
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), "iptables-restore", "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TopologyError::setup(&what, format!("cannot run iptables-restore: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules_text(n).as_bytes())
            .map_err(|e| TopologyError::setup(&what, e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| TopologyError::setup(&what, e))?;
    if !out.status.success() {
        return Err(TopologyError::setup(
            what,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Runs `f` on a new thread that first entered the network namespace
/// `ns`; the threads and sockets `f` creates live in that namespace.
pub fn run_in<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> Result<R, TopologyError> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| {
        TopologyError::setup(format!("entering namespace {ns}"), format!("{path}: {e}"))
    })?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("in-{ns}"))
            .spawn_scoped(s, move || {
                // SAFETY: setns on a namespace file we opened; affects this
                // thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .map_err(|e| TopologyError::setup(format!("entering namespace {ns}"), e))?;
        match handle.join() {
            Ok(r) => r.map_err(|e| {
                TopologyError::setup(format!("entering namespace {ns}"), format!("setns: {e}"))
            }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_commented_and_counted() {
        let t = rules_text(600);
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("-A FORWARD -s 10.78."))
                .count(),
            600
        );
        assert!(
            t.lines()
                .filter(|l| l.starts_with("-A"))
                .all(|l| l.contains("--comment hvprof"))
        );
        assert!(t.contains("--ctstate NEW,RELATED,ESTABLISHED"));
        // Sources stay distinct.
        let mut srcs: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A FORWARD -s "))
            .filter_map(|l| l.split_whitespace().nth(3))
            .collect();
        let n = srcs.len();
        srcs.sort_unstable();
        srcs.dedup();
        assert_eq!(srcs.len(), n);
    }

    #[test]
    fn names_are_marked() {
        let n = ns_name("bridge-nf", "b");
        assert!(n.starts_with(&format!("hvp-{}-", std::process::id())));
    }
}
