//! `hvprof record` / `dump` / `probes list` end to end, on the real kernel:
//! real probes, real loopback connections, real signals.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use hvprof_tests::loadgen_support::OriginProc;
use hvprof_tests::topology_support::Netns;
use hvprof_tests::{
    Owned, StderrLines, assert_ok, bpf_lock, bpf_unavailable, dump_events, helper_bin, hvprof,
    hvprof_bin, json_lines, live_scratch_dirs, machine_steal_s, our_bpf_programs, read_json, skip,
};
use serde_json::Value;

macro_rules! require_bpf {
    ($name:expr) => {
        if let Some(why) = bpf_unavailable() {
            skip($name, &why);
            return;
        }
    };
}

#[test]
fn record_sees_exactly_500_connections_with_monotone_timestamps_and_no_loss() {
    require_bpf!("record_500_connections");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let portfile = tmp.path().join("port");
    let steal_before = machine_steal_s();
    let out = Command::new(hvprof_bin())
        .args(["record", "--bpf-stats", "--all-tcp-states", "-o"])
        .arg(&run)
        .arg("--")
        .arg(helper_bin("tcp-burst"))
        .arg("500")
        .arg(&portfile)
        .output()
        .expect("hvprof runs");
    let steal_after = machine_steal_s();
    assert!(
        out.status.success(),
        "record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port: u64 = std::fs::read_to_string(&portfile)
        .expect("tcp-burst wrote its port")
        .trim()
        .parse()
        .expect("port number");

    let summary: Value = serde_json::from_slice(
        &std::fs::read(run.join("summary.json")).expect("summary.json written"),
    )
    .expect("summary.json is JSON");
    let lost = summary["lost"].as_object().expect("lost is an object");
    assert!(lost.contains_key("tcp:inet_sock_set_state"), "{summary}");
    assert!(
        lost.values().all(|v| v.as_u64() == Some(0)),
        "lost events: {summary}"
    );
    let probes = summary["probes"].as_array().expect("probes list");
    let sock = probes
        .iter()
        .find(|p| p["name"] == "tcp:inet_sock_set_state")
        .expect("sock probe stats");
    let runs = sock["run_count"].as_u64().expect("run_count");
    assert!(
        runs >= 500 * 8,
        "every connection changes state >= 8 times on both ends: {runs}"
    );
    assert!(sock["run_time_ns"].as_u64().unwrap_or(0) > 0);
    // The recording's own cost: the programs' time is the rows' sum, and
    // the recorder's thread worked, for no longer than the recording.
    let cost = &summary["cost"];
    let rows_ns: u64 = probes
        .iter()
        .filter_map(|p| p["run_time_ns"].as_u64())
        .sum();
    let programs_s = cost["programs_cpu_s"].as_f64().expect("programs_cpu_s");
    assert!((programs_s - rows_ns as f64 / 1e9).abs() < 1e-6, "{cost}");
    let span = cost["span_s"].as_f64().expect("span_s");
    let recorder = cost["recorder_cpu_s"].as_f64().expect("recorder_cpu_s");
    assert!(recorder > 0.0 && recorder <= span, "{cost}");
    assert_eq!(
        cost["cpus"],
        read_json(&run.join("meta.json"))["cpus"],
        "{cost}"
    );
    let cpus = cost["cpus"].as_f64().expect("cpus");
    let pct = cost["recorder_pct"].as_f64().expect("recorder_pct");
    assert!(
        (pct - 100.0 * recorder / (span * cpus)).abs() < 1e-6,
        "{cost}"
    );
    // What the hypervisor took over the recording: no more than it took
    // around it, and its share of the window's CPU time follows.
    let steal = &summary["steal"];
    let stolen = steal["cpu_s"].as_f64().expect("steal cpu_s");
    assert!(
        (0.0..=steal_after - steal_before + 1e-9).contains(&stolen),
        "{steal}: {steal_before} .. {steal_after} s around the recording"
    );
    let window = summary["duration_s"].as_f64().expect("duration_s") * cpus;
    assert!(
        (steal["pct"].as_f64().expect("steal pct") - 100.0 * stolen / window).abs() < 1e-6,
        "{steal}"
    );
    let events = summary["events"].as_u64().expect("events");
    assert!(summary["connections"].as_u64().expect("connections") >= 500);

    // The event dump agrees with the summary and every line is an event.
    let dump = hvprof(&["dump", run.to_str().expect("utf8 path")]);
    assert!(dump.status.success());
    let lines = json_lines(&dump.stdout);
    assert_eq!(lines.len() as u64, events);
    assert!(
        lines
            .iter()
            .all(|e| e["ts_ns"].is_u64() && e["probe"].is_string())
    );
    // One event per socket life, aggregated in the kernel, carrying every
    // state change with --all-tcp-states (stats are read just before
    // detaching: a few more changes may follow).
    let lives: Vec<&Value> = lines.iter().filter(|e| e["kind"] == "sock_life").collect();
    assert!(lives.len() >= 2 * 500, "{} socket lives", lives.len());
    let changes: u64 = lives
        .iter()
        .filter_map(|e| e["transitions"].as_array())
        .map(|t| t.len() as u64)
        .sum();
    assert!(
        changes >= runs,
        "every program run is a state change of a life: {changes} < {runs}"
    );
    assert!(
        !skipped_states(&lives).is_empty(),
        "--all-tcp-states keeps FIN_WAIT2 and LAST_ACK"
    );
    let meta: Value = read_json(&run.join("meta.json"));
    assert_eq!(meta["all_tcp_states"], true, "{meta}");
    assert!(
        lines
            .iter()
            .all(|e| e["kind"] == "sock_life" || e["kind"] == "cpu_sample"),
        "only known kinds"
    );

    // Exactly our 500 connections to the burst's listener, each with both
    // endpoints and a monotone lifecycle.
    let ours = connections_to(&run, &port.to_string());
    assert_eq!(ours.len(), 500, "connections to port {port}");
    let ns = sock["run_time_ns"].as_u64().unwrap_or(0);
    eprintln!(
        "500 connections: {events} events ({} socket lives, {changes} state changes), 0 lost; \
         sock program {runs} runs, {} ns/run",
        lives.len(),
        ns / runs.max(1)
    );
    for c in &ours {
        let eps = c["endpoints"].as_array().expect("endpoints");
        assert_eq!(eps.len(), 2, "both ends of {c}");
        let mut roles: Vec<&str> = eps.iter().filter_map(|e| e["role"].as_str()).collect();
        roles.sort_unstable();
        assert_eq!(roles, ["client", "server"]);
        for ep in eps {
            let ts: Vec<u64> = ep["transitions"]
                .as_array()
                .expect("transitions")
                .iter()
                .filter_map(|t| t["ts_ns"].as_u64())
                .collect();
            assert!(ts.len() >= 3, "{ep}");
            assert!(ts.windows(2).all(|w| w[0] <= w[1]), "non-monotone {ts:?}");
        }
        let step = |k: &str| {
            c[k].as_u64()
                .unwrap_or_else(|| panic!("{k} missing in {c}"))
        };
        assert!(step("syn_ns") <= step("established_ns"));
        assert!(step("established_ns") <= step("fin_ns"));
        assert!(step("fin_ns") <= step("close_ns"));
    }
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// Transitions into the states a recording skips unless
/// `--all-tcp-states`, in these lives.
fn skipped_states<'a>(lives: &[&'a Value]) -> Vec<&'a Value> {
    lives
        .iter()
        .filter_map(|e| e["transitions"].as_array())
        .flatten()
        .filter(|t| {
            matches!(
                t["new"].as_str(),
                Some("FIN_WAIT2" | "LAST_ACK" | "CLOSING")
            )
        })
        .collect()
}

