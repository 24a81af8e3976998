//! Timelines: events of a run grouped into socket endpoints (one `struct
//! sock` from its first state change to CLOSE) and endpoints paired into
//! connections by their 4-tuple, with the time of each lifecycle step.

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result};
use hvprof_common::{EventHeader, kind};
use serde::Serialize;

use crate::{
    event::{self, Body},
    paths::tcp::{SockLife, Transition},
    rundir::{self, log::LogReader},
};

/// An IP address and port.
type Addr = (IpAddr, u16);

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
            if let Body::SockLife(s) = &ev.body {
                b.add(ev.pid, &ev.comm, s);
            }
        }
        Ok(Self {
            connections: b.finish(),
            events,
            truncated_tail: reader.truncated_tail,
        })
    }
}

/// `client` (it sent the SYN), `server` (it answered one) or `unknown`.
fn role(s: &SockLife) -> &'static str {
    let mut role = "unknown";
    for t in &s.transitions {
        match t.new {
            "SYN_SENT" => role = "client",
            "SYN_RECV" => role = "server",
            _ => {}
        }
        if t.old == "SYN_RECV" && role == "unknown" {
            role = "server";
        }
    }
    role
}

/// Whether a life is an end of a connection (listeners and never-connected
/// sockets are not).
fn is_endpoint(role: &str, s: &SockLife) -> bool {
    s.dport != 0 && role != "unknown" || s.transitions.iter().any(|t| t.new == "ESTABLISHED")
}

/// (client, server) address of a connection, from either end.
fn tuple(role: &str, local: Addr, remote: Addr) -> (Addr, Addr) {
    if role == "server" {
        (remote, local)
    } else {
        (local, remote)
    }
}

/// The number of connections in `dir`'s event log, reading it as a stream
/// (memory bounded by the ends still waiting for their other end, which
/// closes within moments of the first; ends waiting longer than
/// [`PAIR_WITHIN_NS`] are let go). Also whether the log's tail was cut.
pub fn count_connections(dir: &Path) -> Result<(u64, bool)> {
    let path = dir.join(rundir::EVENTS);
    let mut reader = LogReader::open(&path)?;
    let ctx = event::Context::default();
    let mut waiting: HashMap<(Addr, Addr), (&'static str, u64)> = HashMap::new();
    let (mut count, mut records) = (0u64, 0u64);
    while let Some(rec) = reader.next_record()? {
        records += 1;
        if EventHeader::read(rec).is_some_and(|h| h.kind != kind::SOCK_LIFE) {
            continue;
        }
        let ev = event::decode(rec, &ctx)
            .with_context(|| format!("{}: record {records}", path.display()))?;
        let Body::SockLife(s) = &ev.body else {
            continue;
        };
        let role = role(s);
        if !is_endpoint(role, s) {
            continue;
        }
        let key = tuple(role, (s.saddr, s.sport), (s.daddr, s.dport));
        match waiting.get(&key) {
            Some((r, _)) if *r != role => {
                waiting.remove(&key);
            }
            _ => {
                count += 1;
                waiting.insert(key, (role, ev.ts_ns));
            }
        }
        if records % 65536 == 0 {
            waiting.retain(|_, (_, ts)| ts.saturating_add(PAIR_WITHIN_NS) >= ev.ts_ns);
        }
    }
    Ok((count, reader.truncated_tail))
}

/// How long after one end of a connection closes its other end may close
/// and still be paired with it by [`count_connections`].
const PAIR_WITHIN_NS: u64 = 60_000_000_000;

#[derive(Default)]
struct Builder {
    done: Vec<Endpoint>,
}

impl Builder {
    /// One socket's life (the kernel sends it whole, at its end).
    fn add(&mut self, pid: u32, comm: &str, s: &SockLife) {
        let role = role(s);
        if !is_endpoint(role, s) {
            return;
        }
        self.done.push(Endpoint {
            sk: s.sk.clone(),
            role,
            local: (s.saddr, s.sport),
            remote: (s.daddr, s.dport),
            pid,
            comm: comm.to_string(),
            transitions: s.transitions.clone(),
            bytes_received: s.bytes_received,
            bytes_acked: s.bytes_acked,
            closed: s.closed,
        });
    }

    fn finish(self) -> Vec<Connection> {
        let mut eps = self.done;
        eps.sort_by_key(|e| e.transitions.first().map_or(0, |t| t.ts_ns));
        // Pair by mirrored 4-tuple; a tuple reused later starts a new
        // connection once both sides are taken.
        let mut conns: Vec<Connection> = Vec::new();
        let mut by_tuple: HashMap<(Addr, Addr), usize> = HashMap::new();
        for ep in eps {
            let key = tuple(ep.role, ep.local, ep.remote);
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

#[cfg(test)]
mod tests {
    use hvprof_common::{EventHeader, SockLifeEvent, kind, sock_life};

    use super::*;
    use crate::rundir::log::LogWriter;

    /// A closed life of `local` → `remote` with these (old, new) changes.
    fn life(ts: u64, local: u16, remote: u16, steps: &[(u8, u8)]) -> Vec<u8> {
        let mut ev = SockLifeEvent {
            header: EventHeader {
                ts_ns: ts,
                kind: kind::SOCK_LIFE,
                ..EventHeader::default()
            },
            skaddr: u64::from(local) << 8 | u64::from(remote),
            family: 2,
            sport: local,
            dport: remote,
            steps: steps.len() as u8,
            flags: sock_life::CLOSED,
            ..SockLifeEvent::default()
        };
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        for (i, &(o, n)) in steps.iter().enumerate() {
            ev.step_ns[i] = ts - 1000 + i as u64;
            ev.step_old[i] = o;
            ev.step_new[i] = n;
        }
        ev.as_bytes().to_vec()
    }

    const CLIENT: [(u8, u8); 5] = [(7, 2), (2, 1), (1, 4), (4, 5), (5, 7)];
    const SERVER: [(u8, u8); 4] = [(3, 1), (1, 8), (8, 9), (9, 7)];
    const LISTENER: [(u8, u8); 2] = [(7, 10), (10, 7)];

    #[test]
    fn streaming_count_agrees_with_the_full_timeline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogWriter::create(&dir.path().join(rundir::EVENTS)).expect("log");
        let mut ts = 1_000_000;
        let mut add = |bytes: Vec<u8>| log.append(&bytes).expect("append");
        // Two ends each of 3 connections (server end first, then client),
        // one connection whose tuple is reused later, one client whose
        // server is elsewhere, and a listener.
        for port in [40000, 40001, 40002, 40000] {
            ts += 10_000;
            add(life(ts, 80, port, &SERVER));
            add(life(ts + 1, port, 80, &CLIENT));
        }
        add(life(ts + 5, 40009, 443, &CLIENT));
        add(life(ts + 6, 80, 0, &LISTENER));
        log.flush().expect("flush");
        let tl = Timeline::read(dir.path()).expect("timeline");
        assert_eq!(tl.connections.len(), 5);
        assert!(
            tl.connections
                .iter()
                .take(4)
                .all(|c| c.endpoints.len() == 2)
        );
        assert_eq!(count_connections(dir.path()).expect("count"), (5, false));
    }
}
