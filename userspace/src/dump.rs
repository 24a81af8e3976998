//! `hvprof dump`: a run's events (or its connections) as JSON lines, one
//! object per line, for `jq` and friends.

use std::{
    io::{BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{
    event,
    rundir::{self, log::LogReader},
    timeline::Timeline,
};

/// Print a run's events as JSON lines.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Run directory written by `hvprof record`.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one line per TCP connection (its endpoints and lifecycle)
    /// instead of one per event.
    #[arg(long, conflicts_with_all = ["guests", "conn"])]
    pub connections: bool,
    /// Merge the guests' events (RUN/guest-N/) in, on the host's clock
    /// (each guest's best recorded offset), tagged with their origin.
    #[arg(long)]
    pub guests: bool,
    /// Only packet and state events of the TCP connection with this
    /// endpoint (ADDR:PORT, either side), in time order.
    #[arg(long, value_name = "ADDR:PORT")]
    pub conn: Option<std::net::SocketAddrV4>,
}

impl DumpArgs {
    pub fn run(self) -> Result<ExitCode> {
        let meta = rundir::open(&self.dir)?;
        let ctx = event::Context::new(&meta.functions);
        let stdout = std::io::stdout();
        let mut out = BufWriter::new(stdout.lock());
        let res = if self.connections {
            self.connections(&mut out)
        } else if self.guests || self.conn.is_some() {
            self.merged(&mut out, &meta)
        } else {
            self.events(&mut out, &ctx)
        };
        match res.and_then(|()| out.flush().map_err(Into::into)) {
            Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
            other => other.map(|()| ExitCode::SUCCESS),
        }
    }

    fn events(&self, out: &mut impl Write, ctx: &event::Context) -> Result<()> {
        let path = self.dir.join(rundir::EVENTS);
        let mut reader = LogReader::open(&path)?;
        let mut n = 0u64;
        while let Some(rec) = reader.next_record()? {
            n += 1;
            let ev = event::decode(rec, ctx)
                .with_context(|| format!("{}: record {n}", path.display()))?;
            serde_json::to_writer(&mut *out, &ev)?;
            out.write_all(b"\n")?;
        }
        if reader.truncated_tail {
            eprintln!(
                "hvprof: {} ends inside a record (recorder stopped abruptly); showed the {n} complete ones",
                path.display()
            );
        }
        Ok(())
    }

    /// Host (and with --guests, guest) events in host-clock order.
    fn merged(&self, out: &mut impl Write, meta: &crate::rundir::meta::Meta) -> Result<()> {
        let mut sources = vec![(
            "host".to_string(),
            self.dir.clone(),
            0i64,
            meta.functions.clone(),
        )];
        if self.guests {
            let mut guests: Vec<_> = std::fs::read_dir(&self.dir)?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("guest-"))
                .map(|e| e.path())
                .collect();
            guests.sort();
            for g in guests {
                let name = g
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let gmeta = rundir::open(&g)?;
                let Some(off) = crate::correlate::best_offset(&meta.clock_offsets, &name) else {
                    eprintln!("hvprof: {name} has no clock offset; its events are left out");
                    continue;
                };
                sources.push((name, g, off.offset_ns, gmeta.functions));
            }
        }
        let mut all: Vec<(u64, serde_json::Value)> = Vec::new();
        for (origin, dir, offset, functions) in sources {
            let ctx = event::Context::new(&functions);
            let path = dir.join(rundir::EVENTS);
            let mut reader = LogReader::open(&path)?;
            while let Some(rec) = reader.next_record()? {
                let ev = event::decode(rec, &ctx).with_context(|| format!("{}", path.display()))?;
                if let Some(c) = &self.conn
                    && !involves(&ev.body, c)
                {
                    continue;
                }
                let host_ts = (ev.ts_ns as i128 - offset as i128).max(0) as u64;
                let mut v = serde_json::to_value(&ev)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("origin".into(), origin.clone().into());
                    if origin != "host" {
                        o.insert("guest_ts_ns".into(), ev.ts_ns.into());
                        o.insert("ts_ns".into(), host_ts.into());
                    }
                }
                all.push((host_ts, v));
            }
        }
        all.sort_by_key(|(t, _)| *t);
        for (_, v) in all {
            serde_json::to_writer(&mut *out, &v)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn connections(&self, out: &mut impl Write) -> Result<()> {
        let tl = Timeline::read(&self.dir)?;
        for c in &tl.connections {
            serde_json::to_writer(&mut *out, c)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

/// Whether an event belongs to the connection with endpoint `c`.
fn involves(body: &event::Body, c: &std::net::SocketAddrV4) -> bool {
    use std::net::IpAddr;
    let at = |ip: IpAddr, port: u16| ip == IpAddr::V4(*c.ip()) && port == c.port();
    match body {
        event::Body::SockLife(s) => at(s.saddr, s.sport) || at(s.daddr, s.dport),
        event::Body::DevPacket(p) => {
            at(IpAddr::V4(p.saddr), p.sport) || at(IpAddr::V4(p.daddr), p.dport)
        }
        _ => false,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) || e.chain().any(|c| {
        c.downcast_ref::<serde_json::Error>()
            .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}
