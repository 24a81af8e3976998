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
    #[arg(long)]
    pub connections: bool,
}

impl DumpArgs {
    pub fn run(self) -> Result<ExitCode> {
        let meta = rundir::open(&self.dir)?;
        let ctx = event::Context::new(&meta.functions);
        let stdout = std::io::stdout();
        let mut out = BufWriter::new(stdout.lock());
        let res = if self.connections {
            self.connections(&mut out)
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

    fn connections(&self, out: &mut impl Write) -> Result<()> {
        let tl = Timeline::read(&self.dir)?;
        for c in &tl.connections {
            serde_json::to_writer(&mut *out, c)?;
            out.write_all(b"\n")?;
        }
        Ok(())
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
