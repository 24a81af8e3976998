//! End-to-end tests of `hvprof origin`, `hvprof load` and `hvprof bench`
//! (issue 4), run through the real release binary. Everything talks to
//! 127.0.0.1 only, on ports the kernel picks, and every load is bounded by
//! a request count (or a second or two) and a wall-clock limit.

use std::time::{Duration, Instant};

use hvprof_tests::loadgen_support::{
    ClosedPort, OriginProc, closed_by_peer, error_line, expected_body, haproxy_available,
    haproxy_pids_with, http_exchange, http_on, hvprof_bounded, hvprof_bounded_env, load_json,
};
use hvprof_tests::skip;
use hvprof_tests::topology_support::Netns;

const LIMIT: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn origin_bodies_are_byte_exact() {
    let origin = OriginProc::start(1);
    for (label, size) in [("0", 0usize), ("1", 1), ("64k", 65536), ("1m", 1 << 20)] {
        for version in ["1.0", "1.1"] {
            let req =
                format!("GET /?s={label} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (r, mut s) = http_exchange(origin.addr, &req);
            assert_eq!(r.status, 200, "{label} HTTP/{version}: {}", r.head);
            assert_eq!(r.header("content-length"), Some(size.to_string()));
            assert!(r.body == expected_body(size), "body of {label} differs");
            assert!(
                closed_by_peer(&mut s),
                "Connection: close honoured at {label}"
            );
        }
    }
    let stats = origin.stop();
    assert_eq!(stats["connections"], 8);
    assert_eq!(stats["requests"], 8);
}

#[test]
fn origin_keep_alive_and_http10() {
    let origin = OriginProc::start(1);
    // HTTP/1.1: keep-alive by default, three requests on one connection.
    let (r, mut s) = http_exchange(origin.addr, "GET /?s=10 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.body, expected_body(10));
    for size in [0usize, 2048] {
        let r = http_on(
            &mut s,
            &format!("GET /?s={size} HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert_eq!(r.body, expected_body(size));
    }
    drop(s);
    // HTTP/1.0 closes unless asked to keep alive.
    let (_, mut s) = http_exchange(origin.addr, "GET /?s=1 HTTP/1.0\r\n\r\n");
    assert!(closed_by_peer(&mut s));
    let (r, mut s) = http_exchange(
        origin.addr,
        "GET /?s=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    let r = http_on(
        &mut s,
        "GET /?s=3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    assert_eq!(r.body, expected_body(3));
    drop(s);
    // Unknown paths, missing and bad sizes: 400 with a reason.
    for (target, reason) in [
        ("/nope", "unknown path"),
        ("/?s=10x", "unknown suffix"),
        ("/?s=abc", "not a number"),
        ("/", "missing size"),
    ] {
        let (r, _) = http_exchange(
            origin.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert_eq!(r.status, 400, "{target}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains(reason), "{target}: {body}");
    }
    let stats = origin.stop();
    assert_eq!(stats["requests"], 10);
    assert_eq!(stats["connections"], 7);
    assert_eq!(stats["bad_requests"], 4);
}

#[test]
fn close_mode_one_connection_per_request_and_exact_count() {
    let origin = OriginProc::start(2);
    let (v, out) = load_json(&[&origin.url("1k"), "-n", "3000", "-c", "16", "-t", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(v["requests"], 3000, "-n is exact");
    assert_eq!(v["connections"], 3000, "connections == requests for -r 1");
    assert_eq!(v["body_bytes"], 3000 * 1024);
    assert_eq!(v["errors"]["short_body"], 0);
    let total_errors: u64 = v["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|e| e.as_u64().unwrap())
        .sum();
    assert_eq!(total_errors, 0, "{v}");
    for key in ["conn_per_s", "req_per_s", "body_mbps", "duration_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    for h in ["connect", "ttfb", "ttlb"] {
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                v["latency_us"][h][p].as_u64().is_some_and(|x| x > 0),
                "{h}.{p}: {v}"
            );
        }
    }
    let stats = origin.stop();
    assert_eq!(
        stats["connections"], 3000,
        "origin accepts exactly one connection per request"
    );
    assert_eq!(stats["requests"], 3000);
}

#[test]
fn load_checks_bodies_at_each_size() {
    let origin = OriginProc::start(1);
    for (label, size) in [("0", 0u64), ("1", 1), ("64k", 65536), ("1m", 1 << 20)] {
        let (v, out) = load_json(&[&origin.url(label), "-n", "40", "-c", "4", "-t", "1"]);
        assert!(out.status.success(), "{label}: {}", stderr(&out));
        assert_eq!(v["requests"], 40, "{label}");
        assert_eq!(v["body_bytes"].as_u64(), Some(40 * size), "{label}");
    }
}

#[test]
fn keep_alive_mode_via_hyper() {
    let origin = OriginProc::start(1);
    let (v, out) = load_json(&[
        &origin.url("2k"),
        "-n",
        "500",
        "-r",
        "10",
        "-c",
        "5",
        "-t",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(v["requests"], 500);
    assert_eq!(v["connections"], 50);
    assert_eq!(v["body_bytes"], 500 * 2048);
    let stats = origin.stop();
    assert_eq!(stats["connections"], 50);
    assert_eq!(stats["requests"], 500);
}

#[test]
fn open_loop_rate_is_respected() {
    let origin = OriginProc::start(1);
    let t0 = Instant::now();
    let (v, out) = load_json(&[
        &origin.url("0"),
        "-R",
        "200",
        "-d",
        "1s",
        "-c",
        "4",
        "-t",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let n = v["requests"].as_u64().unwrap();
    assert!((180..=201).contains(&n), "200/s for 1 s gave {n}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_status_is_counted_and_named() {
    let origin = OriginProc::start(1);
    let out = hvprof_bounded(
        &["load", &origin.url("10q"), "-n", "5", "-c", "1", "-q"],
        LIMIT,
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("unknown suffix 'q'"), "{line}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bad_status 5"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_input_gives_one_clear_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["load", "not-a-url", "-n", "1"], "invalid URL"),
        (&["load", "https://127.0.0.1:1/", "-n", "1"], "only http://"),
        (&["load", "http://127.0.0.1:99999/", "-n", "1"], "bad port"),
        (
            &["load", "http://127.0.0.1:1/", "-c", "0", "-n", "1"],
            "concurrency must be a positive integer",
        ),
        (
            &["load", "http://127.0.0.1:1/", "-c", "-1", "-n", "1"],
            "concurrency must be a positive integer",
        ),
        (
            &["load", "http://127.0.0.1:1/", "-n", "0"],
            "request count must be a positive integer",
        ),
        (
            &["load", "http://127.0.0.1:1/", "-d", "soon"],
            "invalid duration",
        ),
        (&["bench", "--sizes", "0,10q"], "unknown suffix 'q'"),
        (
            &["bench", "--topology", "kvm", "--sizes", "0"],
            "unknown topology 'kvm' (available: native",
        ),
        (
            &["origin", "--listen", "127.0.0.1:0", "--threads", "0"],
            "thread count must be a positive integer",
        ),
    ];
    for (args, expected) in cases {
        let out = hvprof_bounded(args, Duration::from_secs(20));
        assert!(!out.status.success(), "{args:?} should fail");
        let line = error_line(&out);
        assert!(
            line.contains(expected),
            "{args:?}: first error line {line:?} lacks {expected:?}\n{}",
            stderr(&out)
        );
        assert!(!line.contains("panicked"), "{args:?}: {line}");
    }
}

/// `hvprof load` refuses a target beyond this host and its own links
/// before it sends anything, unless `--allow-remote`. Run in a namespace
/// of the test's own whose default route leads into a veth pair with
/// nothing behind it, so that nothing could leave were the check wrong.
#[test]
fn load_refuses_targets_beyond_this_host() {
    let ns = match Netns::try_new("reach") {
        Ok(ns) => ns,
        Err(why) => return skip("load_refuses_targets_beyond_this_host", &why),
    };
    for (dev, peer, addr) in [
        ("hvpo0", "hvpo1", "10.79.0.1/24"),
        ("hvpl0", "hvpl1", "10.79.1.1/24"),
    ] {
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
        ns.ip(&["addr", "add", addr, "dev", dev]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", peer, "up"]);
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.79.0.254",
        "dev",
        "hvpo0",
    ]);
    let load = |url: &str, extra: &[&str]| {
        let mut args = vec!["netns", "exec", &ns.0];
        let bin = hvprof_tests::hvprof_bin();
        let bin = bin.to_str().expect("utf8 path").to_string();
        args.extend([bin.as_str(), "load", url, "-n", "1", "-c", "1", "-q"]);
        args.extend(["--timeout", "300ms"]);
        args.extend(extra);
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .expect("ip netns exec runs");
        assert!(!out.status.success(), "{url}: nothing answers there");
        error_line(&out)
    };
    let line = load("http://198.51.100.7/", &[]);
    assert!(
        line.contains("198.51.100.7 is not on this host")
            && line.contains("through gateway 10.79.0.254 on hvpo0")
            && line.contains("--allow-remote"),
        "{line}"
    );
    let line = load("http://10.79.0.9/", &[]);
    assert!(
        line.contains("on hvpo0, the link of this host's default route"),
        "{line}"
    );
    // Its own link, its own address: loaded (and nothing answers).
    for url in ["http://10.79.1.9:9/", "http://10.79.0.1:9/"] {
        let line = load(url, &[]);
        assert!(line.contains("no request to"), "{url}: {line}");
    }
    let line = load("http://198.51.100.7/", &["--allow-remote"]);
    assert!(line.contains("no request to"), "{line}");
}

#[test]
fn closed_port_fails_fast() {
    // A port nothing listens on, held so that nothing can meanwhile.
    let closed = ClosedPort::new();
    let port = closed.port;
    let t0 = Instant::now();
    let out = hvprof_bounded(
        &[
            "load",
            &format!("http://127.0.0.1:{port}/?s=0"),
            "-d",
            "10s",
            "-c",
            "8",
            "-q",
        ],
        LIMIT,
    );
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(line.contains("refused"), "{line}");
    assert!(line.contains("is a server listening"), "{line}");
    assert_eq!(
        stderr(&out).lines().filter(|l| l.contains("error")).count(),
        1,
        "{}",
        stderr(&out)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stops at once, not after -d"
    );
}

#[test]
fn bench_runs_end_to_end_through_haproxy() {
    if !haproxy_available() {
        skip(
            "bench_runs_end_to_end_through_haproxy",
            "haproxy is not installed (cargo xtask setup installs it)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("bench");
    let tmp = dir.path().display().to_string();
    let out = hvprof_bounded_env(
        &[
            "bench",
            "--sizes",
            "0,4k",
            "-d",
            "1s",
            "-c",
            "8",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        // HAProxy's config directory goes under our own temp dir, so the
        // leftover check below sees only this test's HAProxy.
        &[("TMPDIR", tmp.as_str())],
        LIMIT,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("bench.json")).unwrap()).unwrap();
    let points = v.as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (p, size) in points.iter().zip([0u64, 4096]) {
        assert_eq!(p["size"], size);
        assert!(p["conn_per_s"].as_f64().unwrap() > 0.0);
        assert!(p["haproxy_cpu_s"].as_f64().unwrap() > 0.0);
        assert!(p["latency_us"]["ttlb"]["p99"].as_u64().unwrap() > 0);
        // One request per connection on both sides of the proxy.
        assert_eq!(p["origin_connections"], p["origin_requests"]);
        assert_eq!(p["origin_requests"], p["requests"]);
    }
    assert!(points[1]["body_mbps"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(out_dir.join("bench.md")).unwrap();
    assert!(md.contains("| native | 4K |"), "{md}");
    for svg in ["bench.svg", "conn_per_s.svg", "bandwidth.svg"] {
        let text = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("<polyline"),
            "{svg}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("| native | 0 |"));
    // No HAProxy left behind.
    assert!(haproxy_pids_with(&tmp).is_empty(), "haproxy left running");
}
