//! `hvprof agent`: runs inside a guest, attaches the guest side of the
//! catalog (its NIC driver, TCP, scheduler, CPU samples) and streams the
//! events to the host's collector, authenticated with a shared token. It
//! connects only to a collector on a directly attached network (the test
//! network), never listens, and never acts on anything but clock samples
//! and "stop".

pub mod collector;
pub mod proto;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use proto::{FileKind, Frame};
use tokio::{net::TcpStream, signal::unix::SignalKind, sync::mpsc};

use crate::recorder::{self, Recorder};

/// Record inside a guest and stream to the host's collector.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The collector (`hvprof record --collect ADDR` on the host), on the
    /// test network.
    #[arg(long, value_name = "ADDR")]
    pub collector: SocketAddr,
    /// File holding the shared token (the collector's `--token`).
    #[arg(long, value_name = "FILE")]
    pub token: PathBuf,
    /// Probes to attach (names, paths or layers); default: all available.
    #[arg(short, long = "probe", value_name = "NAME")]
    pub probes: Vec<String>,
    /// Devices whose packets to trace (`[NETNS:]IFNAME`), e.g. the guest NIC.
    #[arg(long = "dev", value_name = "[NETNS:]IFNAME")]
    pub devices: Vec<String>,
    /// CPU sampling frequency per CPU, in Hz.
    #[arg(short = 'F', long, value_name = "HZ", default_value_t = crate::paths::cpu::DEFAULT_HZ, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub freq: u64,
    /// Kernel ring buffer size in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ringbuf_mib: u32,
    /// Stop after this long even if the collector has not said stop.
    #[arg(short, long, value_name = "D", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Seconds to keep retrying the connection to the collector.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub connect_timeout: u64,
}

/// Events are sent in batches of at most this many bytes.
const BATCH_BYTES: usize = 256 * 1024;

impl AgentArgs {
    pub fn run(self) -> Result<ExitCode> {
        let token = proto::read_token(&self.token)?;
        check_test_network(self.collector.ip())?;
        recorder::select(&self.probes)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        rt.block_on(self.stream(token))
    }

    async fn stream(self, token: Vec<u8>) -> Result<ExitCode> {
        let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
        let stream = connect(self.collector, Duration::from_secs(self.connect_timeout)).await?;
        let (mut rd, mut wr) = stream.into_split();
        // Handshake.
        let challenge = tokio::time::timeout(Duration::from_secs(10), proto::read_frame(&mut rd))
            .await
            .context("collector sent no challenge")??;
        let Frame::Challenge { version, nonce } = challenge else {
            bail!("collector sent {} instead of a challenge", challenge.name());
        };
        if version != proto::VERSION {
            return Err(proto::ProtoError::Version(version).into());
        }
        proto::write_frame(
            &mut wr,
            &Frame::Auth {
                mac: proto::mac(&token, &nonce),
            },
        )
        .await?;
        match tokio::time::timeout(Duration::from_secs(10), proto::read_frame(&mut rd)).await {
            Ok(Ok(Frame::Accept)) => {}
            _ => bail!(
                "the collector at {} refused this agent (wrong token?)",
                self.collector
            ),
        }
        // Frames from the collector: only clock samples and stop.
        let (tx, mut from_collector) = mpsc::channel::<Frame>(64);
        tokio::spawn(async move {
            while let Ok(f) = proto::read_frame(&mut rd).await {
                if tx.send(f).await.is_err() {
                    break;
                }
            }
        });

        let opts = recorder::Options {
            probes: self.probes.clone(),
            devices: self.devices.clone(),
            ringbuf_mib: self.ringbuf_mib,
            freq: self.freq,
            load_window: false,
            tasks: Default::default(),
            max_sockets: crate::paths::tcp::DEFAULT_MAX_SOCKETS,
            bpf_stats: false,
            all_tcp_states: false,
        };
        let mut rec = Recorder::start(&opts, "guest", &[])?;
        proto::write_frame(&mut wr, &Frame::Meta(serde_json::to_vec(&rec.meta)?)).await?;
        eprintln!(
            "hvprof agent: streaming {} probe(s) to {}",
            rec.attached().len(),
            self.collector
        );
        let deadline = self.duration.map(|d| tokio::time::Instant::now() + d);
        let mut drain_tick = tokio::time::interval(recorder::DRAIN_EVERY);
        let mut symbolize_tick = tokio::time::interval(Duration::from_secs(1));
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut exit = ExitCode::SUCCESS;
        let result: Result<()> = async {
            loop {
                let mut push = |r: &[u8]| -> Result<()> {
                    batch_bytes += r.len() + 4;
                    batch.push(r.to_vec());
                    Ok(())
                };
                tokio::select! {
                    r = rec.wait_and_drain(&mut push) => r?,
                    _ = drain_tick.tick() => rec.drain(&mut push)?,
                    _ = symbolize_tick.tick() => rec.stacks.symbolize_pending(),
                    f = from_collector.recv() => match f {
                        Some(Frame::Ping { t1 }) => {
                            let t2 = crate::kernel::monotonic_ns();
                            let pong = Frame::Pong { t1, t2, t3: crate::kernel::monotonic_ns() };
                            proto::write_frame(&mut wr, &pong).await?;
                        }
                        Some(Frame::Stop) | None => break,
                        Some(other) => bail!("collector sent an unexpected {} frame", other.name()),
                    },
                    _ = recorder::sleep_until(deadline) => break,
                    _ = sigint.recv() => { exit = ExitCode::from(130); break }
                    _ = sigterm.recv() => { exit = ExitCode::from(143); break }
                }
                if !batch.is_empty() {
                    send_batch(&mut wr, &mut batch, &mut batch_bytes).await?;
                }
            }
            Ok(())
        }
        .await;
        let fin = rec.finish(|r| {
            batch.push(r.to_vec());
            Ok(())
        });
        result?;
        let mut fin = fin?;
        send_batch(&mut wr, &mut batch, &mut batch_bytes).await?;
        let folded = fin.stacks.folded();
        if !folded.is_empty() {
            proto::write_frame(
                &mut wr,
                &Frame::File {
                    kind: FileKind::Stacks,
                    data: folded.into_bytes(),
                },
            )
            .await?;
        }
        if let Some(s) = &fin.sched {
            proto::write_frame(
                &mut wr,
                &Frame::File {
                    kind: FileKind::Threads,
                    data: serde_json::to_vec(s)?,
                },
            )
            .await?;
        }
        let summary = serde_json::json!({ "lost": fin.lost, "probes": fin.stats, "samples": fin.stacks.samples });
        proto::write_frame(
            &mut wr,
            &Frame::File {
                kind: FileKind::Summary,
                data: serde_json::to_vec(&summary)?,
            },
        )
        .await?;
        proto::write_frame(&mut wr, &Frame::End(serde_json::to_vec(&fin.meta)?)).await?;
        eprintln!("hvprof agent: done");
        Ok(exit)
    }
}

