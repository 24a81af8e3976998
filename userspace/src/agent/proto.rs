//! The agent protocol between `hvprof agent` (in a guest) and the
//! collector (in `hvprof record --collect` on the host): length-prefixed
//! frames over TCP, a challenge–response on a shared token (HMAC-SHA256)
//! before anything else, hard limits on every size. The agent only ever
//! sends its own recording; the collector can only ask it for clock
//! samples and to stop — nothing names a file or a command.
//!
//! Frame: `u32 len (LE, type + payload) | u8 type | payload`.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const VERSION: u16 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;
/// Largest token file.
pub const MAX_TOKEN: u64 = 4096;
pub const NONCE_LEN: usize = 32;
const DOMAIN: &[u8] = b"hvprof-agent-v1";

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "frame of {0} bytes exceeds the limit ({MAX_FRAME} bytes; {MAX_FRAME_BEFORE_AUTH} before authenticating)"
    )]
    TooLarge(u32),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("authentication failed: wrong token")]
    BadToken,
    #[error("protocol version {0} is not supported (this hvprof speaks {VERSION})")]
    Version(u16),
}

/// Files an agent may hand over at the end: a fixed set, never a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Stacks = 1,
    Threads = 2,
    Summary = 3,
}

impl FileKind {
    pub fn file_name(self) -> &'static str {
        match self {
            FileKind::Stacks => "stacks.folded",
            FileKind::Threads => "threads.json",
            FileKind::Summary => "summary.json",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Collector → agent: prove you hold the token.
    Challenge {
        version: u16,
        nonce: [u8; NONCE_LEN],
    },
    /// Agent → collector: HMAC-SHA256(token, domain ‖ nonce).
    Auth { mac: [u8; 32] },
    /// Collector → agent: authenticated, start.
    Accept,
    /// Agent → collector: the guest's `meta.json`.
    Meta(Vec<u8>),
    /// Agent → collector: raw event records.
    Events(Vec<Vec<u8>>),
    /// Collector → agent: clock sample request, host CLOCK_MONOTONIC.
    Ping { t1: u64 },
    /// Agent → collector: guest receive and send times.
    Pong { t1: u64, t2: u64, t3: u64 },
    /// Collector → agent: stop recording and finish.
    Stop,
    /// Agent → collector: one of the fixed end-of-run files.
    File { kind: FileKind, data: Vec<u8> },
    /// Agent → collector: final `meta.json`; the agent closes after it.
    End(Vec<u8>),
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Challenge { .. } => "challenge",
            Frame::Auth { .. } => "auth",
            Frame::Accept => "accept",
            Frame::Meta(_) => "meta",
            Frame::Events(_) => "events",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Stop => "stop",
            Frame::File { .. } => "file",
            Frame::End(_) => "end",
        }
    }

    /// Type byte and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        match self {
            Frame::Challenge { version, nonce } => {
                out.push(1);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Frame::Auth { mac } => {
                out.push(2);
                out.extend_from_slice(mac);
            }
            Frame::Accept => out.push(3),
            Frame::Meta(m) => {
                out.push(4);
                out.extend_from_slice(m);
            }
            Frame::Events(evs) => {
                out.push(5);
                for e in evs {
                    out.extend_from_slice(&(e.len() as u32).to_le_bytes());
                    out.extend_from_slice(e);
                }
            }
            Frame::Ping { t1 } => {
                out.push(6);
                out.extend_from_slice(&t1.to_le_bytes());
            }
            Frame::Pong { t1, t2, t3 } => {
                out.push(7);
                for t in [t1, t2, t3] {
                    out.extend_from_slice(&t.to_le_bytes());
                }
            }
            Frame::Stop => out.push(8),
            Frame::File { kind, data } => {
                out.push(9);
                out.push(*kind as u8);
                out.extend_from_slice(data);
            }
            Frame::End(m) => {
                out.push(10);
                out.extend_from_slice(m);
            }
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out
    }

    /// Parses the body of one frame (type byte first).
    pub fn decode(body: &[u8]) -> Result<Frame, ProtoError> {
        let (&ty, p) = body.split_first().ok_or(ProtoError::Empty)?;
        let bad = |what: &'static str, why: &str| ProtoError::Malformed {
            what,
            why: why.to_string(),
        };
        let u64_at = |i: usize| -> Option<u64> {
            p.get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Ok(match ty {
            1 => {
                if p.len() != 2 + NONCE_LEN {
                    return Err(bad("challenge", "wrong length"));
                }
                let mut nonce = [0u8; NONCE_LEN];
                nonce.copy_from_slice(&p[2..]);
                Frame::Challenge {
                    version: u16::from_le_bytes([p[0], p[1]]),
                    nonce,
                }
            }
            2 => Frame::Auth {
                mac: p.try_into().map_err(|_| bad("auth", "wrong length"))?,
            },
            3 if p.is_empty() => Frame::Accept,
            4 => Frame::Meta(p.to_vec()),
            5 => {
                let mut evs = Vec::new();
                let mut rest = p;
                while !rest.is_empty() {
                    let len = rest
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .ok_or_else(|| bad("events", "truncated length"))?;
                    let rec = rest
                        .get(4..4 + len)
                        .ok_or_else(|| bad("events", "record runs past the frame"))?;
                    evs.push(rec.to_vec());
                    rest = &rest[4 + len..];
                }
                Frame::Events(evs)
            }
            6 if p.len() == 8 => Frame::Ping {
                t1: u64_at(0).ok_or_else(|| bad("ping", "short"))?,
            },
            7 if p.len() == 24 => Frame::Pong {
                t1: u64_at(0).ok_or_else(|| bad("pong", "short"))?,
                t2: u64_at(8).ok_or_else(|| bad("pong", "short"))?,
                t3: u64_at(16).ok_or_else(|| bad("pong", "short"))?,
            },
            8 if p.is_empty() => Frame::Stop,
            9 => {
                let (&k, data) = p.split_first().ok_or_else(|| bad("file", "empty"))?;
                let kind = match k {
                    1 => FileKind::Stacks,
                    2 => FileKind::Threads,
                    3 => FileKind::Summary,
                    _ => return Err(bad("file", "unknown file kind")),
                };
                Frame::File {
                    kind,
                    data: data.to_vec(),
                }
            }
            10 => Frame::End(p.to_vec()),
            3 | 6 | 7 | 8 => return Err(bad("control", "wrong length")),
            other => return Err(ProtoError::UnknownType(other)),
        })
    }
}

