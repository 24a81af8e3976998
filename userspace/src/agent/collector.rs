//! The host side of the agent protocol: accepts guest agents, checks their
//! token, writes each guest's recording into `RUN/guest-N/` (the same
//! layout as a host run), and estimates each guest clock's offset from
//! round trips (NTP-style: the sample with the smallest delay, error bound
//! half that delay). Anything malformed, oversized or unauthenticated
//! ends that connection; the host recording goes on.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::proto::{self, Frame};
use crate::rundir::{self, log::LogWriter};

/// A guest clock against the host's CLOCK_MONOTONIC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClockOffset {
    /// Subdirectory of the run holding that guest's recording.
    pub guest: String,
    /// guest time − host time, ns.
    pub offset_ns: i64,
    /// The true offset lies within ± this, ns.
    pub error_ns: u64,
    /// `ping` (round trips on the agent connection) or `packets` (matched
    /// packets in both directions).
    pub method: String,
    pub samples: usize,
}

/// What one agent connection produced.
#[derive(Debug)]
pub struct AgentResult {
    pub guest: String,
    pub events: u64,
    pub clock: Option<ClockOffset>,
    pub complete: bool,
}

pub struct Collector {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    /// One task per agent connection.
    agents: tokio::sync::mpsc::UnboundedReceiver<tokio::task::JoinHandle<Result<AgentResult>>>,
}

impl Collector {
    /// Listens on `addr` for agents of the run in `dir`.
    pub async fn bind(addr: SocketAddr, token: Vec<u8>, dir: PathBuf) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for agents on {addr}"))?;
        Self::serve_on(listener, token, dir)
    }

    /// Takes over a socket bound elsewhere (e.g. inside a topology's
    /// namespace, where the guests are). Needs a running tokio runtime.
    pub fn from_std(listener: std::net::TcpListener, token: Vec<u8>, dir: PathBuf) -> Result<Self> {
        listener.set_nonblocking(true)?;
        Self::serve_on(TcpListener::from_std(listener)?, token, dir)
    }

    fn serve_on(listener: TcpListener, token: Vec<u8>, dir: PathBuf) -> Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let (tx, agents) = tokio::sync::mpsc::unbounded_channel();
        let token = Arc::new(token);
        let counter = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(async move {
            while let Ok((sock, peer)) = listener.accept().await {
                let token = token.clone();
                let dir = dir.clone();
                let stop_rx = stop_rx.clone();
                let counter = counter.clone();
                let h = tokio::spawn(async move {
                    serve(sock, peer, &token, &dir, stop_rx, &counter).await
                });
                if tx.send(h).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accept,
            agents,
        })
    }

    /// Tells every agent to stop and waits (up to `patience`) for their
    /// final frames.
    pub async fn finish(mut self, patience: Duration) -> Vec<AgentResult> {
        self.accept.abort();
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + patience;
        let mut out = Vec::new();
        while let Ok(h) = self.agents.try_recv() {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(Ok(r))) => out.push(r),
                Ok(Ok(Err(e))) => eprintln!("hvprof: agent connection: {e:#}"),
                Ok(Err(e)) => eprintln!("hvprof: agent task: {e}"),
                Err(_) => {
                    eprintln!("hvprof: an agent did not finish within {patience:?}");
                    abort.abort();
                }
            }
        }
        out.sort_by(|a, b| a.guest.cmp(&b.guest));
        out
    }
}