async fn send_batch(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    batch: &mut Vec<Vec<u8>>,
    bytes: &mut usize,
) -> Result<()> {
    // Keep every frame under the protocol limit.
    while !batch.is_empty() {
        let mut size = 0;
        let n = batch
            .iter()
            .take_while(|r| {
                size += r.len() + 4;
                size <= BATCH_BYTES
            })
            .count()
            .max(1);
        let part: Vec<Vec<u8>> = batch.drain(..n).collect();
        proto::write_frame(wr, &Frame::Events(part)).await?;
    }
    *bytes = 0;
    Ok(())
}

async fn connect(addr: SocketAddr, patience: Duration) -> Result<TcpStream> {
    let until = tokio::time::Instant::now() + patience;
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= until => {
                bail!("cannot reach the collector at {addr}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Interfaces that carry a default route: the way out, never the test
/// network.
fn default_route_interfaces() -> Vec<String> {
    std::fs::read_to_string("/proc/net/route")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (iface, dest) = (f.next()?, f.next()?);
            (dest == "00000000").then(|| iface.to_string())
        })
        .collect()
}

/// The agent talks only on the test network: loopback, or an address
/// inside the subnet of one of this machine's interfaces that is not the
/// way out (no default route through it).
fn check_test_network(ip: IpAddr) -> Result<()> {
    if ip.is_loopback() {
        return Ok(());
    }
    let IpAddr::V4(v4) = ip else {
        bail!("collector {ip}: the agent speaks IPv4 on the test network only");
    };
    let target = u32::from(v4);
    let outward = default_route_interfaces();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        bail!(
            "cannot list network interfaces: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut ok = false;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_netmask.is_null() {
            // SAFETY: family checked before the cast.
            let (addr, mask) = unsafe {
                if i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    (
                        Some(u32::from_be(a.sin_addr.s_addr)),
                        u32::from_be(m.sin_addr.s_addr),
                    )
                } else {
                    (None, 0)
                }
            };
            // SAFETY: ifa_name is a NUL-terminated interface name.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
            if let Some(a) = addr
                && mask != 0
                && a & mask == target & mask
                && !outward.iter().any(|o| *o == name)
            {
                ok = true;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: freeing what getifaddrs allocated.
    unsafe { libc::freeifaddrs(ifap) };
    if !ok {
        bail!(
            "collector {ip} is not on a directly attached network; the agent only talks on the test network"
        );
    }
    Ok(())
}
