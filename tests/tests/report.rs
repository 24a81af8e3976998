//! `hvprof profile` / `hvprof report` end to end: the loss of a topology
//! explained layer by layer, on known causes, and the HTML report as a
//! browser renders it.

use std::{path::Path, process::Command};

use hvprof_tests::{
    Owned, assert_ok, bpf_lock, bpf_unavailable, hvprof, hvprof_bin, our_bpf_programs, read_json,
    skip,
};
use serde_json::Value;

/// `hvprof profile` of native vs bridge-nf with `rules` iptables rules at
/// size 0; returns report.json.
fn profile(out: &Path, rules: u32) -> Value {
    let o = Command::new(hvprof_bin())
        .args([
            "profile",
            "--topology",
            "native",
            "--topology",
            "bridge-nf",
            "--sizes",
            "0",
            // Long enough and loaded enough (CPU-bound, not latency-bound)
            // for the costs to be measured within a point or two.
            "-d",
            "4s",
            "-c",
            "32",
        ])
        .args(["--nf-rules", &rules.to_string(), "-o"])
        .arg(out)
        .output()
        .expect("hvprof runs");
    assert!(
        o.status.success(),
        "profile failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&std::fs::read(out.join("report/report.json")).expect("report.json"))
        .expect("JSON")
}

fn point<'a>(report: &'a Value, topology: &str) -> &'a Value {
    report["topologies"]
        .as_array()
        .expect("topologies")
        .iter()
        .find(|t| t["name"] == topology)
        .and_then(|t| t["sizes"].get(0))
        .unwrap_or_else(|| panic!("{topology} missing: {report}"))
}

