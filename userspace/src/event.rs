//! Decoded events: the raw `#[repr(C)]` records of `hvprof-common`, turned
//! into typed values by the path that owns each kind.

use hvprof_common::{DevPacketEvent, EventHeader, SampleEvent, SockStateEvent, kind};
use serde::Serialize;

use crate::paths::{cpu, dev, tcp};

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("{kind} record of {len} bytes is truncated")]
    Truncated { kind: &'static str, len: usize },
}

/// One event, as `hvprof dump` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub ts_ns: u64,
    pub probe: &'static str,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    SockState(tcp::SockState),
    CpuSample(cpu::CpuSample),
    DevPacket(dev::DevPacket),
}

/// Decodes one record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let h = EventHeader::read(bytes).ok_or(DecodeError::Short(bytes.len()))?;
    let body = match h.kind {
        kind::SOCK_STATE => {
            let ev = SockStateEvent::read(bytes).ok_or(DecodeError::Truncated {
                kind: "sock_state",
                len: bytes.len(),
            })?;
            Body::SockState(tcp::decode(&ev))
        }
        kind::CPU_SAMPLE => {
            let ev = SampleEvent::read(bytes).ok_or(DecodeError::Truncated {
                kind: "cpu_sample",
                len: bytes.len(),
            })?;
            Body::CpuSample(cpu::decode(&ev))
        }
        kind::DEV_PACKET => {
            let ev = DevPacketEvent::read(bytes).ok_or(DecodeError::Truncated {
                kind: "dev_packet",
                len: bytes.len(),
            })?;
            Body::DevPacket(dev::decode(&ev))
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Event {
        ts_ns: h.ts_ns,
        probe: probe_name(h.probe),
        cpu: h.cpu,
        pid: h.pid,
        tid: h.tid,
        comm: comm(&h.comm),
        body,
    })
}

/// Name of a probe id, from the catalog.
pub fn probe_name(id: u16) -> &'static str {
    static NAMES: std::sync::OnceLock<std::collections::HashMap<u16, &'static str>> =
        std::sync::OnceLock::new();
    NAMES
        .get_or_init(|| {
            crate::catalog::all()
                .into_iter()
                .filter_map(|s| Some((s.id?, s.name)))
                .collect()
        })
        .get(&id)
        .copied()
        .unwrap_or("unknown")
}

/// A NUL-padded `comm` as text.
pub fn comm(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}
