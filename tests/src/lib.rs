//! Shared helpers for the end-to-end tests: locating the real `hvprof`
//! binary, recording skips (a test that needs what this host lacks says so
//! and is counted as skipped by `cargo xtask test`), and inspecting the
//! kernel's loaded BPF programs.

pub mod loadgen_support;
pub mod topology_support;

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Output},
    sync::{Mutex, MutexGuard},
};

/// The release `hvprof` binary (`HVPROF_BIN`, else `target/release/hvprof`).
pub fn hvprof_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HVPROF_BIN") {
        return PathBuf::from(p);
    }
    workspace_root().join("target/release/hvprof")
}

/// A helper binary of this crate, built next to the test executable.
pub fn helper_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    workspace_root().join("target/release").join(name)
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `hvprof ARGS`, waited for.
pub fn hvprof(args: &[&str]) -> Output {
    Command::new(hvprof_bin())
        .args(args)
        .output()
        .expect("hvprof binary runs (build it with `cargo build --release`)")
}

/// Records that the calling test is skipped and why; the test then returns.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("HVPROF_SKIP_FILE")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{test}: {reason}");
    }
}

/// `Some(reason)` when BPF tests can't run here (not root).
pub fn bpf_unavailable() -> Option<String> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to load BPF programs".into());
    }
    None
}

/// Tests that attach probes run one at a time, so that "no program of
/// ours is left" checks see only their own.
pub fn bpf_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names of the loaded BPF programs that are hvprof's (`hvp_*`), from
/// `bpftool prog show --json`.
pub fn our_bpf_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool runs (installed by cargo xtask setup)");
    assert!(out.status.success(), "bpftool prog show failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool prints JSON");
    v.as_array()
        .map(|progs| {
            progs
                .iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()))
                .filter(|n| n.starts_with("hvp_"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A child process the test started, killed (by pid) and reaped when
/// dropped.
pub struct Owned(pub std::process::Child);

impl Owned {
    /// A shell busy loop: CPU load, no system calls.
    pub fn busy_loop() -> Self {
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("sh runs"),
        )
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asserts that `out` (of `what`) succeeded, showing its stderr if not.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The events of a run directory, as `hvprof dump` prints them.
pub fn dump_events(run: &std::path::Path) -> Vec<serde_json::Value> {
    let out = hvprof(&["dump", run.to_str().expect("utf8 path")]);
    assert_ok(&out, "hvprof dump");
    json_lines(&out.stdout)
}

/// The JSON file at `path` (a run's `meta.json`, `summary.json` ...),
/// panicking with the path if it can't be read or parsed.
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `hvprof record --live`'s scratch directories of process `pid`
/// (`$TMPDIR/hvprof-live-<pid>-…`).
pub fn live_scratch_dirs(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("hvprof-live-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir readable")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A child's stderr, read line by line on a thread of its own, so that a
/// child that says nothing can't hang a test.
pub struct StderrLines {
    rx: std::sync::mpsc::Receiver<String>,
    /// The lines read so far.
    pub said: Vec<String>,
}

impl StderrLines {
    /// Takes `child`'s stderr (piped).
    pub fn of(child: &mut std::process::Child) -> Self {
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            rx,
            said: Vec::new(),
        }
    }

    /// The address a line names right after `marker` (up to a space or a
    /// `/`), waiting up to `timeout` for it: how a test learns the port
    /// hvprof bound for `127.0.0.1:0` (a port picked by the test and let go
    /// could be taken by another test's server meanwhile).
    pub fn addr_after(
        &mut self,
        marker: &str,
        timeout: std::time::Duration,
    ) -> Option<std::net::SocketAddr> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let line = self.rx.recv_timeout(left).ok()?;
            let addr = line.split_once(marker).and_then(|(_, rest)| {
                rest.split(|c: char| c.is_whitespace() || c == '/')
                    .next()?
                    .parse()
                    .ok()
            });
            self.said.push(line);
            if addr.is_some() {
                return addr;
            }
        }
    }

    /// Everything said, once the child has ended (its stderr closed).
    pub fn all(mut self) -> String {
        self.said.extend(self.rx.iter());
        self.said.join("\n")
    }
}

/// Parses JSON lines.
pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// CPU seconds the hypervisor under this machine has taken from it since
/// boot (`/proc/stat`'s steal), read independently of hvprof.
pub fn machine_steal_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: f64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse().ok())
        .expect("a steal column in /proc/stat");
    // SAFETY: plain sysconf call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}
