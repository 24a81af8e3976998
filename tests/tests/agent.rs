//! The guest agent's protocol and its security, on loopback: a collector in
//! `hvprof record --collect`, agents with the right and wrong token,
//! hostile frames, and collectors off the test network.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use hvprof_tests::{
    StderrLines, bpf_lock, bpf_unavailable, hvprof, hvprof_bin, our_bpf_programs, skip,
};
use serde_json::Value;

#[test]
fn agent_rejects_bad_tokens_hostile_frames_and_foreign_networks() {
    if let Some(why) = bpf_unavailable() {
        skip("agent_security", &why);
        return;
    }
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token");
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "fedcba9876543210fedcba9876543210\n").expect("token");
    let short = tmp.path().join("short");
    std::fs::write(&short, "abc").expect("token");
    let t = |p: &std::path::Path| p.to_str().expect("utf8").to_string();

    // Checked before any connection is attempted.
    let out = hvprof(&[
        "agent",
        "--collector",
        "192.0.2.1:7000",
        "--token",
        &t(&token),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on a directly attached network"));
    let out = hvprof(&[
        "agent",
        "--collector",
        "127.0.0.1:7000",
        "--token",
        &t(&short),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shorter than 16 bytes"));

    // Port 0: hvprof binds a free port and says which.
    let run = tmp.path().join("run");
    let mut rec = Command::new(hvprof_bin())
        .args([
            "record",
            "--probe",
            "tcp",
            "-d",
            "8s",
            "--collect",
            "127.0.0.1:0",
            "--token",
            &t(&token),
            "-o",
        ])
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hvprof record runs");
    let mut stderr = StderrLines::of(&mut rec);
    let Some(addr) = stderr.addr_after("collecting guest agents on ", Duration::from_secs(20))
    else {
        panic!("collector never listened; hvprof said {:?}", stderr.said);
    };
    let addr = addr.to_string();

    // Wrong token: refused, and the agent says so.
    let out = hvprof(&[
        "agent",
        "--collector",
        &addr,
        "--token",
        &t(&wrong),
        "--probe",
        "tcp",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A frame claiming 2 GiB: the collector hangs up without allocating.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut challenge = [0u8; 64];
    let _ = s.read(&mut challenge).expect("challenge");
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 0x02]).expect("write");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // Garbage instead of an answer: also hung up on.
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.read(&mut challenge).expect("challenge");
    s.write_all(&[4, 0, 0, 0, 99, 1, 2, 3]).expect("write");
    let _ = s.read_to_end(&mut rest);

    // The right token streams a recording the collector keeps.
    let out = hvprof(&[
        "agent",
        "--collector",
        &addr,
        "--token",
        &t(&token),
        "--probe",
        "tcp",
        "-d",
        "2s",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = rec.wait().expect("record exits");
    let err = stderr.all();
    assert!(status.success(), "record: {err}");
    assert!(err.contains("wrong token"), "refusal reported: {err}");
    assert!(err.contains("exceeds"), "oversized frame reported: {err}");
    let guest = run.join("guest-0");
    assert!(guest.join("events.log").exists(), "guest recording kept");
    assert!(
        !run.join("guest-1").exists(),
        "only the authenticated agent got a directory"
    );
    let meta: Value =
        serde_json::from_slice(&std::fs::read(guest.join("meta.json")).expect("meta"))
            .expect("JSON");
    assert_eq!(meta["status"], "complete");
    let host: Value =
        serde_json::from_slice(&std::fs::read(run.join("meta.json")).expect("meta")).expect("JSON");
    let clock = host["clock_offsets"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["method"] == "ping"))
        .expect("clock offset from round trips");
    // Same machine, same clock: the offset is within its error bound of 0.
    let (off, errb) = (
        clock["offset_ns"].as_i64().expect("offset"),
        clock["error_ns"].as_i64().expect("bound"),
    );
    assert!(off.abs() <= errb + 1_000_000, "offset {off} ± {errb}");
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}
