//! Host and guest recorded together (issue: per-layer probes): `hvprof
//! bench --record` on real QEMU guests with the agent inside, the guest's
//! NIC-driver events, the host's TAP events, packets matched across the
//! boundary and the guest clock's offset with its error bound.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use hvprof_tests::{
    assert_ok, bpf_lock, bpf_unavailable, dump_events, hvprof, hvprof_bin, json_lines,
    our_bpf_programs, read_json, skip, topology_support::vm_unavailable,
};

/// Runs `hvprof cleanup` when the test ends, even by a panic, so a failed
/// run leaves no guest, namespace or TAP behind.
struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        let _ = Command::new(hvprof_bin()).arg("cleanup").output();
    }
}
use serde_json::Value;

/// Records one 0-byte point on `topology`; returns the run directory.
fn record(topology: &str, out: &Path) -> std::path::PathBuf {
    let output = Command::new(hvprof_bin())
        .args([
            "bench",
            "--record",
            "--topology",
            topology,
            "--sizes",
            "0",
            "-d",
            "2s",
            "-c",
            "4",
            "-o",
        ])
        .arg(out)
        .output()
        .expect("hvprof runs");
    assert!(
        output.status.success(),
        "{topology}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out.join("runs").join(format!("{topology}-0"))
}

fn functions(run: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = hvprof(&["dump", run.to_str().expect("utf8")]);
    assert!(out.status.success());
    let mut m = std::collections::BTreeMap::new();
    for e in json_lines(&out.stdout) {
        if e["kind"] == "func" {
            *m.entry(e["function"].as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
    }
    m
}

#[test]
fn guests_record_their_own_nic_drivers_matched_with_the_host_tap() {
    if let Some(why) = bpf_unavailable().or_else(vm_unavailable) {
        skip("vm_record", &why);
        return;
    }
    let _g = bpf_lock();
    let _cleanup = CleanupGuard;
    let tmp = tempfile::tempdir().expect("tempdir");
    for (topology, driver_fn) in [
        ("vm-virtio", "start_xmit"),
        ("vm-vmxnet3", "vmxnet3_xmit_frame"),
        ("vm-e1000", "e1000_xmit_frame"),
    ] {
        let run = record(topology, &tmp.path().join(topology));
        let guest = run.join("guest-0");
        // The guest recorded its own driver, by kprobe.
        let gmeta = read_json(&guest.join("meta.json"));
        assert_eq!(gmeta["status"], "complete", "{topology}");
        let fns = functions(&guest);
        assert!(
            fns.get(driver_fn).copied().unwrap_or(0) > 0,
            "{topology}: no {driver_fn} events in the guest: {fns:?}"
        );
        let kprobed = gmeta["probes"]
            .as_array()
            .expect("probes")
            .iter()
            .filter(|p| p["obtained"] == "kprobe")
            .count();
        assert!(kprobed > 0, "{topology}: nothing kprobed in the guest");
        // The host has no kprobes here: the same rows fall back.
        let hmeta = read_json(&run.join("meta.json"));
        let host_row = hmeta["probes"]
            .as_array()
            .expect("probes")
            .iter()
            .find(|p| p["name"] == "virtio:start_xmit")
            .expect("row on the host")
            .clone();
        let guest_row = gmeta["probes"]
            .as_array()
            .expect("probes")
            .iter()
            .find(|p| p["name"] == "virtio:start_xmit")
            .expect("row in the guest")
            .clone();
        assert_ne!(
            host_row["obtained"], guest_row["obtained"],
            "{topology}: fallbacks differ"
        );

        // Packets matched across the boundary; clock offset bounded.
        let summary = read_json(&run.join("summary.json"));
        let g = &summary["guests"][0];
        assert_eq!(g["complete"], true, "{topology}: {g}");
        let frac = g["packets"]["matched_fraction"].as_f64().unwrap_or(0.0);
        // Retransmissions and duplicate ACKs are ambiguous and left out;
        // a slow emulated guest on a busy host has more of them.
        assert!(frac > 0.8, "{topology}: matched fraction {frac}");
        assert!(g["packets"]["host_to_guest"].as_u64().unwrap_or(0) > 0);
        assert!(g["packets"]["guest_to_host"].as_u64().unwrap_or(0) > 0);
        // The offset with the smaller bound is used: from packets, or from
        // the agent's ping when a drifting guest clock widened the packets'
        // bound (the packets' estimate is checked in meta.json below).
        assert!(
            g["clock_method"] == "packets" || g["clock_method"] == "ping",
            "{topology}: {g}"
        );
        let err = g["clock_error_ns"].as_u64().expect("error bound");
        assert!(
            err < 20_000_000,
            "{topology}: clock error bound {err} ns: {g}; clock offsets {}",
            hmeta["clock_offsets"]
        );
        let offsets = hmeta["clock_offsets"].as_array().expect("offsets in meta");
        assert!(
            offsets
                .iter()
                .any(|o| o["method"] == "packets" && o["error_ns"].is_u64())
        );

        // One connection, host and guest events interleaved in time order.
        let dump = hvprof(&["dump", run.to_str().expect("utf8"), "--guests"]);
        let syn = json_lines(&dump.stdout)
            .into_iter()
            .find(|e| {
                e["origin"] == "guest-0"
                    && e["kind"] == "dev_packet"
                    && e["flags"] == "S"
                    && e["dport"] == 8080
            })
            .expect("a SYN to the proxy seen in the guest");
        let client = format!("{}:{}", syn["saddr"].as_str().expect("saddr"), syn["sport"]);
        let conn = hvprof(&[
            "dump",
            run.to_str().expect("utf8"),
            "--guests",
            "--conn",
            &client,
        ]);
        assert!(
            conn.status.success(),
            "{}",
            String::from_utf8_lossy(&conn.stderr)
        );
        let events = json_lines(&conn.stdout);
        let ts: Vec<u64> = events.iter().filter_map(|e| e["ts_ns"].as_u64()).collect();
        assert!(
            ts.windows(2).all(|w| w[0] <= w[1]),
            "{topology}: not in time order"
        );
        let origins: std::collections::BTreeSet<&str> =
            events.iter().filter_map(|e| e["origin"].as_str()).collect();
        assert!(
            origins.contains("host") && origins.contains("guest-0"),
            "{origins:?}"
        );
        let at = |pred: &dyn Fn(&Value) -> bool| {
            events
                .iter()
                .find(|e| pred(e))
                .and_then(|e| e["ts_ns"].as_u64())
                .expect("event present")
        };
        let host_syn = at(&|e| e["origin"] == "host" && e["flags"] == "S" && e["dev"] == "hvptap0");
        let guest_syn = at(&|e| e["origin"] == "guest-0" && e["flags"] == "S");
        // Within the offset's error bound, the host sends before the guest
        // receives.
        assert!(
            guest_syn + err >= host_syn,
            "{topology}: guest SYN at {guest_syn} before host SYN at {host_syn} beyond ±{err} ns"
        );
    }
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// `hvprof record --topology NAME -- sh -c '… load $HVPROF_PROXY …'`:
/// returns the run directory and the recording's pid (for leftovers).
fn record_topology(topology: &str, out: &Path) -> (std::path::PathBuf, u32) {
    let run = out.join("run");
    let load = r#""$HVPROF_BIN" load "$HVPROF_PROXY/?s=0" -d 2s -c 4 -q"#;
    let child = Command::new(hvprof_bin())
        .args(["record", "--topology", topology, "-F", "499", "-q", "-o"])
        .arg(&run)
        .args(["--", "sh", "-c", load])
        .env("HVPROF_BIN", hvprof_bin())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hvprof runs");
    let pid = child.id();
    let output = child.wait_with_output().expect("hvprof ends");
    assert_ok(&output, &format!("hvprof record --topology {topology}"));
    (run, pid)
}

#[test]
fn record_topology_brings_a_path_up_records_it_and_tears_it_down() {
    if let Some(why) = bpf_unavailable() {
        skip("record_topology_netns", &why);
        return;
    }
    let _g = bpf_lock();
    let _cleanup = CleanupGuard;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (run, pid) = record_topology("bridge", tmp.path());
    let meta = read_json(&run.join("meta.json"));
    assert_eq!(meta["topology"], "bridge");
    let summary = read_json(&run.join("summary.json"));
    assert!(
        summary["connections"].as_u64().unwrap_or(0) >= 100,
        "the load through the proxy was recorded: {summary}"
    );
    // The path's devices are traced without being named.
    assert!(
        dump_events(&run).iter().any(|e| e["kind"] == "dev_packet"),
        "no packets of the path's devices"
    );
    hvprof_tests::topology_support::assert_nothing_left(pid);
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

#[test]
fn ctrl_c_ends_a_topology_recording_in_order() {
    if let Some(why) = bpf_unavailable() {
        skip("record_topology_ctrl_c", &why);
        return;
    }
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let run_s = run.to_string_lossy().to_string();
    let mut p = hvprof_tests::topology_support::HvprofProc::spawn(&[
        "record",
        "--topology",
        "veth",
        "-p",
        "tcp",
        "-d",
        "60s",
        "-o",
        &run_s,
    ]);
    p.wait_for("the recording starts", Duration::from_secs(60), |_| {
        run.join("events.log").exists()
    });
    // Something to record: connections through the path.
    std::thread::sleep(Duration::from_millis(500));
    p.signal(libc::SIGINT);
    let t0 = Instant::now();
    let out = p.wait(Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "exit 128+SIGINT: {stderr}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "stopped in {:?}",
        t0.elapsed()
    );
    // The summary is written and printed before the topology goes down.
    let summary = read_json(&run.join("summary.json"));
    assert!(summary["events"].as_u64().is_some(), "{summary}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("recorded ") && stdout.contains("tcp:inet_sock_set_state"),
        "summary table printed: {stdout}"
    );
    hvprof_tests::topology_support::assert_nothing_left(p.pid);
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

#[test]
fn record_topology_on_a_guest_merges_host_and_guest() {
    if let Some(why) = bpf_unavailable().or_else(vm_unavailable) {
        skip("record_topology_vm", &why);
        return;
    }
    let _g = bpf_lock();
    let _cleanup = CleanupGuard;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (run, pid) = record_topology("vm-virtio", tmp.path());
    let guest = run.join("guest-0");
    assert_eq!(read_json(&guest.join("meta.json"))["status"], "complete");
    let fns = functions(&guest);
    assert!(
        fns.get("start_xmit").copied().unwrap_or(0) > 0,
        "no virtio_net events in the guest: {fns:?}"
    );
    let summary = read_json(&run.join("summary.json"));
    assert!(
        summary["guests"][0]["clock_error_ns"].as_u64().is_some(),
        "no clock offset for the guest: {summary}"
    );
    hvprof_tests::topology_support::assert_nothing_left(pid);
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}
