//! End-to-end tests of the topologies (issue 5), through the real release
//! binary: each topology comes up, serves 0-byte and 64 KiB objects
//! through the real HAProxy, and goes away leaving no namespace, link, TAP,
//! process, state file or run directory — also on Ctrl-C, and after a kill
//! through `hvprof cleanup`. Bad input gets a one-line error. Loads are
//! bounded (a second per size; guests under emulation do a few hundred
//! connections in that time).

use std::time::Duration;

use hvprof_tests::topology_support::{
    HvprofProc, assert_nothing_left, bench_json, namespaces_of, state_file, testbed_dir,
    vm_unavailable,
};
use hvprof_tests::{hvprof, skip};

fn root_unavailable() -> Option<String> {
    // SAFETY: plain getter.
    (unsafe { libc::geteuid() } != 0).then(|| "needs root (network namespaces)".into())
}

fn haproxy_missing() -> Option<String> {
    (!std::path::Path::new("/usr/sbin/haproxy").is_file()).then(|| "haproxy not installed".into())
}

/// Runs `hvprof bench` on `topologies` for sizes 0 and 64k and checks
/// the results and that nothing is left behind.
fn bench_serves(topologies: &[&str], extra: &[&str], limit: Duration) {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().to_string_lossy().to_string();
    let mut args = vec![
        "bench", "--sizes", "0,64k", "-d", "1s", "-c", "8", "-o", &out,
    ];
    for t in topologies {
        args.extend(["--topology", t]);
    }
    args.extend(extra);
    let mut p = HvprofProc::spawn(&args);
    let pid = p.pid;
    let o = p.wait(limit);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench {topologies:?} failed: {stderr}");
    let rows = bench_json(out_dir.path());
    for t in topologies {
        for size in [0u64, 65536] {
            let r = rows
                .iter()
                .find(|r| r["topology"] == *t && r["size"] == size)
                .unwrap_or_else(|| panic!("no result for {t} at {size}: {rows:?}"));
            assert!(r["requests"].as_u64().unwrap_or(0) > 0, "{t} {size}: {r}");
            let errors: u64 = r["errors"]
                .as_object()
                .map(|e| e.values().filter_map(|v| v.as_u64()).sum())
                .unwrap_or(0);
            assert_eq!(errors, 0, "{t} {size}: {r}");
            assert_eq!(r["environment"]["topology"], *t, "{r}");
        }
    }
    let md = std::fs::read_to_string(out_dir.path().join("bench.md")).expect("bench.md");
    for t in topologies {
        assert!(md.contains(t), "bench.md names {t}");
    }
    if topologies.len() > 1 {
        assert!(md.contains("loss"), "comparison table in bench.md: {md}");
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("loss"),
            "comparison table printed: {stdout}"
        );
    }
    drop(p);
    assert_nothing_left(pid);
}

#[test]
fn lists_topologies() {
    let o = hvprof(&["topologies", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = hvprof_tests::json_lines(&o.stdout);
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "native",
            "veth",
            "bridge",
            "bridge-nf",
            "vm-virtio",
            "vm-vmxnet3",
            "vm-e1000",
            "vm-e1000e",
            "vm-rtl8139"
        ]
    );
    assert_eq!(rows[0]["available"], true);
    for r in &rows {
        if r["available"] == false {
            assert!(r["why_not"].as_str().is_some_and(|w| !w.is_empty()), "{r}");
        }
    }
    let table = hvprof(&["topologies"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("bridge-nf"));
}

#[test]
fn bad_input_is_one_clear_line() {
    let missing = "/nonexistent/hvprof-testbed";
    for (args, want) in [
        (
            vec!["bench", "--topology", "kvm", "--sizes", "0"],
            "unknown topology 'kvm' (available: native, veth, bridge, bridge-nf, vm-virtio",
        ),
        (
            vec![
                "bench",
                "--topology",
                "veth",
                "--nf-rules",
                "10",
                "--sizes",
                "0",
            ],
            "--nf-rules applies only to bridge-nf",
        ),
        (
            vec![
                "bench",
                "--topology",
                "vm-virtio",
                "--testbed",
                missing,
                "--sizes",
                "0",
            ],
            "cargo xtask testbed",
        ),
    ] {
        let o = hvprof(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn netns_topologies_serve_and_tear_down() {
    let name = "netns_topologies_serve_and_tear_down";
    if let Some(why) = root_unavailable().or_else(haproxy_missing) {
        return skip(name, &why);
    }
    bench_serves(
        &["native", "veth", "bridge", "bridge-nf"],
        &["--nf-rules", "100"],
        Duration::from_secs(120),
    );
}

#[test]
fn vm_topologies_serve_and_tear_down() {
    let name = "vm_topologies_serve_and_tear_down";
    if let Some(why) = root_unavailable()
        .or_else(haproxy_missing)
        .or_else(vm_unavailable)
    {
        return skip(name, &why);
    }
    let tb = testbed_dir().to_string_lossy().to_string();
    bench_serves(
        &[
            "vm-virtio",
            "vm-vmxnet3",
            "vm-e1000",
            "vm-e1000e",
            "vm-rtl8139",
        ],
        &["--testbed", &tb],
        Duration::from_secs(600),
    );
}

#[test]
fn ctrl_c_tears_down() {
    let name = "ctrl_c_tears_down";
    if let Some(why) = root_unavailable().or_else(haproxy_missing) {
        return skip(name, &why);
    }
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().to_string_lossy().to_string();
    let mut p = HvprofProc::spawn(&[
        "bench",
        "--topology",
        "bridge-nf",
        "--sizes",
        "0",
        "-d",
        "30s",
        "-c",
        "4",
        "-o",
        &out,
    ]);
    // Up: three namespaces and a state file.
    p.wait_for("bridge-nf is up", Duration::from_secs(30), |pid| {
        namespaces_of(pid).len() == 3 && state_file(pid).exists()
    });
    std::thread::sleep(Duration::from_millis(1500));
    p.signal(libc::SIGINT);
    let pid = p.pid;
    let o = p.wait(Duration::from_secs(20));
    assert!(!o.status.success(), "interrupted bench exits non-zero");
    assert_nothing_left(pid);
}

#[test]
fn cleanup_removes_what_a_killed_run_left() {
    let name = "cleanup_removes_what_a_killed_run_left";
    if let Some(why) = root_unavailable().or_else(haproxy_missing) {
        return skip(name, &why);
    }
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().to_string_lossy().to_string();
    let mut p = HvprofProc::spawn(&[
        "bench",
        "--topology",
        "veth",
        "--sizes",
        "0",
        "-d",
        "30s",
        "-c",
        "4",
        "-o",
        &out,
    ]);
    p.wait_for("veth is up", Duration::from_secs(30), |pid| {
        namespaces_of(pid).len() == 2
    });
    let pid = p.pid;
    p.signal(libc::SIGKILL);
    let _ = p.wait(Duration::from_secs(10));
    // A killed run leaves its namespaces, and `hvprof cleanup` removes and
    // names them — unless an hvprof started in between (another test's:
    // bench, profile and record clean up at start) got there first.
    let left = namespaces_of(pid).len();
    let o = hvprof(&["cleanup"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    if !text.contains(&format!("namespace hvp-{pid}-veth-c")) {
        eprintln!(
            "note: the {left} namespace(s) the kill left were removed before `hvprof cleanup` ran: {text}"
        );
    }
    assert_nothing_left(pid);
    // A second run has nothing left to do for this pid.
    let again = hvprof(&["cleanup"]);
    assert!(!String::from_utf8_lossy(&again.stdout).contains(&format!("hvp-{pid}-")));
}
