//! Decoded events: the raw `#[repr(C)]` records of `hvprof-common`, turned
//! into typed values by the path that owns each kind.

use hvprof_common::{DevPacketEvent, EventHeader, FuncEvent, SampleEvent, SockLifeEvent, kind};
use std::borrow::Cow;

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
    pub probe: Cow<'static, str>,
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
    SockLife(tcp::SockLife),
    CpuSample(cpu::CpuSample),
    DevPacket(dev::DevPacket),
    Func(Func),
}

/// A probed kernel function was entered.
#[derive(Debug, Clone, Serialize)]
pub struct Func {
    pub function: String,
    pub ip: String,
    pub arg0: String,
}

/// What decoding needs from the run: names of probed functions by address.
#[derive(Debug, Default)]
pub struct Context {
    /// (address, function, probe), sorted by address.
    functions: Vec<(u64, String, String)>,
}

impl Context {
    pub fn new(functions: &[crate::attach::FunctionAddr]) -> Self {
        let mut f: Vec<_> = functions
            .iter()
            .map(|f| (f.addr, f.function.clone(), f.probe.clone()))
            .collect();
        f.sort();
        Self { functions: f }
    }

    /// The probed function at `ip` (the probe may sit a few bytes in, past
    /// an `endbr64`).
    fn function(&self, ip: u64) -> Option<&(u64, String, String)> {
        let i = self.functions.partition_point(|(a, _, _)| *a <= ip);
        self.functions[..i].last().filter(|(a, _, _)| ip - a < 64)
    }
}

/// Decodes one record.
pub fn decode(bytes: &[u8], ctx: &Context) -> Result<Event, DecodeError> {
    let h = EventHeader::read(bytes).ok_or(DecodeError::Short(bytes.len()))?;
    let mut probe = Cow::Borrowed(probe_name(h.probe));
    let body = match h.kind {
        kind::SOCK_LIFE => {
            let ev = sized(SockLifeEvent::read(bytes), "sock_life", bytes)?;
            Body::SockLife(tcp::decode(&ev))
        }
        kind::CPU_SAMPLE => {
            let ev = sized(SampleEvent::read(bytes), "cpu_sample", bytes)?;
            Body::CpuSample(cpu::decode(&ev))
        }
        kind::DEV_PACKET => {
            let ev = sized(DevPacketEvent::read(bytes), "dev_packet", bytes)?;
            Body::DevPacket(dev::decode(&ev))
        }
        kind::FUNC => {
            let ev = sized(FuncEvent::read(bytes), "func", bytes)?;
            let f = ctx.function(ev.ip);
            if let Some((_, _, p)) = f {
                probe = Cow::Owned(p.clone());
            }
            Body::Func(Func {
                function: f.map_or_else(|| "?".to_string(), |(_, name, _)| name.clone()),
                ip: format!("{:#x}", ev.ip),
                arg0: format!("{:#x}", ev.arg0),
            })
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    Ok(Event {
        ts_ns: h.ts_ns,
        probe,
        cpu: h.cpu,
        pid: h.pid,
        tid: h.tid,
        comm: comm(&h.comm),
        body,
    })
}

/// A record's body, or why it is too short for its kind.
fn sized<T>(body: Option<T>, kind: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    body.ok_or(DecodeError::Truncated {
        kind,
        len: bytes.len(),
    })
}

/// Name of a probe id, from the catalog.
pub fn probe_name(id: u16) -> &'static str {
    if id == hvprof_common::probe::FUNC {
        return crate::attach::FUNC_PROBES;
    }
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