/// Reads one frame, refusing oversized ones before allocating.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    read_frame_within(r, MAX_FRAME).await
}

/// Largest frame a peer may send before it has authenticated (an `Auth`
/// frame is 33 bytes): an unauthenticated peer can't make the collector
/// hold more.
pub const MAX_FRAME_BEFORE_AUTH: u32 = 64;

/// Reads one frame of at most `max` bytes, refusing larger ones before
/// allocating.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<Frame, ProtoError> {
    let len = r.read_u32_le().await?;
    if len == 0 {
        return Err(ProtoError::Empty);
    }
    if len > max.min(MAX_FRAME) {
        return Err(ProtoError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Frame::decode(&body)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), ProtoError> {
    w.write_all(&f.encode()).await?;
    Ok(())
}

/// The agent's answer to a challenge.
pub fn mac(token: &[u8], nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC takes any key length");
    m.update(DOMAIN);
    m.update(nonce);
    m.finalize().into_bytes().into()
}

/// Checks an answer in constant time.
pub fn verify(token: &[u8], nonce: &[u8; NONCE_LEN], answer: &[u8; 32]) -> Result<(), ProtoError> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC takes any key length");
    m.update(DOMAIN);
    m.update(nonce);
    m.verify_slice(answer).map_err(|_| ProtoError::BadToken)
}

/// Reads a token file: 16 bytes to 4 KiB, surrounding whitespace ignored.
pub fn read_token(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::{Context as _, bail};
    let meta = std::fs::metadata(path)
        .with_context(|| format!("token file {} is missing", path.display()))?;
    if meta.len() > MAX_TOKEN {
        bail!(
            "token file {} is larger than {MAX_TOKEN} bytes",
            path.display()
        );
    }
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.trim_ascii().to_vec();
    if token.len() < 16 {
        bail!(
            "token in {} is shorter than 16 bytes; use e.g. `head -c 32 /dev/urandom | base64 > {}`",
            path.display(),
            path.display()
        );
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Challenge {
                version: VERSION,
                nonce: [7; NONCE_LEN],
            },
            Frame::Auth { mac: [1; 32] },
            Frame::Accept,
            Frame::Meta(b"{}".to_vec()),
            Frame::Events(vec![b"abc".to_vec(), Vec::new(), vec![9; 100]]),
            Frame::Ping { t1: 5 },
            Frame::Pong {
                t1: 1,
                t2: 2,
                t3: 3,
            },
            Frame::Stop,
            Frame::File {
                kind: FileKind::Threads,
                data: b"x".to_vec(),
            },
            Frame::End(b"{}".to_vec()),
        ];
        for f in frames {
            let bytes = f.encode();
            assert_eq!(Frame::decode(&bytes[4..]).expect("decodes"), f);
        }
    }

    #[test]
    fn before_authenticating_only_small_frames_are_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let auth = Frame::Auth { mac: [1; 32] }.encode();
        let got = rt.block_on(read_frame_within(&mut &auth[..], MAX_FRAME_BEFORE_AUTH));
        assert!(matches!(got, Ok(Frame::Auth { .. })));
        // A 1 MiB length prefix is refused before anything is allocated.
        let big = (1u32 << 20).to_le_bytes();
        let got = rt.block_on(read_frame_within(&mut &big[..], MAX_FRAME_BEFORE_AUTH));
        assert!(matches!(got, Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn hostile_frames_are_errors() {
        assert!(matches!(Frame::decode(&[]), Err(ProtoError::Empty)));
        assert!(matches!(
            Frame::decode(&[99]),
            Err(ProtoError::UnknownType(99))
        ));
        assert!(Frame::decode(&[5, 0xff, 0xff, 0xff, 0x7f, 1]).is_err());
        assert!(Frame::decode(&[9, 42, 1]).is_err());
        assert!(Frame::decode(&[6, 1, 2]).is_err());
        assert!(Frame::decode(&[2, 1, 2, 3]).is_err());
    }

    #[test]
    fn only_the_right_token_verifies() {
        let nonce = [3u8; NONCE_LEN];
        let good = mac(b"0123456789abcdef", &nonce);
        assert!(verify(b"0123456789abcdef", &nonce, &good).is_ok());
        assert!(verify(b"0123456789abcdeX", &nonce, &good).is_err());
        assert!(verify(b"0123456789abcdef", &[4u8; NONCE_LEN], &good).is_err());
    }
}