fn points(p: &Value, layer: &str) -> f64 {
    p["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["layer"] == layer)
        .and_then(|l| l["loss_points"].as_f64())
        .unwrap_or_else(|| panic!("no {layer} in {p}"))
}

#[test]
fn more_netfilter_rules_move_the_loss_into_netfilter_and_shares_add_up() {
    if let Some(why) = bpf_unavailable() {
        skip("report_netfilter", &why);
        return;
    }
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let few = profile(&tmp.path().join("few"), 10);
    let many = profile(&tmp.path().join("many"), 3000);
    for r in [&few, &many] {
        let p = point(r, "bridge-nf");
        for k in [
            "size",
            "conn_per_s",
            "body_mbps",
            "loss_pct",
            "predicted_loss_pct",
            "residual_pct",
            "bottleneck",
        ] {
            assert!(!p[k].is_null(), "{k} in {p}");
        }
        for l in p["layers"].as_array().expect("layers") {
            for k in ["layer", "cpu_us_per_conn", "loss_points"] {
                assert!(!l[k].is_null(), "{k} in {l}");
            }
            assert!(l.get("latency_us_p50").is_some() && l.get("latency_us_p99").is_some());
        }
        let sum: f64 = p["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .filter_map(|l| l["loss_points"].as_f64())
            .sum();
        let predicted = p["predicted_loss_pct"].as_f64().expect("predicted");
        assert!(
            (sum - predicted).abs() < 0.01,
            "shares {sum} != predicted {predicted}"
        );
        // The layers explain the loss: the residual is usually within a
        // point here, but the two 4-s rates it comes from drift apart now
        // and then (5.4 and 5.6 points in two of about a dozen CI runs,
        // the second with the CPUs 14 % idle in the bridged run). The report
        // flags anything beyond 5 points; the test fails beyond 8, short of
        // what the smallest share here (netfilter, about 9 points with 10
        // rules) would leave unexplained if it went missing.
        let residual = p["residual_pct"].as_f64().expect("residual");
        assert!(residual.abs() <= 8.0, "residual {residual} points: {p}");
        assert_eq!(p["residual_flagged"], residual.abs() > 5.0);
        let native = point(r, "native");
        assert_eq!(native["loss_pct"].as_f64(), Some(0.0));
    }
    let (nf_few, nf_many) = (
        points(point(&few, "bridge-nf"), "netfilter"),
        points(point(&many, "bridge-nf"), "netfilter"),
    );
    assert!(
        nf_many > nf_few + 5.0,
        "3000 rules should cost netfilter more than 10 rules: {nf_many:.1} vs {nf_few:.1} points"
    );
    let loss = |r: &Value| point(r, "bridge-nf")["loss_pct"].as_f64().unwrap_or(0.0);
    assert!(loss(&many) > loss(&few), "more rules, more loss");
    // Packets cross the bridge (and its rules) slower with more rules: the
    // crossing is timed between the two ends of the path.
    let crossing = |r: &Value| {
        point(r, "bridge-nf")["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .find(|l| l["layer"] == "switch")
            .and_then(|l| l["latency_us_p50"].as_f64())
            .unwrap_or_else(|| panic!("no switch latency in {r}"))
    };
    assert!(
        crossing(&many) > crossing(&few),
        "crossing the bridge: {:.1} µs with 3000 rules vs {:.1} µs with 10",
        crossing(&many),
        crossing(&few)
    );
    // The report files.
    let rep = tmp.path().join("many/report");
    for f in [
        "index.html",
        "summary.md",
        "conn_per_s.svg",
        "bandwidth.svg",
        "loss.svg",
    ] {
        assert!(rep.join(f).exists(), "{f} missing");
    }
    let p = point(&many, "bridge-nf");
    for k in ["flamegraph", "diff_flamegraph"] {
        let f = p[k].as_str().unwrap_or_else(|| panic!("{k} missing"));
        let svg = std::fs::read_to_string(rep.join(f)).expect("svg");
        assert!(svg.contains("<svg"), "{f}");
    }
    let md = std::fs::read_to_string(rep.join("summary.md")).expect("summary.md");
    assert!(md.contains("bridge-nf") && md.contains("residual"));
    assert!(our_bpf_programs().is_empty(), "programs left attached");

    // Regenerated from the run directories alone.
    let again = tmp.path().join("again");
    let out = hvprof(&[
        "report",
        tmp.path().join("many").to_str().expect("utf8"),
        "-o",
        again.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(again.join("report.json").exists());
}

/// The connection rate `hvprof bench` measured into `out`.
fn conn_per_s(out: &Path) -> f64 {
    let b: Value =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).expect("bench.json"))
            .expect("JSON");
    b[0]["conn_per_s"].as_f64().expect("conn_per_s")
}

/// `hvprof bench --record` of native at size 0 into `out`, named `label`.
fn bench_native(out: &Path, label: &str) {
    let o = Command::new(hvprof_bin())
        .args([
            "bench",
            "--topology",
            "native",
            "--label",
            label,
            "--sizes",
            "0",
            "-d",
            "2s",
            "-c",
            "16",
            "--record",
            "-F",
            "499",
            "-o",
        ])
        .arg(out)
        .output()
        .expect("hvprof runs");
    assert_ok(&o, "hvprof bench");
}

#[test]
fn a_cpu_hog_beside_the_proxy_shows_as_sched() {
    if let Some(why) = bpf_unavailable() {
        skip("report_cpu_hog", &why);
        return;
    }
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    bench_native(&tmp.path().join("quiet-before"), "native");
    {
        // Two busy loops on every CPU: whichever the proxy runs on, it gets
        // a third of it at most, a loss far beyond the run-to-run spread.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let _hogs: Vec<Owned> = (0..2 * cpus).map(|_| Owned::busy_loop()).collect();
        bench_native(&tmp.path().join("hog"), "native-hog");
    }
    bench_native(&tmp.path().join("quiet-after"), "native");
    // The baseline is the faster quiet run: a neighbour of this machine that
    // slowed one of them down would otherwise be read as the hog's gain.
    let quiet = ["quiet-before", "quiet-after"]
        .map(|q| tmp.path().join(q))
        .into_iter()
        .max_by(|a, b| conn_per_s(a).total_cmp(&conn_per_s(b)))
        .expect("two quiet runs");
    let rep = tmp.path().join("report");
    let out = hvprof(&[
        "report",
        quiet.join("runs/native-0").to_str().expect("utf8"),
        tmp.path()
            .join("hog/runs/native-hog-0")
            .to_str()
            .expect("utf8"),
        "-o",
        rep.to_str().expect("utf8"),
    ]);
    assert_ok(&out, "hvprof report");
    let r: Value =
        serde_json::from_slice(&std::fs::read(rep.join("report.json")).expect("report.json"))
            .expect("JSON");
    let p = point(&r, "native-hog");
    let loss = p["loss_pct"].as_f64().expect("loss");
    // A machine whose hypervisor takes a good part of its CPUs (steal)
    // has rates that swing with the host's other guests, hog or not: there
    // the premise can't be tested, and the test says so.
    let stolen = [&quiet, &tmp.path().join("hog")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join("runs")).expect("runs").flatten())
        .filter_map(|run| read_json(&run.path().join("summary.json"))["steal"]["pct"].as_f64())
        .fold(0.0, f64::max);
    if loss <= 20.0 && stolen >= 5.0 {
        skip(
            "report_cpu_hog",
            &format!(
                "the hypervisor under this machine took up to {stolen:.0}% of its CPUs during the runs (steal): the hog's {loss:.0}% loss can't be told from that"
            ),
        );
        return;
    }
    assert!(
        loss > 20.0,
        "a hog on every CPU should cost throughput: {p}"
    );
    let sched = points(p, "sched");
    let top = p["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .max_by(|a, b| {
            let v = |l: &Value| l["loss_points"].as_f64().unwrap_or(0.0);
            v(a).total_cmp(&v(b))
        })
        .expect("a layer");
    assert_eq!(top["layer"], "sched", "sched should explain most: {p}");
    assert!(
        sched > loss / 2.0,
        "sched {sched:.1} of {loss:.1} points: {p}"
    );
    let residual = p["residual_pct"].as_f64().expect("residual");
    assert!(residual.abs() <= 5.0, "residual {residual} points: {p}");
    assert!(
        p["bottleneck"]
            .as_str()
            .is_some_and(|b| b.contains("waiting for a CPU")),
        "{p}"
    );
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// Headless Chromium, as the machine's tools document it: no sandbox (root),
/// no GPU, no background networking.
fn chromium(args: &[&str], profile: &Path) -> Option<std::process::Output> {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .ok()
}

#[test]
fn the_html_report_renders_in_chromium_without_console_errors() {
    if let Some(why) = bpf_unavailable() {
        skip("report_in_chromium", &why);
        return;
    }
    if Command::new("chromium").arg("--version").output().is_err() {
        skip(
            "report_in_chromium",
            "chromium is not installed (cargo xtask setup installs it)",
        );
        return;
    }
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("p");
    let o = Command::new(hvprof_bin())
        .args([
            "profile",
            "--topology",
            "native",
            "--sizes",
            "0,4k",
            "-d",
            "1s",
            "-o",
        ])
        .arg(&out)
        .output()
        .expect("hvprof runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index = out.join("report/index.html");
    let url = format!("file://{}", index.display());
    let dom = chromium(&["--dump-dom", &url], &tmp.path().join("c1")).expect("chromium runs");
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("class=\"chart\"") && html.contains("<svg"),
        "charts in the DOM"
    );
    assert!(
        html.contains("class=\"flamegraph\""),
        "flamegraphs in the DOM"
    );
    let shot = hvprof_tests::workspace_root().join("target/report-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    let r = chromium(
        &[
            "--window-size=1400,2400",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
        &tmp.path().join("c2"),
    )
    .expect("chromium runs");
    let log = String::from_utf8_lossy(&r.stderr);
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Error") || l.contains("Uncaught")))
        .collect();
    assert!(
        console_errors.is_empty(),
        "console errors: {console_errors:?}"
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.len() > 20_000,
        "screenshot is nearly empty ({} bytes)",
        png.len()
    );
    // A flamegraph on its own renders too (its script runs without errors).
    let flame = std::fs::read_dir(out.join("report"))
        .expect("report dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "svg") && p.to_string_lossy().contains("per1000")
        })
        .expect("a flamegraph");
    let r = chromium(
        &["--dump-dom", &format!("file://{}", flame.display())],
        &tmp.path().join("c3"),
    )
    .expect("chromium runs");
    let log = String::from_utf8_lossy(&r.stderr);
    assert!(
        !log.lines()
            .any(|l| l.contains("CONSOLE") && l.contains("Uncaught")),
        "{log}"
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("<rect"),
        "flamegraph frames"
    );
}
