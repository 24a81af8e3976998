//! Writes the seed corpora under `fuzz/seeds/<target>/` from the real
//! formats: event logs framed like the recorder's, a `meta.json` like
//! `hvprof record` writes, and agent sessions encoded by the protocol
//! code itself. The seeds are committed; rerun after a format change:
//!
//! ```text
//! cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::path::Path;

use anyhow::{Context as _, Result};
use hvprof::{
    agent::{
        collector::ClockOffset,
        proto::{FileKind, Frame, NONCE_LEN, VERSION},
    },
    attach::FunctionAddr,
    rundir::meta::{FORMAT, Meta, Status},
};
use hvprof_common::probe;
use hvprof_fuzz::{
    Header, dev_packet_event, event_log, func_event, sample_event, sock_life_event,
};

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let h = |probe: u16, ts_ns: u64| Header {
        ts_ns,
        probe,
        cpu: 1,
        pid: 4242,
        tid: 4243,
        comm: "haproxy",
    };
    let client = [(7, 2), (2, 1), (1, 4), (4, 5), (5, 7)];
    let server = [(3, 1), (1, 8), (8, 9), (9, 7)];
    let sock4 = sock_life_event(&h(probe::SOCK_STATE, 1_000), false, &client);
    let sock6 = sock_life_event(&h(probe::SOCK_STATE, 2_000), true, &server);
    let xmit = dev_packet_event(&h(probe::DEV_XMIT, 3_000), false, "eth0");
    let recv = dev_packet_event(&h(probe::DEV_RECV, 4_000), true, "tap0");
    let sample = sample_event(&h(probe::CPU_SAMPLE, 5_000), 12, 5);
    let func = func_event(
        &h(probe::FUNC, 6_000),
        0xffff_ffff_c010_0004,
        0xffff_8880_0001_0000,
    );
    let all = vec![
        sock4.clone(),
        sock6.clone(),
        xmit.clone(),
        recv.clone(),
        sample.clone(),
        func.clone(),
    ];

    // events.log: one file per kind, a mixed log, an empty one, a cut tail.
    let mut logs: Vec<(&str, Vec<u8>)> = vec![
        ("empty", event_log(&[])),
        ("sock-life", event_log(&[sock4.clone(), sock6.clone()])),
        ("dev-packet", event_log(&[xmit.clone(), recv.clone()])),
        ("cpu-sample", event_log(std::slice::from_ref(&sample))),
        ("func", event_log(std::slice::from_ref(&func))),
    ];
    let mixed = event_log(&all);
    let cut = mixed[..mixed.len() - 7].to_vec();
    logs.push(("mixed", mixed));
    logs.push(("cut-tail", cut));
    write(&root.join("event_log"), &logs)?;

    // meta.json: a complete guest run, as `hvprof record` writes it. Built
    // as JSON and read with the real parser, so fields added later with
    // defaults need no change here.
    let offset = ClockOffset {
        guest: "guest-0".into(),
        offset_ns: -3_874_644_839_650,
        error_ns: 77_541,
        method: "packets".into(),
        samples: 10_567,
    };
    let probe_status = |name: &str, point: &str, obtained: Option<&str>, reason: &str| {
        serde_json::json!({
            "name": name, "layer": "socket", "path": "tcp", "point": point,
            "wanted": "tracepoint", "obtained": obtained, "reason": reason,
            "fields": ["sk", "oldstate", "newstate"],
        })
    };
    let json = serde_json::json!({
        "format": FORMAT,
        "version": hvprof::rundir::meta::VERSION,
        "hvprof_version": "0.1.0",
        "kernel": "6.12.0-test",
        "topology": "vm-bridge",
        "command": ["tcp-burst", "500"],
        "status": "complete",
        "started_unix_ns": 1_764_063_000_000_000_000u64,
        "monotonic_start_ns": 730_379_000_000u64,
        "ended_unix_ns": 1_764_063_001_000_000_000u64,
        "duration_s": 0.48,
        "ringbuf_bytes": 16u64 << 20,
        "sample_hz": 99,
        "probes": [
            probe_status("tcp:inet_sock_set_state", "sock:inet_sock_set_state", Some("tracepoint"), ""),
            probe_status("virtio:virtnet_poll", "virtnet_poll [virtio_net]", None, "module not loaded"),
        ],
        "functions": [FunctionAddr {
            addr: 0xffff_ffff_c010_0000,
            function: "virtnet_poll".into(),
            probe: "virtio:virtnet_poll".into(),
        }],
        "lost": {"tcp:inet_sock_set_state": 3},
        "clock_offsets": [offset],
    });
    let meta = Meta::parse(&serde_json::to_vec(&json)?, "seed meta.json")?;
    let complete = serde_json::to_vec_pretty(&meta)?;
    let mut recording = meta.clone();
    recording.status = Status::Recording;
    recording.ended_unix_ns = None;
    recording.duration_s = None;
    recording.sample_hz = None;
    recording.functions.clear();
    recording.clock_offsets.clear();
    let recording = serde_json::to_vec(&recording)?;
    write(
        &root.join("meta_json"),
        &[("complete", complete.clone()), ("recording", recording)],
    )?;

    // Agent protocol: each frame alone, and both directions of a session.
    let frames = [
        Frame::Challenge {
            version: VERSION,
            nonce: [0x5a; NONCE_LEN],
        },
        Frame::Auth { mac: [0x11; 32] },
        Frame::Accept,
        Frame::Meta(complete.clone()),
        Frame::Events(all.clone()),
        Frame::Ping { t1: 1_000 },
        Frame::Pong {
            t1: 1_000,
            t2: 2_000,
            t3: 2_100,
        },
        Frame::Stop,
        Frame::File {
            kind: FileKind::Stacks,
            data: b"haproxy-4242/4243;tcp_sendmsg_[k] 7\n".to_vec(),
        },
        Frame::End(complete),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("{i:02}-{}", f.name()), f.encode()))
        .collect();
    let agent_side = [3, 4, 6, 7, 8, 9];
    let session = |pick: &dyn Fn(usize) -> bool| -> Vec<u8> {
        frames
            .iter()
            .enumerate()
            .filter(|(i, _)| pick(*i))
            .flat_map(|(_, f)| f.encode())
            .collect()
    };
    seeds.push((
        "session-from-agent".into(),
        session(&|i| i == 1 || agent_side.contains(&i)),
    ));
    seeds.push((
        "session-from-collector".into(),
        session(&|i| !agent_side.contains(&i) && i != 1),
    ));
    // A bare frame body, for the `Frame::decode` half of the target.
    seeds.push(("body-events".into(), frames[4].encode()[4..].to_vec()));
    let seeds: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    write(&root.join("agent_frames"), &seeds)?;
    Ok(())
}

fn write(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