/// One agent connection.
async fn serve(
    mut sock: TcpStream,
    peer: SocketAddr,
    token: &[u8],
    dir: &Path,
    mut stop: watch::Receiver<bool>,
    counter: &AtomicUsize,
) -> Result<AgentResult> {
    let mut nonce = [0u8; proto::NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| anyhow!("no randomness for the challenge: {e}"))?;
    proto::write_frame(
        &mut sock,
        &Frame::Challenge {
            version: proto::VERSION,
            nonce,
        },
    )
    .await?;
    let auth = tokio::time::timeout(
        Duration::from_secs(10),
        proto::read_frame_within(&mut sock, proto::MAX_FRAME_BEFORE_AUTH),
    )
    .await
    .map_err(|_| anyhow!("agent {peer} sent no answer to the challenge"))??;
    let Frame::Auth { mac } = auth else {
        bail!("agent {peer} sent {} before authenticating", auth.name());
    };
    if proto::verify(token, &nonce, &mac).is_err() {
        bail!("refused agent {peer}: wrong token");
    }
    proto::write_frame(&mut sock, &Frame::Accept).await?;
    let guest = format!("guest-{}", counter.fetch_add(1, Ordering::SeqCst));
    let gdir = dir.join(&guest);
    std::fs::create_dir_all(&gdir).with_context(|| format!("creating {}", gdir.display()))?;
    let mut log = LogWriter::create(&gdir.join(rundir::EVENTS))?;
    eprintln!("hvprof: agent {peer} connected -> {}", gdir.display());

    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut frames) = tokio::sync::mpsc::channel::<Result<Frame, proto::ProtoError>>(256);
    tokio::spawn(async move {
        loop {
            let f = proto::read_frame(&mut rd).await;
            let end = f.is_err();
            if tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    let mut ping = tokio::time::interval(Duration::from_millis(100));
    let mut samples: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut stopped = false;
    let mut complete = false;
    loop {
        tokio::select! {
            f = frames.recv() => {
                let Some(f) = f else { break };
                match f {
                    Err(proto::ProtoError::Io(_)) => break,
                    Err(e) => { log.flush()?; bail!("agent {peer}: {e}") }
                    Ok(Frame::Meta(m)) | Ok(Frame::End(m)) if m.len() as u32 <= proto::MAX_FRAME => {
                        // Validate before storing: it must be a run description.
                        let meta = crate::rundir::meta::Meta::parse(&m, &format!("agent {peer}'s meta"))?;
                        let done = meta.status == crate::rundir::meta::Status::Complete;
                        rundir::write_json(&gdir.join(rundir::META), &meta)?;
                        if done {
                            complete = true;
                            break;
                        }
                    }
                    Ok(Frame::Events(evs)) => {
                        for e in &evs {
                            log.append(e)?;
                        }
                        log.flush()?;
                    }
                    Ok(Frame::Pong { t1, t2, t3 }) => {
                        samples.push((t1, t2, t3, crate::kernel::monotonic_ns()));
                    }
                    Ok(Frame::File { kind, data }) => {
                        std::fs::write(gdir.join(kind.file_name()), &data)?;
                    }
                    Ok(other) => bail!("agent {peer} sent an unexpected {} frame", other.name()),
                }
            }
            _ = ping.tick(), if !stopped => {
                proto::write_frame(&mut wr, &Frame::Ping { t1: crate::kernel::monotonic_ns() }).await?;
            }
            _ = stop.changed(), if !stopped => {
                stopped = true;
                proto::write_frame(&mut wr, &Frame::Stop).await?;
            }
        }
    }
    log.flush()?;
    let clock = estimate(&guest, &samples);
    Ok(AgentResult {
        guest,
        events: log.records,
        clock,
        complete,
    })
}

/// NTP-style offset from round trips (t1 host send, t2 guest receive, t3
/// guest send, t4 host receive): the sample with the least delay.
pub fn estimate(guest: &str, samples: &[(u64, u64, u64, u64)]) -> Option<ClockOffset> {
    let best = samples
        .iter()
        .filter(|(t1, t2, t3, t4)| t4 >= t1 && t3 >= t2)
        .min_by_key(|(t1, t2, t3, t4)| (t4 - t1) - (t3 - t2))?;
    let (t1, t2, t3, t4) = *best;
    let offset = ((t2 as i128 - t1 as i128) + (t3 as i128 - t4 as i128)) / 2;
    let delay = (t4 - t1) - (t3 - t2);
    Some(ClockOffset {
        guest: guest.to_string(),
        offset_ns: offset as i64,
        error_ns: delay / 2,
        method: "ping".into(),
        samples: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_from_the_least_delayed_round_trip() {
        // Guest clock 1000 ns ahead; delays 100+100 and 10+10.
        let s = [(0, 1100, 1100, 200), (500, 1510, 1510, 520)];
        let c = estimate("g", &s).expect("estimate");
        assert_eq!(c.offset_ns, 1000);
        assert_eq!(c.error_ns, 10);
        assert!(estimate("g", &[]).is_none());
    }
}
