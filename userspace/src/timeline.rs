//! Timelines: events of a run grouped into socket endpoints (one `struct
//! sock` from its first state change to CLOSE) and endpoints paired into
//! connections by their 4-tuple, with the time of each lifecycle step.

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    event::{self, Body},
    paths::tcp::SockState,
    rundir::{self, log::LogReader},
};

/// An IP address and port.
type Addr = (IpAddr, u16);

/// One state change of one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    pub ts_ns: u64,
    pub old: &'static str,
    pub new: &'static str,
}

/// One socket from its first observed state change to CLOSE.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub sk: String,
    /// `client` (it sent the SYN), `server` (it answered one) or `unknown`.
    pub role: &'static str,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    pub pid: u32,
    pub comm: String,
    pub transitions: Vec<Transition>,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    #[serde(skip)]
    closed: bool,
}

/// A TCP connection: one or both of its endpoints.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    pub client: String,
    pub server: String,
    /// First and last event of the connection.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Client SYN sent, established, first FIN, fully closed (when seen).
    pub syn_ns: Option<u64>,
    pub established_ns: Option<u64>,
    pub fin_ns: Option<u64>,
    pub close_ns: Option<u64>,
    pub endpoints: Vec<Endpoint>,
}

/// A run's connections.
pub struct Timeline {
    pub connections: Vec<Connection>,
    pub events: u64,
    pub truncated_tail: bool,
}

impl Timeline {
    /// Reads `dir/events.log`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(rundir::EVENTS);
        let mut reader = LogReader::open(&path)?;
        // Connections need no function names.
        let ctx = event::Context::default();
        let mut b = Builder::default();
        let mut events = 0;
        while let Some(rec) = reader.next_record()? {
            events += 1;
            let ev = event::decode(rec, &ctx)
                .with_context(|| format!("{}: record {events}", path.display()))?;
            if let Body::SockState(s) = &ev.body {
                b.add(ev.ts_ns, ev.pid, &ev.comm, s);
            }
        }
        Ok(Self {
            connections: b.finish(),
            events,
            truncated_tail: reader.truncated_tail,
        })
    }
}

#[derive(Default)]
struct Builder {
    open: HashMap<String, Endpoint>,
    done: Vec<Endpoint>,
}

impl Builder {
    fn add(&mut self, ts_ns: u64, pid: u32, comm: &str, s: &SockState) {
        // A transition out of CLOSE starts a new life for the address.
        if s.old == "CLOSE"
            && let Some(prev) = self.open.remove(&s.sk)
        {
            self.done.push(prev);
        }
        let ep = self.open.entry(s.sk.clone()).or_insert_with(|| Endpoint {
            sk: s.sk.clone(),
            role: "unknown",
            local: (s.saddr, s.sport),
            remote: (s.daddr, s.dport),
            pid,
            comm: comm.to_string(),
            transitions: Vec::new(),
            bytes_received: 0,
            bytes_acked: 0,
            closed: false,
        });
        // Ports are 0 before connect() hashes the socket; keep the latest.
        if s.sport != 0 {
            ep.local = (s.saddr, s.sport);
        }
        if s.dport != 0 {
            ep.remote = (s.daddr, s.dport);
        }
        match s.new {
            "SYN_SENT" => ep.role = "client",
            "SYN_RECV" => ep.role = "server",
            _ => {}
        }
        if s.old == "SYN_RECV" && ep.role == "unknown" {
            ep.role = "server";
        }
        if ep.pid == 0 && pid != 0 {
            ep.pid = pid;
            ep.comm = comm.to_string();
        }
        ep.bytes_received = ep.bytes_received.max(s.bytes_received);
        ep.bytes_acked = ep.bytes_acked.max(s.bytes_acked);
        ep.transitions.push(Transition {
            ts_ns,
            old: s.old,
            new: s.new,
        });
        if s.new == "CLOSE" {
            ep.closed = true;
            if let Some(ep) = self.open.remove(&s.sk) {
                self.done.push(ep);
            }
        }
    }

    fn finish(mut self) -> Vec<Connection> {
        self.done.extend(self.open.into_values());
        // Listeners and never-connected sockets are not connections.
        let mut eps: Vec<Endpoint> = self
            .done
            .into_iter()
            .filter(|e| {
                e.remote.1 != 0 && e.role != "unknown"
                    || e.transitions.iter().any(|t| t.new == "ESTABLISHED")
            })
            .collect();
        eps.sort_by_key(|e| e.transitions.first().map_or(0, |t| t.ts_ns));
        // Pair by mirrored 4-tuple; a tuple reused later starts a new
        // connection once both sides are taken.
        let mut conns: Vec<Connection> = Vec::new();
        let mut by_tuple: HashMap<(Addr, Addr), usize> = HashMap::new();
        for ep in eps {
            let key = if ep.role == "server" {
                (ep.remote, ep.local)
            } else {
                (ep.local, ep.remote)
            };
            let slot = by_tuple.get(&key).copied().filter(|&i| {
                conns[i].endpoints.len() < 2 && conns[i].endpoints.iter().all(|e| e.role != ep.role)
            });
            match slot {
                Some(i) => conns[i].endpoints.push(ep),
                None => {
                    by_tuple.insert(key, conns.len());
                    conns.push(Connection {
                        client: fmt_addr(key.0),
                        server: fmt_addr(key.1),
                        start_ns: 0,
                        end_ns: 0,
                        syn_ns: None,
                        established_ns: None,
                        fin_ns: None,
                        close_ns: None,
                        endpoints: vec![ep],
                    });
                }
            }
        }
        for c in &mut conns {
            let all = || c.endpoints.iter().flat_map(|e| e.transitions.iter());
            c.start_ns = all().map(|t| t.ts_ns).min().unwrap_or(0);
            c.end_ns = all().map(|t| t.ts_ns).max().unwrap_or(0);
            c.syn_ns = all().filter(|t| t.new == "SYN_SENT").map(|t| t.ts_ns).min();
            c.established_ns = all()
                .filter(|t| t.new == "ESTABLISHED")
                .map(|t| t.ts_ns)
                .min();
            c.fin_ns = all()
                .filter(|t| matches!(t.new, "FIN_WAIT1" | "CLOSE_WAIT"))
                .map(|t| t.ts_ns)
                .min();
            let closed = c.endpoints.iter().all(|e| e.closed);
            c.close_ns = closed
                .then(|| all().filter(|t| t.new == "CLOSE").map(|t| t.ts_ns).max())
                .flatten();
        }
        conns.sort_by_key(|c| c.start_ns);
        conns
    }
}

fn fmt_addr((ip, port): (IpAddr, u16)) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("{v4}:{port}"),
    }
}