/// Asserts that every event is of process `pid`.
fn assert_only_pid(events: &[Value], pid: u32) {
    let other = events
        .iter()
        .find(|e| e["pid"].as_u64() != Some(u64::from(pid)));
    assert!(other.is_none(), "events of other tasks: {other:?}");
}

/// `hvprof record` with `filter` around a burst of `n` connections.
fn record_burst(run: &std::path::Path, filter: &[&str], n: u32) -> Vec<Value> {
    let out = Command::new(hvprof_bin())
        .args(["record", "-F", "499", "-o"])
        .arg(run)
        .args(filter)
        .arg("--")
        .arg(helper_bin("tcp-burst"))
        .arg(n.to_string())
        .arg(run.with_extension("port"))
        .output()
        .expect("hvprof runs");
    assert_ok(&out, "hvprof record");
    dump_events(run)
}

#[test]
fn pid_and_comm_filters_keep_only_those_tasks_in_the_kernel() {
    require_bpf!("record_task_filter");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    // --pid of a busy loop: its samples, none of the burst's events.
    let spin = Owned::busy_loop();
    let pid = spin.0.id();
    let events = record_burst(&tmp.path().join("pid"), &["--pid", &pid.to_string()], 300);
    drop(spin);
    assert!(
        events.iter().any(|e| e["kind"] == "cpu_sample"),
        "no samples of the busy loop"
    );
    assert_only_pid(&events, pid);

    // --comm of the burst: its socket events, nobody else's.
    let events = record_burst(&tmp.path().join("comm"), &["--comm", "tcp-burst"], 300);
    let lives: Vec<&Value> = events.iter().filter(|e| e["kind"] == "sock_life").collect();
    assert!(
        lives.len() >= 300,
        "only {} socket lives of tcp-burst",
        lives.len()
    );
    // By default the kernel skips the changes nothing reads.
    let skipped = skipped_states(&lives);
    assert!(skipped.is_empty(), "recorded {:?}", skipped.first());
    let others: Vec<&Value> = events.iter().filter(|e| e["comm"] != "tcp-burst").collect();
    assert!(
        others.is_empty(),
        "events of other tasks: {:?}",
        others.first()
    );
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// The first state change of a socket life, as `OLD>NEW`.
fn first_change(life: &Value) -> String {
    let t = &life["transitions"][0];
    format!(
        "{}>{}",
        t["old"].as_str().unwrap_or("?"),
        t["new"].as_str().unwrap_or("?")
    )
}

#[test]
fn accepted_sockets_are_their_listeners_and_filters_keep_whole_lives() {
    require_bpf!("record_socket_owners");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    // The origin listens before any recording starts, so its listener is
    // found in /proc; the load is another process. Over loopback, each
    // accepted socket's handshake runs on the client's time.
    let origin = OriginProc::start(1);
    let (pid, port) = (origin.pid(), origin.addr.port());
    let conns = 300;
    let lives = |name: &str, filter: &[&str]| -> Vec<Value> {
        let run = tmp.path().join(name);
        let out = Command::new(hvprof_bin())
            .args(["record", "-q", "-o"])
            .arg(&run)
            .args(filter)
            .arg("--")
            .arg(hvprof_bin())
            .args(["load", &origin.url("0"), "-q", "-t", "1", "-c", "4"])
            .args(["-n", &conns.to_string()])
            .output()
            .expect("hvprof runs");
        assert_ok(&out, "hvprof record");
        dump_events(&run)
            .into_iter()
            .filter(|e| e["kind"] == "sock_life")
            .collect()
    };
    let server = |l: &&Value| l["sport"] == port && first_change(l) == "LISTEN>SYN_RECV";
    let client = |l: &&Value| l["dport"] == port && first_change(l) == "CLOSE>SYN_SENT";

    // No filter: the origin's accepted sockets are the origin's, the
    // load's connecting ones the load's.
    let all = lives("all", &[]);
    let servers: Vec<&Value> = all.iter().filter(server).collect();
    let clients: Vec<&Value> = all.iter().filter(client).collect();
    assert_eq!(servers.len(), conns, "accepted sockets");
    assert_eq!(clients.len(), conns, "connecting sockets");
    let wrong = servers.iter().find(|l| l["pid"] != pid);
    assert!(
        wrong.is_none(),
        "an accepted socket not the origin's ({pid}): {wrong:?}"
    );
    let wrong = clients
        .iter()
        .find(|l| l["pid"] == pid || l["comm"] != "load-0");
    assert!(
        wrong.is_none(),
        "a connecting socket not the load's: {wrong:?}"
    );

    // The origin's thread: its accepted sockets, whole, under the name
    // the filter picked; none of the load's, even though the load's
    // sockets change state on the origin's time too (the origin closes
    // first, and its FIN reaches the client there).
    let only = lives("origin", &["--comm", "origin-0"]);
    let kept: Vec<&Value> = only.iter().filter(server).collect();
    assert_eq!(kept.len(), conns, "accepted sockets kept");
    let other = only
        .iter()
        .find(|l| l["pid"] != pid || l["comm"] != "origin-0" || l["sport"] != port);
    assert!(other.is_none(), "a life not the origin's: {other:?}");

    // The load's thread: its connecting sockets only.
    let only = lives("load", &["--comm", "load-0"]);
    assert_eq!(
        only.iter().filter(client).count(),
        conns,
        "connecting sockets kept"
    );
    let other = only.iter().find(|l| !client(l) || l["comm"] != "load-0");
    assert!(other.is_none(), "a life not the load's: {other:?}");
    drop(origin);
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

#[test]
fn a_listener_a_master_shares_with_its_worker_follows_the_filter_to_the_worker() {
    require_bpf!("record_shared_listener");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let conns = 50;
    // Listening before the recording starts: found in /proc, held by
    // both the master (the lower pid) and the worker that accepts.
    let server = ForkServer::start(tmp.path(), conns);
    let (port, worker) = (server.port, server.worker);
    let run = tmp.path().join("run");
    let out = Command::new(hvprof_bin())
        .args([
            "record",
            "-q",
            "-p",
            "tcp",
            "--pid",
            &worker.to_string(),
            "-o",
        ])
        .arg(&run)
        .arg("--")
        .arg(hvprof_bin())
        .args([
            "load",
            &format!("http://127.0.0.1:{port}/"),
            "-q",
            "-t",
            "1",
        ])
        .args(["-c", "1", "-n", &conns.to_string()])
        .output()
        .expect("hvprof runs");
    assert_ok(&out, "hvprof record");
    let lives: Vec<Value> = dump_events(&run)
        .into_iter()
        .filter(|e| e["kind"] == "sock_life")
        .collect();
    let accepted = lives
        .iter()
        .filter(|l| l["sport"] == port && first_change(l) == "LISTEN>SYN_RECV")
        .count();
    assert_eq!(accepted, conns, "the worker's accepted sockets");
    let other = lives.iter().find(|l| l["pid"] != worker);
    assert!(other.is_none(), "a life not the worker's: {other:?}");
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// `fork-server`: a master listening on loopback (its own, or a wildcard
/// address in a namespace) and its worker, which answers `conns`
/// connections and exits; both killed by pid if the test ends first.
struct ForkServer {
    /// Dropped after the worker is killed.
    _master: Owned,
    worker: u32,
    port: u16,
}

impl ForkServer {
    fn start(dir: &std::path::Path, conns: usize) -> Self {
        Self::start_in(dir, conns, None)
    }

    /// In namespace `ns`, listening on 0.0.0.0; else on 127.0.0.1.
    fn start_in(dir: &std::path::Path, conns: usize, ns: Option<&Netns>) -> Self {
        let (portfile, pidfile) = (dir.join("port"), dir.join("pid"));
        let mut cmd = match ns {
            // `ip netns exec` runs it in place: its pid is the master's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0])
                    .arg(helper_bin("fork-server"));
                c
            }
            None => Command::new(helper_bin("fork-server")),
        };
        cmd.arg(conns.to_string()).arg(&portfile).arg(&pidfile);
        if ns.is_some() {
            cmd.arg("0.0.0.0");
        }
        let master = Owned(cmd.spawn().expect("fork-server runs"));
        let start = Instant::now();
        while !portfile.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let read = |p: &std::path::Path| -> String {
            let text = std::fs::read_to_string(p).expect("fork-server wrote it");
            text.trim().to_string()
        };
        Self {
            _master: master,
            worker: read(&pidfile).parse().expect("a pid"),
            port: read(&portfile).parse().expect("a port"),
        }
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // SAFETY: a plain signal to a process this test started.
        unsafe { libc::kill(self.worker as i32, libc::SIGKILL) };
    }
}

#[test]
fn a_connection_open_before_the_recording_stays_its_servers() {
    require_bpf!("record_socket_owners_before");
    let _g = bpf_lock();
    // Through the raw tracepoint, and the classic one.
    for avoid in [None, Some("raw_tracepoint")] {
        held_connection_stays_the_workers(avoid, None);
    }
}

#[test]
fn a_connection_open_before_the_recording_to_a_wildcard_listener_stays_its_servers() {
    require_bpf!("record_socket_owners_before_wildcard");
    // On 0.0.0.0 only inside a namespace of the test's own: nothing from
    // the host's networks can reach it there.
    let ns = match Netns::try_new("wildcard") {
        Ok(ns) => ns,
        Err(why) => return skip("record_socket_owners_before_wildcard", &why),
    };
    let _g = bpf_lock();
    for avoid in [None, Some("raw_tracepoint")] {
        held_connection_stays_the_workers(avoid, Some(&ns));
    }
}

/// A connection to a `fork-server` worker made before `record -p tcp
/// --pid WORKER` and closed by the client during it (through the classic
/// tracepoint when `avoid` is `raw_tracepoint`): the server's socket
/// first changes state on the client's time, as the FIN comes in over
/// loopback, and must still be the worker's, found through its listener
/// (on 127.0.0.1, or in `ns` on 0.0.0.0); so must the listener's close;
/// no life may be anyone else's.
fn held_connection_stays_the_workers(avoid: Option<&str>, ns: Option<&Netns>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = ForkServer::start_in(tmp.path(), 1, ns);
    let (port, worker) = (server.port, server.worker);
    // Connected before the recording; the worker waits for a request.
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let client = match ns {
        Some(ns) => ns.connect(to),
        None => std::net::TcpStream::connect(to).expect("connect"),
    };
    let run = tmp.path().join("run");
    let worker_pid = worker.to_string();
    let args = ["-q", "-p", "tcp", "-d", "4s", "--pid", &worker_pid];
    let mut rec = recording(&args, &run, Stdio::null(), avoid);
    drop(client);
    let status = rec.0.wait().expect("hvprof ends");
    assert!(status.success(), "hvprof record: {status}");
    let lives: Vec<Value> = dump_events(&run)
        .into_iter()
        .filter(|e| e["kind"] == "sock_life")
        .collect();
    let server: Vec<&Value> = lives
        .iter()
        .filter(|l| l["sport"] == port && first_change(l) != "LISTEN>CLOSE")
        .collect();
    let case = (avoid, ns.map(|n| &n.0));
    assert_eq!(server.len(), 1, "{case:?}: the worker's socket: {lives:?}");
    assert_eq!(
        first_change(server[0]),
        "ESTABLISHED>CLOSE_WAIT",
        "{case:?}"
    );
    // The worker ends after its one connection, and the master then
    // closes the listener, on its own time: the listener's life is its
    // owner's too (its port, bound to 0, already let go by then).
    let listener = lives
        .iter()
        .filter(|l| l["sport"] == port && first_change(l) == "LISTEN>CLOSE")
        .count();
    assert_eq!(listener, 1, "{case:?}: the listener's close: {lives:?}");
    let other = lives
        .iter()
        .find(|l| l["pid"] != worker || l["dport"] == port);
    assert!(
        other.is_none(),
        "{case:?}: a life not the worker's: {other:?}"
    );
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

#[test]
fn the_same_listening_address_in_two_namespaces_keeps_two_owners() {
    require_bpf!("record_listeners_per_namespace");
    let ns = match Netns::try_new("owners") {
        Ok(ns) => ns,
        Err(why) => return skip("record_listeners_per_namespace", &why),
    };
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    // One origin on the host's loopback, another on the same address and
    // port in the namespace: both listening before the recording starts.
    let host = OriginProc::start(1);
    let addr = host.addr.to_string();
    let mut inside = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(hvprof_bin())
        .args(["origin", "--listen", &addr, "--threads", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec runs");
    let mut line = String::new();
    let stderr = inside.stderr.take().expect("piped stderr");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line)
        .expect("the namespace's origin prints its address");
    let inside = Owned(inside);
    assert!(line.contains(&addr), "namespace origin: {line}");
    let out = Command::new("ip")
        .args(["netns", "pids", &ns.0])
        .output()
        .expect("ip netns pids");
    let inside_pids: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let conns = 200;
    let load = format!(
        "{bin} load http://{addr}/?s=0 -q -t 1 -c 4 -n {conns}",
        bin = hvprof_bin().display()
    );
    let run = tmp.path().join("run");
    let out = Command::new(hvprof_bin())
        .args(["record", "-q", "-p", "tcp", "-o"])
        .arg(&run)
        .args(["--", "sh", "-c"])
        .arg(format!("{load} && ip netns exec {} {load}", ns.0))
        .output()
        .expect("hvprof runs");
    assert_ok(&out, "hvprof record");
    drop(inside);
    let port = host.addr.port();
    let mut owners: std::collections::BTreeMap<u64, usize> = Default::default();
    for l in dump_events(&run).iter().filter(|e| {
        e["kind"] == "sock_life" && e["sport"] == port && first_change(e) == "LISTEN>SYN_RECV"
    }) {
        *owners.entry(l["pid"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    let host_pid = u64::from(host.pid());
    assert_eq!(
        owners.get(&host_pid),
        Some(&conns),
        "host origin's lives: {owners:?}"
    );
    let inside_lives: usize = inside_pids.iter().filter_map(|p| owners.get(p)).sum();
    assert_eq!(
        inside_lives, conns,
        "namespace origin's lives (its pids {inside_pids:?}): {owners:?}"
    );
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

/// Lives of connections to `port`, from `dump --connections`.
fn connections_to(run: &std::path::Path, port: &str) -> Vec<Value> {
    let out = hvprof(&["dump", "--connections", run.to_str().expect("utf8 path")]);
    assert_ok(&out, "hvprof dump --connections");
    json_lines(&out.stdout)
        .into_iter()
        .filter(|c| c["server"].as_str() == Some(&format!("127.0.0.1:{port}")))
        .collect()
}

/// The programs `summary.json` says the probes got, in its order.
fn programs_of(summary: &Value) -> Vec<&str> {
    summary["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .filter_map(|p| p["program"].as_str())
        .collect()
}

/// `hvprof record -p tcp EXTRA -o RUN -- tcp-burst 200 RUN.port` with the
/// environment variable `env` set, checked to succeed: its output.
fn tcp_burst_200(env: (&str, &str), extra: &[&str], run: &std::path::Path) -> Output {
    let out = Command::new(hvprof_bin())
        .env(env.0, env.1)
        .args(["record", "-p", "tcp"])
        .args(extra)
        .arg("-o")
        .arg(run)
        .arg("--")
        .arg(helper_bin("tcp-burst"))
        .arg("200")
        .arg(run.with_extension("port"))
        .output()
        .expect("hvprof runs");
    assert_ok(&out, "hvprof record");
    out
}

#[test]
fn the_classic_tracepoint_records_the_same_lives_where_raw_ones_are_avoided() {
    require_bpf!("record_classic_tracepoint");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    tcp_burst_200(("HVPROF_AVOID_METHODS", "raw_tracepoint"), &[], &run);
    let summary: Value = read_json(&run.join("summary.json"));
    assert_eq!(
        summary["probes"][0]["program"], "hvp_sock_state",
        "{summary}"
    );
    // Without --bpf-stats the kernel's statistics stay off: no counts,
    // and no programs' time in the cost (the recorder's is there).
    assert!(summary["probes"][0]["run_count"].is_null(), "{summary}");
    assert!(summary["cost"]["programs_cpu_s"].is_null(), "{summary}");
    assert!(summary["cost"]["programs_pct"].is_null(), "{summary}");
    assert!(
        summary["cost"]["recorder_cpu_s"].as_f64() > Some(0.0),
        "{summary}"
    );
    let port = std::fs::read_to_string(run.with_extension("port")).expect("port");
    let conns = connections_to(&run, port.trim());
    assert_eq!(conns.len(), 200);
    for c in &conns {
        let eps = c["endpoints"].as_array().expect("endpoints");
        assert_eq!(eps.len(), 2, "both ends of {c}");
        assert!(c["syn_ns"].as_u64() <= c["established_ns"].as_u64(), "{c}");
        assert!(
            c["fin_ns"].is_u64() && c["fin_ns"].as_u64() <= c["close_ns"].as_u64(),
            "{c}"
        );
        assert!(c["close_ns"].is_u64(), "{c}");
        let eps: Vec<&Value> = eps.iter().collect();
        assert!(skipped_states(&eps).is_empty(), "{c}");
    }
    let meta: Value = read_json(&run.join("meta.json"));
    assert_eq!(meta["all_tcp_states"], false, "{meta}");
    assert!(meta.get("hooks_only").is_none(), "{meta}");
}

/// `HVPROF_HOOKS_ONLY=1` (what `bench overhead --floor` measures): the
/// socket probe attaches and its program runs at every state change, but
/// returns at once — nothing is recorded, and the run says why.
#[test]
fn with_hooks_only_the_programs_run_and_record_nothing() {
    require_bpf!("record_hooks_only");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = tcp_burst_200(("HVPROF_HOOKS_ONLY", "1"), &["--bpf-stats"], &run);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HVPROF_HOOKS_ONLY") && stderr.contains("nothing is recorded"),
        "{stderr}"
    );
    let summary: Value = read_json(&run.join("summary.json"));
    let sock = &summary["probes"][0];
    assert_eq!(sock["name"], "tcp:inet_sock_set_state", "{summary}");
    let runs = sock["run_count"].as_u64().expect("run_count");
    assert!(
        runs >= 200 * 8,
        "the program ran at each state change of both ends: {runs}"
    );
    assert_eq!(summary["events"], 0, "{summary}");
    assert_eq!(summary["connections"], 0, "{summary}");
    let port = std::fs::read_to_string(run.with_extension("port")).expect("port");
    assert!(connections_to(&run, port.trim()).is_empty());
    assert_eq!(read_json(&run.join("meta.json"))["hooks_only"], true);
}

/// Two busy loops sharing one CPU for a 3-second recording of the
/// scheduler probes: each must be found running about half the time and
/// waiting in the run queue the other half (the preempted one stays
/// runnable) — through the raw tracepoints (`raw`), or the classic ones.
fn two_hogs_on_one_cpu_share_it(raw: bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let hog = || {
        Owned(
            Command::new("taskset")
                .args(["-c", "0", "sh", "-c", "while :; do :; done"])
                .spawn()
                .expect("taskset runs"),
        )
    };
    let hogs = [hog(), hog()];
    // `taskset` runs the shell in its own process.
    let pids: Vec<u64> = hogs.iter().map(|h| u64::from(h.0.id())).collect();
    let mut cmd = Command::new(hvprof_bin());
    if !raw {
        cmd.env("HVPROF_AVOID_METHODS", "raw_tracepoint");
    }
    let out = cmd
        .args(["record", "-q", "-p", "sched", "-d", "3s", "-o"])
        .arg(&run)
        .output()
        .expect("hvprof runs");
    drop(hogs);
    assert_ok(&out, "hvprof record");
    let summary: Value = read_json(&run.join("summary.json"));
    let programs = programs_of(&summary);
    let want = if raw {
        ["hvp_sched_switch_raw", "hvp_sched_wakeup_raw"]
    } else {
        ["hvp_sched_switch", "hvp_sched_wakeup"]
    };
    assert_eq!(programs, want, "{summary}");
    let threads: Value = read_json(&run.join("threads.json"));
    let found: Vec<&Value> = threads["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .filter(|t| pids.contains(&t["tid"].as_u64().unwrap_or(0)))
        .collect();
    assert_eq!(found.len(), 2, "both hogs accounted: {threads}");
    for t in found {
        let on = t["oncpu_ns"].as_f64().unwrap_or(0.0);
        let runq = t["runq_ns"].as_f64().unwrap_or(0.0);
        assert!(on + runq > 1.5e9, "a hog lives through the recording: {t}");
        let share = on / (on + runq);
        assert!(
            (0.25..=0.75).contains(&share),
            "a hog sharing its CPU runs about half the time: {t}"
        );
        assert!(t["switches"].as_u64().unwrap_or(0) > 0, "{t}");
    }
}

#[test]
fn the_raw_scheduler_tracepoints_see_two_hogs_share_a_cpu() {
    require_bpf!("record_sched_raw");
    let _g = bpf_lock();
    two_hogs_on_one_cpu_share_it(true);
}

#[test]
fn the_classic_scheduler_tracepoints_see_two_hogs_share_a_cpu() {
    require_bpf!("record_sched_classic");
    let _g = bpf_lock();
    two_hogs_on_one_cpu_share_it(false);
}

/// `hvprof record ARGS -o RUN` in the background, once its event log
/// exists (the probes are attached); with `avoid`, as
/// `HVPROF_AVOID_METHODS` (`raw_tracepoint`: through the classic one).
fn recording(args: &[&str], run: &std::path::Path, stdout: Stdio, avoid: Option<&str>) -> Owned {
    let mut cmd = Command::new(hvprof_bin());
    cmd.arg("record")
        .args(args)
        .arg("-o")
        .arg(run)
        .stdout(stdout);
    if let Some(m) = avoid {
        cmd.env("HVPROF_AVOID_METHODS", m);
    }
    let mut rec = Owned(cmd.spawn().expect("hvprof runs"));
    wait_attached(&mut rec.0, run, Duration::from_secs(20));
    rec
}

/// Waits until `child`, recording into `run`, has its event log (the
/// probes are attached); fails if it ends first or takes over `limit`.
fn wait_attached(child: &mut std::process::Child, run: &std::path::Path, limit: Duration) {
    let t0 = Instant::now();
    while !run.join("events.log").exists() {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("hvprof ended before attaching ({st})");
        }
        assert!(t0.elapsed() < limit, "never attached");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sockets_still_open_when_recording_stops_keep_their_lives() {
    require_bpf!("record_open_sockets");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port().to_string();
    let mut rec = recording(&["-q", "-p", "tcp", "-d", "3s"], &run, Stdio::null(), None);
    // Opened during the recording, still open when it stops.
    let client =
        std::net::TcpStream::connect(("127.0.0.1", port.parse().expect("port"))).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    let status = rec.0.wait().expect("hvprof ends");
    assert!(status.success(), "{status}");
    drop((client, server));
    let conns = connections_to(&run, &port);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert!(c["established_ns"].is_u64(), "{c}");
    assert!(c["close_ns"].is_null(), "still open: {c}");
    let eps = c["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 2, "both ends of {c}");
}

#[test]
fn more_open_sockets_than_max_sockets_are_counted_lost_and_flagged() {
    require_bpf!("record_max_sockets");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let mut rec = recording(
        &["-p", "tcp", "--max-sockets", "8", "-d", "3s"],
        &run,
        Stdio::piped(),
        None,
    );
    // 20 connections (40 sockets) open at once, more than the map holds.
    let mut held = Vec::new();
    for _ in 0..20 {
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        held.push((c, s));
    }
    let status = rec.0.wait().expect("hvprof ends");
    drop(held);
    assert!(status.success(), "{status}");
    let mut text = String::new();
    use std::io::Read as _;
    let _ = rec
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut text);
    let summary: Value = read_json(&run.join("summary.json"));
    let lost = summary["lost"]["tcp:inet_sock_set_state"]
        .as_u64()
        .unwrap_or(0);
    assert!(lost >= 32, "40 sockets, 8 followed: lost {lost}; {summary}");
    assert!(
        text.contains("--max-sockets"),
        "the summary names the way out: {text}"
    );
    let conns = connections_to(&run, &port.to_string());
    let ends: usize = conns
        .iter()
        .map(|c| c["endpoints"].as_array().map_or(0, |e| e.len()))
        .sum();
    assert!(
        (1..=8).contains(&ends),
        "at most 8 sockets followed: {ends} in {conns:?}"
    );
}

/// Where cgroup v2 is mounted, if it is.
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
}

/// A cgroup of the test's own, removed (after its processes) when dropped.
struct Cgroup(std::path::PathBuf, Option<Owned>);

impl Drop for Cgroup {
    fn drop(&mut self) {
        drop(self.1.take());
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn cgroup_filter_keeps_only_that_cgroups_tasks() {
    require_bpf!("record_cgroup_filter");
    let Some(root) = cgroup2_mount() else {
        skip("record_cgroup_filter", "no cgroup v2 hierarchy mounted");
        return;
    };
    let _g = bpf_lock();
    let dir = root.join(format!("hvprof-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        skip(
            "record_cgroup_filter",
            &format!("cannot create a cgroup: {e}"),
        );
        return;
    }
    let mut cg = Cgroup(dir.clone(), None);
    let spin = Owned::busy_loop();
    let pid = spin.0.id();
    cg.1 = Some(spin);
    std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("moved into the cgroup");
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = Command::new(hvprof_bin())
        .args(["record", "-q", "-F", "499", "-d", "2s", "--cgroup"])
        .arg(&dir)
        .arg("-o")
        .arg(&run)
        .output()
        .expect("hvprof runs");
    assert_ok(&out, "hvprof record --cgroup");
    let events = dump_events(&run);
    assert!(
        events.len() > 100,
        "samples of the busy loop: {}",
        events.len()
    );
    assert_only_pid(&events, pid);
    drop(cg);
    let bad = hvprof(&[
        "record",
        "-d",
        "1s",
        "--cgroup",
        "/nonexistent",
        "-o",
        tmp.path().join("bad").to_str().expect("utf8"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--cgroup /nonexistent"));
}

/// `GET /metrics` on `port`, as text.
fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn live_view_and_metrics_follow_a_running_system_and_quit_on_ctrl_c() {
    require_bpf!("record_live_metrics");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Port 0: hvprof binds a free port and says which.
    let child = Command::new(hvprof_bin())
        .args(["record", "--live", "--metrics", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", hvprof_bin().display()));
    let mut live = Owned(child);
    let pid = live.0.id();
    let mut stderr = StderrLines::of(&mut live.0);
    let Some(port) = stderr
        .addr_after("metrics at http://", Duration::from_secs(30))
        .map(|a| a.port())
    else {
        panic!(
            "no metrics endpoint named; hvprof: {:?}, said {:?}",
            live.0.try_wait(),
            stderr.said
        );
    };
    // Without -o it records into a scratch directory named after it; the
    // probes are attached once its event log exists.
    let dirs = live_scratch_dirs(pid);
    assert_eq!(
        dirs.len(),
        1,
        "one hvprof-live-{pid}-… directory, found {dirs:?}"
    );
    wait_attached(&mut live.0, &dirs[0], Duration::from_secs(30));
    let out = Command::new(helper_bin("tcp-burst"))
        .arg("300")
        .arg(tmp.path().join("port"))
        .output()
        .expect("tcp-burst runs");
    assert!(out.status.success());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let steal_before = machine_steal_s();
    let text = scrape(port);
    let steal_after = machine_steal_s();
    // The machine's steal since boot, as /proc/stat has it around the
    // scrape (one tick of slack each way).
    let steal = metric(&text, "hvprof_machine_steal_seconds_total");
    assert!(
        steal >= steal_before - 0.011 && steal <= steal_after + 0.011,
        "steal {steal} s, /proc/stat {steal_before} .. {steal_after} s"
    );
    assert!(
        metric(&text, "hvprof_tcp_connections_total") >= 300.0,
        "{text}"
    );
    // One event per socket: the client's and the server's end.
    assert!(
        metric(
            &text,
            "hvprof_events_total{probe=\"tcp:inet_sock_set_state\"}"
        ) >= 300.0 * 2.0,
        "{text}"
    );
    assert!(text.contains("hvprof_cpu_samples_total{layer=\"socket\"}"));
    assert!(text.contains("hvprof_lost_events_total{probe=\"tcp:inet_sock_set_state\"} 0"));
    // hvprof's own process, as the kernel counts it.
    assert!(metric(&text, "process_cpu_seconds_total") > 0.0, "{text}");
    let rss = metric(&text, "process_resident_memory_bytes");
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: plain sysconf call.
    let kernel_rss = pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    assert!(
        rss > kernel_rss / 2.0 && rss < kernel_rss * 2.0,
        "resident {rss} bytes, the kernel says {kernel_rss}"
    );
    // Ctrl-C ends it cleanly: exit 0, the view drawn, probes detached.
    let mut live = live;
    // SAFETY: signalling the process we started, by its pid.
    unsafe { libc::kill(live.0.id() as i32, libc::SIGINT) };
    let stdout = live.0.stdout.take().expect("stdout");
    let status = live.0.wait().expect("hvprof ends");
    let view = std::io::read_to_string(stdout).expect("view");
    assert!(status.success(), "exit {status}");
    assert!(
        view.contains("connections/s")
            && view.contains("hvprof itself")
            && view.contains("top functions"),
        "{view}"
    );
    assert!(our_bpf_programs().is_empty(), "programs left attached");
    assert!(
        live_scratch_dirs(pid).is_empty(),
        "scratch directory left: {:?}",
        live_scratch_dirs(pid)
    );
}

#[test]
fn live_scratch_dir_is_gone_after_sigterm_and_sighup() {
    require_bpf!("record_live_scratch_signals");
    let _g = bpf_lock();
    // SIGHUP: the live view's terminal closed.
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGHUP, 129)] {
        let child = Command::new(hvprof_bin())
            .args(["record", "--live", "-d", "60s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hvprof runs");
        let mut rec = Owned(child);
        let pid = rec.0.id();
        // Recording once the event log exists (after attach).
        let t0 = Instant::now();
        let dir = loop {
            if let Some(d) = live_scratch_dirs(pid)
                .into_iter()
                .find(|d| d.join("events.log").exists())
            {
                break d;
            }
            if let Some(st) = rec.0.try_wait().expect("try_wait") {
                let err = rec.0.stderr.take().map(std::io::read_to_string);
                panic!("hvprof ended early ({st}): {err:?}");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "never started");
            std::thread::sleep(Duration::from_millis(50));
        };
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(pid as i32, sig) };
        let status = rec.0.wait().expect("hvprof exits");
        assert_eq!(status.code(), Some(code), "exit code after signal {sig}");
        assert!(!dir.exists(), "{} left after signal {sig}", dir.display());
        assert!(
            our_bpf_programs().is_empty(),
            "programs left after signal {sig}"
        );
    }
}

/// A pid no process has: a child that ran and was reaped, with no
/// `/proc/PID` left.
fn dead_pid() -> u32 {
    loop {
        let mut c = Command::new("true").spawn().expect("true runs");
        let pid = c.id();
        c.wait().expect("true ends");
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return pid;
        }
    }
}

/// Directories removed when dropped (also on a failed assertion).
struct RemoveDirs(Vec<std::path::PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn cleanup_removes_live_scratch_dirs_of_dead_runs_only() {
    // The other tests' `hvprof record` cleans up at start too: not now.
    let _g = bpf_lock();
    let tmp = std::env::temp_dir();
    let me = std::process::id();
    let dead = dead_pid();
    let gone = tmp.join(format!("hvprof-live-{dead}-abc"));
    // This test's own pid is alive: its directory stays.
    let alive = tmp.join(format!("hvprof-live-{me}-abc"));
    // Old names (no pid) are not this cleanup's.
    let unnamed = tmp.join(format!("hvprof-live-x{me}abc"));
    let _remove = RemoveDirs(vec![gone.clone(), alive.clone(), unnamed.clone()]);
    for d in [&gone, &alive, &unnamed] {
        std::fs::create_dir_all(d).expect("create directory");
        std::fs::write(d.join("events.log"), b"events").expect("write events.log");
    }
    let line = format!("directory {}", gone.display());
    let mentioned = |text: &str, d: &std::path::Path| text.contains(&d.display().to_string());

    // A dry run lists it and removes nothing.
    let dry = hvprof(&["cleanup", "--dry-run"]);
    assert_ok(&dry, "hvprof cleanup --dry-run");
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.contains(&format!("would remove {line}")), "{text}");
    assert!(
        !mentioned(&text, &alive) && !mentioned(&text, &unnamed),
        "{text}"
    );
    assert!(gone.exists() && alive.exists() && unnamed.exists());

    let o = hvprof(&["cleanup"]);
    assert_ok(&o, "hvprof cleanup");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("removed {line}")), "{text}");
    assert!(
        !mentioned(&text, &alive) && !mentioned(&text, &unnamed),
        "{text}"
    );
    assert!(!gone.exists(), "{} left", gone.display());
    assert!(
        alive.join("events.log").exists(),
        "a live pid's directory removed"
    );
    assert!(
        unnamed.join("events.log").exists(),
        "an unnamed directory removed"
    );

    // `record` does the same when it starts (as root), saying so on
    // stderr, even when it then has nothing to record.
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: not root: the cleanup at the start of `record` is not checked");
        return;
    }
    std::fs::create_dir_all(&gone).expect("create directory");
    let run = tempfile::tempdir().expect("tempdir");
    let o = hvprof(&["record", "-o", &run.path().join("run").to_string_lossy()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "nothing to record: {err}");
    assert!(err.contains("leftover(s)") && err.contains(&line), "{err}");
    assert!(!gone.exists(), "{} left", gone.display());
    assert!(alive.exists() && unnamed.exists());
}

/// Whether util-linux `script` (a command under a pseudo-terminal) runs.
fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The first child process of `parent`, from /proc.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...
        let ppid: u32 = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// Ids of the BPF programs process `pid` holds a descriptor of (program
/// and link descriptors name theirs as `prog_id:` in fdinfo).
fn bpf_prog_ids_of(pid: u32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect()
}

/// Ids of every loaded BPF program (`bpftool prog show --json`).
fn loaded_bpf_prog_ids() -> std::collections::BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool runs");
    assert!(out.status.success(), "bpftool prog show failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

#[test]
fn live_view_quits_on_q_typed_at_a_terminal() {
    require_bpf!("record_live_quit_key");
    if !have_script() {
        skip(
            "record_live_quit_key",
            "no `script` (util-linux) to give hvprof a terminal",
        );
        return;
    }
    let _g = bpf_lock();
    // `script` runs hvprof on a pseudo-terminal and passes what we write
    // to its stdin on as keys typed there.
    let child = Command::new("script")
        .args(["-q", "-e", "-c", "exec \"$HVPROF\" record --live -d 60s"])
        .arg("/dev/null")
        .env("HVPROF", hvprof_bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script runs");
    let mut live = Owned(child);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut stdout = live.0.stdout.take().expect("stdout");
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                seen.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        })
    };
    let view = || String::from_utf8_lossy(&seen.lock().expect("lock")).into_owned();
    // The view is drawn once the probes are attached (and the terminal is
    // in raw mode, so one key is enough).
    let t0 = Instant::now();
    while !view().contains("connections/s") {
        if let Some(st) = live.0.try_wait().expect("try_wait") {
            panic!("hvprof ended before drawing the view ({st}): {}", view());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no view within 30 s: {}",
            view()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The programs this hvprof holds (by id: another recording on the
    // machine may load programs of the same names meanwhile).
    let pid = child_of(live.0.id()).expect("hvprof runs under script");
    let held = bpf_prog_ids_of(pid);
    assert!(
        !held.is_empty(),
        "no BPF program attached while the view runs"
    );
    {
        use std::io::Write as _;
        let stdin = live.0.stdin.as_mut().expect("stdin");
        stdin.write_all(b"q").expect("typed q");
        stdin.flush().expect("flush");
    }
    let typed = Instant::now();
    let status = loop {
        if let Some(st) = live.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            typed.elapsed() < Duration::from_secs(10),
            "hvprof still running 10 s after `q` (of a 60 s recording): {}",
            view()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let stderr = live
        .0
        .stderr
        .take()
        .map(|e| std::io::read_to_string(e).unwrap_or_default())
        .unwrap_or_default();
    // `script -e` exits with hvprof's status.
    assert!(
        status.success(),
        "exit {status} after `q`; stderr: {stderr}; view: {}",
        view()
    );
    assert!(
        view().contains("top functions"),
        "the whole view was drawn: {}",
        view()
    );
    let left: Vec<u64> = loaded_bpf_prog_ids().intersection(&held).copied().collect();
    assert!(left.is_empty(), "programs left loaded: ids {left:?}");
}

#[test]
fn probes_are_attached_while_recording_and_gone_after_sigint_and_sigterm() {
    require_bpf!("record_signals");
    let _g = bpf_lock();
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let run = tmp.path().join("run");
        let mut child = Command::new(hvprof_bin())
            .args(["record", "--duration", "60s", "-q", "-o"])
            .arg(&run)
            .stderr(Stdio::piped())
            .spawn()
            .expect("hvprof runs");
        wait_attached(&mut child, &run, Duration::from_secs(20));
        assert!(
            our_bpf_programs().iter().any(|p| p.starts_with("hvp_sock")),
            "the socket program attached while recording"
        );
        // `probes list --stats` sees the running recording's programs.
        let stats = hvprof(&["probes", "list", "--stats", "--json"]);
        assert!(stats.status.success());
        let stats: Vec<Value> = serde_json::from_slice(&stats.stdout).expect("stats JSON");
        assert!(
            stats
                .iter()
                .any(|s| s["probe"] == "tcp:inet_sock_set_state" && s["run_count"].is_u64()),
            "{stats:?}"
        );
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().expect("hvprof exits");
        assert_eq!(status.code(), Some(code), "exit code after signal {sig}");
        assert!(
            run.join("summary.json").exists(),
            "summary written after signal {sig}"
        );
        let meta: Value = read_json(&run.join("meta.json"));
        assert_eq!(meta["status"], "complete");
        assert!(
            our_bpf_programs().is_empty(),
            "programs left after signal {sig}"
        );
    }
}

/// Runs `hvprof ARGS`, expecting a one-line error containing `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = hvprof(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty() && lines.iter().any(|l| l.contains(needle)),
        "{args:?}: expected an error naming {needle:?}, got {stderr:?}"
    );
    // clap adds a usage hint line after its one-line error; ours print one.
    assert!(lines.len() <= 3, "{args:?}: error is not short: {stderr:?}");
}

#[test]
fn bad_input_is_a_one_line_error_and_leaves_nothing_attached() {
    require_bpf!("record_bad_input");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let run = run.to_str().expect("utf8");
    assert_one_line_error(
        &[
            "record",
            "-o",
            run,
            "--probe",
            "no:such_probe",
            "--duration",
            "1s",
        ],
        "unknown probe \"no:such_probe\"",
    );
    // A path below a regular file can never be created.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let below = file.join("run");
    assert_one_line_error(
        &[
            "record",
            "-o",
            below.to_str().expect("utf8"),
            "--duration",
            "1s",
        ],
        "writable -o",
    );
    assert_one_line_error(&["record", "-o", run, "--duration", "banana"], "banana");
    assert_one_line_error(
        &["record", "-o", run, "--duration", "0s"],
        "greater than zero",
    );
    assert_one_line_error(&["record", "-o", run, "--"], "command after `--`");
    assert_one_line_error(&["record", "-o", run], "--duration");
    assert_one_line_error(
        &["record", "-o", run, "--", "/nonexistent/cmd"],
        "/nonexistent/cmd",
    );
    assert_one_line_error(&["dump", "/nonexistent/run"], "run directory");
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}

#[test]
fn probes_list_json_covers_every_layer_and_says_why() {
    require_bpf!("probes_list");
    let _g = bpf_lock();
    let out = hvprof(&["probes", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert!(rows.len() > 20);
    for r in &rows {
        for k in ["name", "layer", "path", "wanted", "reason"] {
            assert!(r[k].is_string(), "{k} in {r}");
        }
        assert!(r.get("obtained").is_some(), "obtained key in {r}");
        if r["obtained"].is_null() {
            assert!(
                !r["reason"].as_str().unwrap_or("").is_empty(),
                "unavailable without reason: {r}"
            );
        }
    }
    let layers: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["layer"].as_str()).collect();
    for l in [
        "socket",
        "netfilter",
        "switch",
        "vnic",
        "irq",
        "vmexit",
        "backend",
        "sched",
    ] {
        assert!(layers.contains(l), "layer {l} missing from the catalog");
    }
    let paths: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["path"].as_str()).collect();
    for p in [
        "virtio", "vmxnet3", "e1000", "netvsc", "netfront", "netback", "tap", "bridge",
    ] {
        assert!(paths.contains(p), "path {p} missing from the catalog");
    }
    let sock = rows
        .iter()
        .find(|r| r["name"] == "tcp:inet_sock_set_state")
        .expect("sock probe listed");
    // The raw tracepoint where BTF gives the socket's offsets, else the
    // classic one.
    assert_eq!(sock["wanted"], "raw_tracepoint");
    let raw = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    assert_eq!(
        sock["obtained"],
        if raw { "raw_tracepoint" } else { "tracepoint" },
        "{sock}"
    );
    // So do the scheduler's, with the task's offsets.
    for name in ["sched:sched_switch", "sched:sched_wakeup"] {
        let row = rows.iter().find(|r| r["name"] == name).expect("listed");
        assert_eq!(row["wanted"], "raw_tracepoint", "{row}");
        assert_eq!(
            row["obtained"],
            if raw { "raw_tracepoint" } else { "tracepoint" },
            "{row}"
        );
    }
    assert!(
        our_bpf_programs().is_empty(),
        "probes list left programs loaded"
    );
}

#[test]
fn report_from_a_recording_has_layers_threads_latency_and_a_layer_coloured_flamegraph() {
    require_bpf!("report_from_recording");
    let _g = bpf_lock();
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = Command::new(hvprof_bin())
        .args(["record", "-q", "-F", "999", "-o"])
        .arg(&run)
        .arg("--")
        .arg(helper_bin("tcp-burst"))
        .arg("2000")
        .arg(tmp.path().join("port"))
        .output()
        .expect("hvprof runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = tmp.path().join("rep");
    let out = hvprof(&[
        "report",
        run.to_str().expect("utf8"),
        "-o",
        rep.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = read_json(&rep.join("report.json"));
    let r = &report["runs"][0];
    assert!(r["connections"].as_u64().unwrap_or(0) >= 2000, "{r}");
    assert!(
        r["samples"].as_u64().unwrap_or(0) > 0,
        "CPU samples recorded"
    );
    let layers = r["layers"].as_array().expect("layers");
    let total: f64 = layers.iter().filter_map(|l| l["share_pct"].as_f64()).sum();
    assert!(
        (total - 100.0).abs() < 0.5,
        "layer shares add up to 100: {total}"
    );
    let burst = r["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .find(|t| t["comm"] == "tcp-burst")
        .expect("the workload's thread is accounted");
    assert!(burst["busy_pct"].as_f64().unwrap_or(0.0) > 0.0);
    assert_eq!(burst["layer"], "loadgen");
    assert!(r["latency_us"]["connect"]["count"].as_u64().unwrap_or(0) >= 2000);
    let svg = std::fs::read_to_string(rep.join(r["flamegraph"].as_str().expect("svg name")))
        .expect("flamegraph written");
    assert!(svg.contains("<svg") && svg.contains("tcp-burst"));
    for f in ["index.html", "summary.md"] {
        assert!(rep.join(f).exists(), "{f}");
    }
    let bad = hvprof(&[
        "report",
        tmp.path().to_str().expect("utf8"),
        "-o",
        rep.to_str().expect("utf8"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a run directory"));
}

#[test]
fn device_probes_see_only_the_selected_device_with_tcp_headers() {
    require_bpf!("device_probes");
    let _g = bpf_lock();
    device_probes_see_only_the_selected_device(true);
}

#[test]
fn the_classic_device_tracepoints_see_the_same_where_raw_ones_are_avoided() {
    require_bpf!("device_probes_classic");
    let _g = bpf_lock();
    device_probes_see_only_the_selected_device(false);
}

/// 50 connections on a namespace's loopback recorded with `--dev NS:lo`,
/// 50 on the host's that must not show up: through the raw tracepoints
/// (`raw`), or the classic ones.
fn device_probes_see_only_the_selected_device(raw: bool) {
    let ns = Netns::new(if raw { "dev" } else { "devtp" });
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    // 50 connections inside the namespace, and 50 on the host's loopback
    // that must not show up.
    // And, while recording, what `probes list --stats` says of the
    // programs: those sending the batches serve the device probe here.
    let stats = tmp.path().join("stats.json");
    let script = format!(
        "ip netns exec {ns} {burst} 50 {p1} && {burst} 50 {p2} && \
         {hvprof} probes list --stats --interval 200ms --json > {stats}",
        ns = ns.0,
        burst = helper_bin("tcp-burst").display(),
        p1 = tmp.path().join("p1").display(),
        p2 = tmp.path().join("p2").display(),
        hvprof = hvprof_bin().display(),
        stats = stats.display(),
    );
    let mut cmd = Command::new(hvprof_bin());
    if !raw {
        cmd.env("HVPROF_AVOID_METHODS", "raw_tracepoint");
    }
    let out = cmd
        .args([
            "record",
            "-q",
            "-p",
            "dev",
            "--dev",
            &format!("{}:lo", ns.0),
            "-o",
        ])
        .arg(&run)
        .args(["--", "sh", "-c", &script])
        .output()
        .expect("hvprof runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = read_json(&run.join("summary.json"));
    let programs = programs_of(&summary);
    let want = if raw {
        ["hvp_dev_xmit_raw", "hvp_dev_recv_raw"]
    } else {
        ["hvp_dev_xmit", "hvp_dev_recv"]
    };
    // Then the programs sending the per-CPU batches of packets.
    assert_eq!(programs[..2], want, "{summary}");
    assert_eq!(
        programs[2..],
        ["hvp_batch_flush", "hvp_batch_idle"],
        "{summary}"
    );
    let stats: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("stats JSON");
    let flush: Vec<&Value> = stats
        .iter()
        .filter(|s| {
            s["program"]
                .as_str()
                .is_some_and(|p| p.starts_with("hvp_batch"))
        })
        .collect();
    assert_eq!(flush.len(), 2, "{stats:?}");
    assert!(
        flush.iter().all(|s| s["probe"] == "dev:net_dev_start_xmit"),
        "{stats:?}"
    );
    let port: u64 = std::fs::read_to_string(tmp.path().join("p1"))
        .expect("port")
        .trim()
        .parse()
        .expect("port number");
    let dump = hvprof(&["dump", run.to_str().expect("utf8")]);
    let packets: Vec<Value> = json_lines(&dump.stdout)
        .into_iter()
        .filter(|e| e["kind"] == "dev_packet")
        .collect();
    assert!(!packets.is_empty(), "no packet events");
    let netns: std::collections::BTreeSet<u64> =
        packets.iter().filter_map(|p| p["netns"].as_u64()).collect();
    assert_eq!(netns.len(), 1, "only the namespace's device: {netns:?}");
    assert!(packets.iter().all(|p| p["dev"] == "lo"));
    // Every packet belongs to a connection to the namespace's listener.
    assert!(
        packets
            .iter()
            .all(|p| p["sport"] == port || p["dport"] == port)
    );
    let syns = packets
        .iter()
        .filter(|p| p["flags"] == "S" && p["dir"] == "xmit")
        .count();
    assert_eq!(syns, 50, "one SYN per connection");
    let pings = packets
        .iter()
        .filter(|p| p["dport"] == port && p["payload"] == 4 && p["dir"] == "recv")
        .count();
    assert_eq!(pings, 50, "each 4-byte ping received once");
    // The `sk_buff`'s length: at least the IP and TCP headers and the
    // payload (and the Ethernet header, going out).
    for p in &packets {
        let (len, payload) = (p["len"].as_u64(), p["payload"].as_u64());
        let eth = if p["dir"] == "xmit" { 14 } else { 0 };
        assert!(
            len.zip(payload).is_some_and(|(l, d)| l >= eth + 40 + d),
            "{p}"
        );
    }
    if !raw {
        return;
    }

    let bad = hvprof(&[
        "record",
        "-o",
        tmp.path().join("run2").to_str().expect("utf8"),
        "--dev",
        "nosuchdev0",
        "-d",
        "1s",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no such network device"));
    assert!(our_bpf_programs().is_empty(), "programs left attached");
}
