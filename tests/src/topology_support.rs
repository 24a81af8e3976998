//! Helpers for the topology tests (`tests/topology.rs`): what hvprof left
//! behind (namespaces named `hvp-<pid>-…`, state files, processes whose
//! command line names a namespace of that run), a guard around a running
//! `hvprof` that kills it by pid and runs `hvprof cleanup` when dropped,
//! a network namespace a test makes for itself, and whether the VM test
//! bed is there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{hvprof_bin, workspace_root};

/// Network namespaces whose name starts with `hvp-<pid>-`.
pub fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("hvp-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes (other than `pid` itself) whose command line mentions
/// `hvp-<pid>-` (QEMU, `ip netns exec` wrappers) or that run in one of
/// those namespaces' proxies: checked through `/proc/*/cmdline`.
pub fn processes_of(pid: u32) -> Vec<(u32, String)> {
    let marker = format!("hvp-{pid}-");
    let mut out = Vec::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if p == pid {
                continue;
            }
            let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&marker) || cmd.contains(&format!("/run/hvprof/{pid}-")) {
                out.push((p, cmd));
            }
        }
    }
    out
}

/// The state file of run `pid`.
pub fn state_file(pid: u32) -> PathBuf {
    PathBuf::from(format!("/run/hvprof/{pid}.json"))
}

/// Asserts that run `pid` left nothing: no namespace, process, state file
/// or run directory.
pub fn assert_nothing_left(pid: u32) {
    // Teardown finishes before exit, but give the kernel a moment to reap.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5)
        && (!namespaces_of(pid).is_empty() || !processes_of(pid).is_empty())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        namespaces_of(pid),
        Vec::<String>::new(),
        "namespaces left by {pid}"
    );
    assert_eq!(
        processes_of(pid),
        Vec::<(u32, String)>::new(),
        "processes left by {pid}"
    );
    assert!(!state_file(pid).exists(), "state file of {pid} left");
    let dirs: Vec<String> = std::fs::read_dir("/run/hvprof")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "run directories left by {pid}: {dirs:?}");
}

/// A running `hvprof` (spawned by the test). Dropping it kills it by pid
/// and runs `hvprof cleanup`, so a failing test leaves nothing behind.
pub struct HvprofProc {
    pub child: Option<Child>,
    pub pid: u32,
}

impl HvprofProc {
    pub fn spawn(args: &[&str]) -> Self {
        let child = Command::new(hvprof_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hvprof starts (build it with `cargo build --release -p hvprof`)");
        Self {
            pid: child.id(),
            child: Some(child),
        }
    }

    /// Waits up to `limit` for `cond`, panicking (after cleanup) if it
    /// never holds or the process exits first.
    pub fn wait_for(&mut self, what: &str, limit: Duration, mut cond: impl FnMut(u32) -> bool) {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if cond(self.pid) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let out = self.child.take().and_then(|c| c.wait_with_output().ok());
                let err = out
                    .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
                    .unwrap_or_default();
                panic!("hvprof exited ({status}) before {what}: {err}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not within {limit:?}");
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling the pid of our own, not yet reaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }

    /// Waits for exit (killing it after `limit`); returns the output.
    pub fn wait(&mut self, limit: Duration) -> std::process::Output {
        let mut child = self.child.take().expect("running");
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait_with_output().expect("hvprof output")
    }
}

impl Drop for HvprofProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(hvprof_bin())
            .arg("cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `Some(reason)` when the VM topologies can't run here: no QEMU, or no
/// test bed (`cargo xtask testbed`).
pub fn vm_unavailable() -> Option<String> {
    let qemu = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !qemu {
        return Some("qemu-system-x86_64 not installed (cargo xtask setup)".into());
    }
    let tb = testbed_dir();
    if !tb.join("testbed.json").is_file() {
        return Some(format!(
            "no test bed at {} (run cargo xtask testbed)",
            tb.display()
        ));
    }
    None
}

/// `$HVPROF_TESTBED`, else `target/testbed`.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("HVPROF_TESTBED")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/testbed"))
}

/// bench.json of a run directory.
pub fn bench_json(dir: &Path) -> Vec<serde_json::Value> {
    let bytes = std::fs::read(dir.join("bench.json")).expect("bench.json written");
    serde_json::from_slice(&bytes).expect("bench.json is JSON")
}

/// A network namespace a test creates (its loopback up), deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// `hvp-t<test pid>-TAG`; `Err` when namespaces can't be made here.
    pub fn try_new(tag: &str) -> Result<Self, String> {
        let name = format!("hvp-t{}-{tag}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(format!(
                    "ip netns add: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Err(e) => return Err(format!("ip (iproute2): {e}")),
        }
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip").args(["-n", &self.0]).args(args).status();
        assert!(
            ok.is_ok_and(|s| s.success()),
            "ip -n {} {}",
            self.0,
            args.join(" ")
        );
    }

    /// A TCP connection to `addr` made inside the namespace (from a thread
    /// that enters it: a socket belongs to the namespace it was made in).
    pub fn connect(&self, addr: std::net::SocketAddr) -> std::net::TcpStream {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("the namespace's file");
            // SAFETY: setns on a namespace file we opened; it affects only
            // this thread, which ends here.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                entered,
                0,
                "setns {path}: {}",
                std::io::Error::last_os_error()
            );
            std::net::TcpStream::connect(addr).expect("connect in the namespace")
        })
        .join()
        .expect("the connecting thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
