//! Helpers shared by the fuzz targets and the seed generator
//! (`examples/seeds.rs`): raw event records laid out exactly as the eBPF
//! programs write them, and a way to drive the async frame reader over a
//! byte slice without a runtime.

use std::{
    future::Future,
    mem::{offset_of, size_of},
    task::{Context, Poll, Waker},
};

use hvprof_common::{
    DevPacketEvent, EventHeader, FuncEvent, SOCK_STEPS, SampleEvent, SockLifeEvent, kind, sock_life,
};

/// The header fields of one event.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub ts_ns: u64,
    pub probe: u16,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: &'a str,
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A zeroed record of `T` with its header filled in (the header is the
/// first field of every event struct).
fn record<T>(h: &Header, kind: u16) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<T>()];
    put(
        &mut b,
        offset_of!(EventHeader, ts_ns),
        &h.ts_ns.to_le_bytes(),
    );
    put(&mut b, offset_of!(EventHeader, kind), &kind.to_le_bytes());
    put(
        &mut b,
        offset_of!(EventHeader, probe),
        &h.probe.to_le_bytes(),
    );
    put(&mut b, offset_of!(EventHeader, cpu), &h.cpu.to_le_bytes());
    put(&mut b, offset_of!(EventHeader, pid), &h.pid.to_le_bytes());
    put(&mut b, offset_of!(EventHeader, tid), &h.tid.to_le_bytes());
    let comm = h.comm.as_bytes();
    let n = comm.len().min(hvprof_common::COMM_LEN - 1);
    put(&mut b, offset_of!(EventHeader, comm), &comm[..n]);
    b
}

/// A function-entry event (`kind::FUNC`).
pub fn func_event(h: &Header, ip: u64, arg0: u64) -> Vec<u8> {
    let mut b = record::<FuncEvent>(h, kind::FUNC);
    put(&mut b, offset_of!(FuncEvent, ip), &ip.to_le_bytes());
    put(&mut b, offset_of!(FuncEvent, arg0), &arg0.to_le_bytes());
    b
}

/// A TCP socket's life (`kind::SOCK_LIFE`) with these `(old, new)` state
/// changes; `v6` picks the address family.
pub fn sock_life_event(h: &Header, v6: bool, steps: &[(u8, u8)]) -> Vec<u8> {
    let mut b = record::<SockLifeEvent>(h, kind::SOCK_LIFE);
    put(
        &mut b,
        offset_of!(SockLifeEvent, skaddr),
        &0xffff_8880_1234_5600u64.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(SockLifeEvent, bytes_received),
        &4096u64.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(SockLifeEvent, bytes_acked),
        &1024u64.to_le_bytes(),
    );
    let family: u16 = if v6 { 10 } else { 2 };
    put(
        &mut b,
        offset_of!(SockLifeEvent, family),
        &family.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(SockLifeEvent, sport),
        &43210u16.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(SockLifeEvent, dport),
        &80u16.to_le_bytes(),
    );
    let n = steps.len().min(SOCK_STEPS);
    put(&mut b, offset_of!(SockLifeEvent, steps), &[n as u8]);
    let closed = steps.last().is_some_and(|&(_, new)| new == 7);
    put(
        &mut b,
        offset_of!(SockLifeEvent, flags),
        &[u8::from(closed) * sock_life::CLOSED],
    );
    for (i, &(old, new)) in steps.iter().take(n).enumerate() {
        let ts = h.ts_ns + 1000 * i as u64;
        put(
            &mut b,
            offset_of!(SockLifeEvent, step_ns) + 8 * i,
            &ts.to_le_bytes(),
        );
        put(&mut b, offset_of!(SockLifeEvent, step_old) + i, &[old]);
        put(&mut b, offset_of!(SockLifeEvent, step_new) + i, &[new]);
    }
    let (s, d): ([u8; 16], [u8; 16]) = if v6 {
        let mut s = [0u8; 16];
        s[15] = 1;
        let mut d = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        d[1] = 0x42;
        (s, d)
    } else {
        let mut s = [0u8; 16];
        s[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[10, 0, 0, 2]);
        (s, d)
    };
    put(&mut b, offset_of!(SockLifeEvent, saddr), &s);
    put(&mut b, offset_of!(SockLifeEvent, daddr), &d);
    b
}

/// A packet at a device boundary (`kind::DEV_PACKET`).
pub fn dev_packet_event(h: &Header, recv: bool, ifname: &str) -> Vec<u8> {
    let mut b = record::<DevPacketEvent>(h, kind::DEV_PACKET);
    put(
        &mut b,
        offset_of!(DevPacketEvent, skbaddr),
        &0xffff_8880_abcd_0000u64.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, netns),
        &4026531840u32.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, ifindex),
        &3u32.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, len),
        &1514u32.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, seq),
        &1000u32.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, ack),
        &2000u32.to_le_bytes(),
    );
    put(&mut b, offset_of!(DevPacketEvent, saddr), &[10, 0, 0, 1]);
    put(&mut b, offset_of!(DevPacketEvent, daddr), &[10, 0, 0, 2]);
    put(
        &mut b,
        offset_of!(DevPacketEvent, sport),
        &43210u16.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, dport),
        &80u16.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(DevPacketEvent, payload),
        &1448u16.to_le_bytes(),
    );
    put(&mut b, offset_of!(DevPacketEvent, flags), &[0x18]);
    put(&mut b, offset_of!(DevPacketEvent, dir), &[u8::from(recv)]);
    let name = ifname.as_bytes();
    let n = name.len().min(15);
    put(&mut b, offset_of!(DevPacketEvent, ifname), &name[..n]);
    b
}

/// A CPU sample with `kframes` kernel and `uframes` user frames
/// (`kind::CPU_SAMPLE`); byte counts as `bpf_get_stack` reports them.
pub fn sample_event(h: &Header, kframes: usize, uframes: usize) -> Vec<u8> {
    let mut b = record::<SampleEvent>(h, kind::CPU_SAMPLE);
    let k = kframes.min(hvprof_common::MAX_FRAMES);
    let u = uframes.min(hvprof_common::MAX_FRAMES);
    put(
        &mut b,
        offset_of!(SampleEvent, kstack_bytes),
        &((k * 8) as i32).to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(SampleEvent, ustack_bytes),
        &((u * 8) as i32).to_le_bytes(),
    );
    for i in 0..k {
        let a = 0xffff_ffff_8100_0000u64 + 0x40 * i as u64;
        put(
            &mut b,
            offset_of!(SampleEvent, kstack) + 8 * i,
            &a.to_le_bytes(),
        );
    }
    for i in 0..u {
        let a = 0x5555_5555_0000u64 + 0x10 * i as u64;
        put(
            &mut b,
            offset_of!(SampleEvent, ustack) + 8 * i,
            &a.to_le_bytes(),
        );
    }
    b
}

/// An `events.log` file: magic, version, then `len | crc32 | payload`
/// per record — the writer's framing (`rundir::log::LogWriter`).
pub fn event_log(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(hvprof::rundir::log::MAGIC);
    out.extend_from_slice(&hvprof::rundir::log::VERSION.to_le_bytes());
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(r).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// Runs a future that cannot wait (an async reader over a byte slice) to
/// completion by polling it once.
///
/// # Panics
///
/// If the future is not ready after one poll: over a byte slice that
/// would be a reader waiting for input that can never come.
pub fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a reader over a byte slice returned Pending"),
    }
}
