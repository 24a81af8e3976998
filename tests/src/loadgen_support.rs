//! Helpers for the load-generation tests (`tests/loadgen.rs`): a running
//! `hvprof origin` on a free loopback port that is stopped by pid when
//! dropped, a loopback port held closed, bounded runs of `hvprof`
//! subcommands, and a tiny raw HTTP/1 client for byte-exact checks.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::hvprof_bin;

/// The byte pattern the origin's bodies repeat (`loadgen::origin::PATTERN`).
pub const PATTERN: &[u8; 64] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\n";

/// A loopback port nothing listens on, held for as long as this lives:
/// bound without listening, so a connection to it is refused and no other
/// server can take it meanwhile (as one could a port bound and let go).
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        socket.bind(&loopback.into()).expect("bind 127.0.0.1:0");
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("the bound port");
        Self {
            _socket: socket,
            port,
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `hvprof origin`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct OriginProc {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl OriginProc {
    /// Starts `hvprof origin --listen 127.0.0.1:0 --threads N` and waits for
    /// the address it prints.
    pub fn start(threads: usize) -> Self {
        let mut child = Command::new(hvprof_bin())
            .args([
                "origin",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                &threads.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hvprof origin starts (build it with `cargo build --release -p hvprof`)");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("origin prints its address");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("no address in origin's first line: {line:?}")
            });
        Self {
            child: Some(child),
            addr,
        }
    }

    /// The origin's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `http://ADDR/?s=SIZE`.
    pub fn url(&self, size: &str) -> String {
        format!("http://{}/?s={size}", self.addr)
    }

    /// Stops the origin with SIGTERM and returns the JSON totals it prints.
    pub fn stop(mut self) -> serde_json::Value {
        let mut child = self.child.take().expect("origin running");
        terminate(&mut child, Duration::from_secs(5));
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("origin totals {out:?}: {e}"))
    }
}

impl Drop for OriginProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(2));
        }
    }
}

/// SIGTERM to our child by pid, SIGKILL after `grace`, then reap it.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling the pid of our own unreaped child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `hvprof ARGS`, killing it if it takes longer than `limit`.
pub fn hvprof_bounded(args: &[&str], limit: Duration) -> Output {
    hvprof_bounded_env(args, &[], limit)
}

/// [`hvprof_bounded`] with extra environment variables.
pub fn hvprof_bounded_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(hvprof_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hvprof runs (build it with `cargo build --release -p hvprof`)");
    // Drain the pipes on threads so a chatty child never blocks.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if t0.elapsed() > limit {
            terminate(&mut child, Duration::from_secs(2));
            panic!("hvprof {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs `hvprof load ARGS --json - -q` (bounded by 60 s) and returns the
/// JSON report and the whole output.
pub fn load_json(args: &[&str]) -> (serde_json::Value, Output) {
    let mut full = vec!["load"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--json", "-", "-q"]);
    let out = hvprof_bounded(&full, Duration::from_secs(60));
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hvprof {full:?}: JSON on stdout: {e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out)
}

/// A response read by [`http_get`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` on a new connection and reads one response framed by
/// `Content-Length`. Returns the stream too, for keep-alive checks.
pub fn http_exchange(addr: SocketAddr, request: &str) -> (RawResponse, TcpStream) {
    let mut s = TcpStream::connect(addr).expect("connect to origin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    let r = http_on(&mut s, request);
    (r, s)
}

/// Sends `request` on `s` and reads one response framed by `Content-Length`.
pub fn http_on(s: &mut TcpStream, request: &str) -> RawResponse {
    s.write_all(request.as_bytes()).expect("send request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("read head");
        assert!(
            n > 0,
            "connection closed inside the head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let mut r = RawResponse {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let len: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    while r.body.len() < len {
        let n = s.read(&mut chunk).expect("read body");
        assert!(n > 0, "body ended at {} of {len}", r.body.len());
        r.body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(r.body.len(), len, "no bytes beyond Content-Length");
    r
}

/// Whether the peer closed `s` (EOF within 2 s).
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set timeout");
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0))
}

/// The body the origin serves for `size` bytes.
pub fn expected_body(size: usize) -> Vec<u8> {
    (0..size).map(|i| PATTERN[i % 64]).collect()
}

/// Whether Debian's haproxy is installed here.
pub fn haproxy_available() -> bool {
    std::path::Path::new("/usr/sbin/haproxy").exists()
        || Command::new("haproxy")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// The first stderr line that carries the error.
pub fn error_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default()
        .to_string()
}

/// Pids of running haproxy processes whose command line mentions `needle`.
pub fn haproxy_pids_with(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("haproxy") && c.contains(needle)
            })
        })
        .collect()
}
