//! The real HAProxy, driven as the seed used it: a reverse proxy in
//! `mode http` with one request per TCP connection on both sides
//! (`option httpclose`), a given thread count, no health checks. Writes the
//! config into a temporary directory, starts Debian's `haproxy` in the
//! foreground through a [`Launcher`] (the seam that later runs it in a
//! network namespace or a VM), waits until its frontend accepts
//! connections, reads its CPU time (`/proc/PID/stat`) and counters (stats
//! socket: `show info`, `show stat`), and stops it by pid: SIGTERM, then
//! SIGKILL after a timeout. Dropping a [`Haproxy`] stops it too.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why HAProxy could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error(
        "haproxy not found (looked for {0}): install Debian's haproxy (apt-get install haproxy, or cargo xtask setup)"
    )]
    NotFound(String),
    #[error("cannot create a temporary directory for the haproxy config: {0}")]
    TempDir(io::Error),
    #[error("not starting haproxy: this process is stopping")]
    Stopping,
    #[error("cannot write haproxy config {path}: {source}")]
    WriteConfig { path: PathBuf, source: io::Error },
    #[error("cannot start haproxy ({command}): {source}")]
    Spawn { command: String, source: io::Error },
    #[error("haproxy exited during start-up ({status}): {stderr}")]
    Exited { status: ExitStatus, stderr: String },
    #[error("haproxy did not accept connections on {addr} within {waited:?}: {stderr}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        stderr: String,
    },
    #[error("cannot read haproxy CPU time from /proc/{pid}/stat: {source}")]
    CpuTime { pid: u32, source: io::Error },
    #[error("haproxy stats socket {path}: {source}")]
    Stats { path: PathBuf, source: io::Error },
}

/// How the haproxy command is run: natively, or wrapped (e.g.
/// `ip netns exec NS haproxy ...`). A launcher must `exec` HAProxy so the
/// spawned pid is HAProxy's own (as `ip netns exec` does).
pub trait Launcher: Send + Sync {
    /// The command that runs `program args...`.
    fn command(&self, program: &Path, args: &[String]) -> Command;
    /// Short description for messages.
    fn describe(&self) -> String;
    /// The process whose CPU time is reported as HAProxy's when it is not
    /// the spawned one (a VM launcher names QEMU: the guest's cost in host
    /// terms).
    fn cpu_pid(&self) -> Option<u32> {
        None
    }
}

/// Runs HAProxy directly on this host.
#[derive(Debug, Clone, Copy, Default)]
pub struct Native;

impl Launcher for Native {
    fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
    fn describe(&self) -> String {
        "native".into()
    }
}

/// Runs HAProxy behind a command prefix, e.g. `["ip", "netns", "exec", "ns1"]`.
#[derive(Debug, Clone)]
pub struct Prefix(pub Vec<String>);

impl Launcher for Prefix {
    fn command(&self, program: &Path, args: &[String]) -> Command {
        let Some((first, rest)) = self.0.split_first() else {
            return Native.command(program, args);
        };
        let mut c = Command::new(first);
        c.args(rest).arg(program).args(args);
        c
    }
    fn describe(&self) -> String {
        self.0.join(" ")
    }
}

/// What the proxy does.
#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    /// Where the frontend listens.
    pub frontend: SocketAddr,
    /// The origin server.
    pub backend: SocketAddr,
    /// `nbthread`.
    pub threads: usize,
    /// Global and frontend `maxconn`; see [`default_maxconn`].
    pub maxconn: u32,
    /// HAProxy binary; see [`find_haproxy`].
    pub binary: PathBuf,
    /// `timeout client/server`.
    pub timeout: Duration,
    /// How long start-up may take.
    pub start_timeout: Duration,
}

impl HaproxyConfig {
    /// A config with the defaults: HAProxy found on this host,
    /// `maxconn` fitted to the open-files limit.
    pub fn new(
        frontend: SocketAddr,
        backend: SocketAddr,
        threads: usize,
    ) -> Result<Self, HaproxyError> {
        Ok(Self {
            frontend,
            backend,
            threads: threads.max(1),
            maxconn: default_maxconn(),
            binary: find_haproxy()?,
            timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(10),
        })
    }

    /// The configuration file text, with the stats socket at `socket`.
    pub fn render(&self, socket: &Path) -> String {
        let t = self.timeout.as_millis();
        format!(
            "# written by hvprof (loadgen::haproxy): the seed's reverse-proxy mode,
# one HTTP request per TCP connection on both sides.
global
    nbthread {threads}
    maxconn {maxconn}
    stats socket {socket} mode 600 level admin
    stats timeout 10s

defaults
    mode http
    option httpclose
    http-reuse never
    timeout connect 5s
    timeout client {t}ms
    timeout server {t}ms
    timeout http-request {t}ms

frontend fe
    bind {frontend}
    maxconn {maxconn}
    default_backend be

backend be
    # no 'check': no health checks
    server origin {backend} maxconn {maxconn}
",
            threads = self.threads,
            maxconn = self.maxconn,
            socket = socket.display(),
            frontend = self.frontend,
            backend = self.backend,
        )
    }
}

/// `maxconn` that fits the hard open-files limit: each proxied connection
/// holds two descriptors (client and server side), plus headroom.
pub fn default_maxconn() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    let hard = hard.min(1 << 20) as u32;
    (hard.saturating_sub(200) / 2).clamp(100, 100_000)
}

/// Finds the `haproxy` binary: `$HVPROF_HAPROXY`, then `PATH`, then
/// `/usr/sbin/haproxy`.
pub fn find_haproxy() -> Result<PathBuf, HaproxyError> {
    if let Some(p) = std::env::var_os("HVPROF_HAPROXY") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HaproxyError::NotFound(p.display().to_string()))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.iter()
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .ok_or_else(|| HaproxyError::NotFound("PATH and /usr/sbin".into()))
}

/// Makes the process `cmd` starts receive `sig` when the thread that
/// spawns it dies (`PR_SET_PDEATHSIG`, kept across `exec` of a normal
/// binary): a killed hvprof leaves no HAProxy or QEMU behind. Closes the
/// race where the parent dies between `fork` and the `prctl`: the child
/// then finds itself reparented and does not start (the spawn fails).
pub fn stop_with_parent(cmd: &mut Command, sig: libc::c_int) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: plain getter.
    let parent = unsafe { libc::getpid() };
    // SAFETY: only async-signal-safe calls (prctl, getppid) and no
    // allocation between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// HAProxy's config, stats socket and log live in a temporary directory
/// named `hvprof-haproxy-<pid>-…`: a killed run's directory is found by
/// the pid (`hvprof cleanup`).
pub const TEMP_PREFIX: &str = "hvprof-haproxy-";

/// Whether HAProxy directories may still be made (false once
/// [`remove_own_dirs`] ran). Held while one is made and filled, so that
/// the removal sees each whole or not at all.
static MAKING: std::sync::Mutex<bool> = std::sync::Mutex::new(true);

/// For a process about to exit without unwinding (a stop signal's
/// teardown): removes this process's HAProxy directories, and makes
/// [`Haproxy::start`] fail from now on rather than make another.
pub fn remove_own_dirs() {
    let mut open = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    *open = false;
    let mine = format!("{TEMP_PREFIX}{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// A running HAProxy.
pub struct Haproxy {
    child: Option<Child>,
    pid: u32,
    cpu_pid: u32,
    dir: tempfile::TempDir,
    socket: PathBuf,
    frontend: SocketAddr,
    started: Instant,
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(3);
    let t = lines[start..].join(" | ");
    if t.is_empty() {
        "(no output)".into()
    } else {
        t
    }
}

impl Haproxy {
    /// Writes the config, starts HAProxy through `launcher` and waits until
    /// its frontend accepts a TCP connection.
    ///
    /// On Linux the child gets `PR_SET_PDEATHSIG` = SIGTERM, so it also
    /// stops if this process dies without unwinding; that signal follows the
    /// *thread* that spawned it, so call this from a long-lived thread.
    pub fn start(config: &HaproxyConfig, launcher: &dyn Launcher) -> Result<Self, HaproxyError> {
        let making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        if !*making {
            return Err(HaproxyError::Stopping);
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(HaproxyError::TempDir)?;
        let socket = dir.path().join("stats.sock");
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, config.render(&socket)).map_err(|source| {
            HaproxyError::WriteConfig {
                path: cfg_path.clone(),
                source,
            }
        })?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr =
            std::fs::File::create(&stderr_path).map_err(|source| HaproxyError::WriteConfig {
                path: stderr_path.clone(),
                source,
            })?;
        // The directory is whole: `remove_own_dirs` may see it now.
        drop(making);
        // -db: stay in the foreground (the pid we spawn is HAProxy's own).
        let args = vec![
            "-db".to_string(),
            "-f".to_string(),
            cfg_path.display().to_string(),
        ];
        let mut cmd = launcher.command(&config.binary, &args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        stop_with_parent(&mut cmd, libc::SIGTERM);
        let command = format!(
            "{} {} {}",
            launcher.describe(),
            config.binary.display(),
            args.join(" ")
        );
        let child = cmd
            .spawn()
            .map_err(|source| HaproxyError::Spawn { command, source })?;
        let mut hp = Self {
            pid: child.id(),
            cpu_pid: launcher.cpu_pid().unwrap_or(child.id()),
            child: Some(child),
            dir,
            socket,
            frontend: config.frontend,
            started: Instant::now(),
        };
        hp.wait_ready(config.start_timeout, &stderr_path)?;
        Ok(hp)
    }

    fn wait_ready(&mut self, limit: Duration, stderr: &Path) -> Result<(), HaproxyError> {
        let t0 = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HaproxyError::Exited {
                    status,
                    stderr: tail(stderr),
                });
            }
            if TcpStream::connect_timeout(&self.frontend, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if t0.elapsed() > limit {
                let stderr = tail(stderr);
                self.stop_inner();
                return Err(HaproxyError::NotReady {
                    addr: self.frontend,
                    waited: limit,
                    stderr,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// HAProxy's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The frontend address clients connect to.
    pub fn frontend(&self) -> SocketAddr {
        self.frontend
    }

    /// The directory holding the config, stats socket and stderr log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// User plus system CPU time of all HAProxy threads so far.
    pub fn cpu_time(&self) -> Result<Duration, HaproxyError> {
        proc_cpu_time(self.cpu_pid).map_err(|source| HaproxyError::CpuTime {
            pid: self.cpu_pid,
            source,
        })
    }

    fn stats_command(&self, command: &str) -> Result<String, HaproxyError> {
        let err = |source| HaproxyError::Stats {
            path: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(err)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(err)?;
        s.write_all(format!("{command}\n").as_bytes())
            .map_err(err)?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(err)?;
        Ok(out)
    }

    /// `show info` as key/value pairs (e.g. `CumConns`, `CumReq`).
    pub fn show_info(&self) -> Result<BTreeMap<String, String>, HaproxyError> {
        let text = self.stats_command("show info")?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// `show stat` as one map per proxy/server line, keyed by CSV column
    /// (`pxname`, `svname`, `stot`, `bin`, `bout`, `hrsp_2xx`, ...).
    pub fn show_stat(&self) -> Result<Vec<BTreeMap<String, String>>, HaproxyError> {
        let text = self.stats_command("show stat")?;
        let mut lines = text.lines();
        let Some(header) = lines.next() else {
            return Ok(Vec::new());
        };
        let cols: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        Ok(lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                cols.iter()
                    .zip(l.split(','))
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect())
    }

    /// The counters a benchmark reports, summed from `show stat`.
    pub fn counters(&self) -> Result<Counters, HaproxyError> {
        let rows = self.show_stat()?;
        let get = |row: &BTreeMap<String, String>, k: &str| {
            row.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        let mut c = Counters::default();
        for row in &rows {
            match row.get("svname").map(String::as_str) {
                Some("FRONTEND") => {
                    c.frontend_sessions += get(row, "stot");
                    c.bytes_out += get(row, "bout");
                    c.requests += get(row, "req_tot");
                }
                Some("BACKEND") => {
                    c.backend_sessions += get(row, "stot");
                    c.http_5xx += get(row, "hrsp_5xx");
                    c.connect_errors += get(row, "econ");
                }
                _ => {}
            }
        }
        Ok(c)
    }

    /// Stops HAProxy: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(mut self) -> Option<ExitStatus> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // SAFETY: signalling the pid of our own, not yet reaped child.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Counters read from the stats socket (cumulative since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub frontend_sessions: u64,
    pub backend_sessions: u64,
    pub requests: u64,
    pub bytes_out: u64,
    pub http_5xx: u64,
    pub connect_errors: u64,
}

/// utime + stime of a process (all threads), from `/proc/PID/stat`.
pub fn proc_cpu_time(pid: u32) -> io::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: skip past it.
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), utime 14, stime 15.
    let num = |i: usize| -> io::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short stat line"))
    };
    let ticks = num(14)? + num(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_seed_mode() {
        let c = HaproxyConfig {
            frontend: "127.0.0.1:8080".parse().unwrap(),
            backend: "127.0.0.1:8000".parse().unwrap(),
            threads: 2,
            maxconn: 9000,
            binary: "/usr/sbin/haproxy".into(),
            timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(5),
        };
        let text = c.render(Path::new("/tmp/x/stats.sock"));
        for needle in [
            "nbthread 2",
            "mode http",
            "option httpclose",
            "bind 127.0.0.1:8080",
            "server origin 127.0.0.1:8000",
            "maxconn 9000",
            "stats socket /tmp/x/stats.sock",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
        let server = text
            .lines()
            .find(|l| l.trim_start().starts_with("server "))
            .unwrap();
        assert!(!server.contains("check"), "{server}");
    }

    #[test]
    fn maxconn_fits_limit() {
        let m = default_maxconn();
        assert!(m >= 100);
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(proc_cpu_time(std::process::id()).is_ok());
    }

    #[test]
    fn prefix_launcher_wraps() {
        let l = Prefix(vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            "ns1".into(),
        ]);
        let c = l.command(Path::new("/usr/sbin/haproxy"), &["-db".into()]);
        assert_eq!(c.get_program(), "ip");
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(args, ["netns", "exec", "ns1", "/usr/sbin/haproxy", "-db"]);
    }

    #[test]
    fn child_stops_with_the_thread_that_started_it() {
        use std::os::unix::process::ExitStatusExt as _;
        // The spawning thread ends while `sleep` runs: the parent-death
        // signal stops it.
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("30").stdin(Stdio::null());
            stop_with_parent(&mut cmd, libc::SIGKILL);
            cmd.spawn().expect("sleep starts")
        })
        .join()
        .expect("spawning thread");
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("child outlived the thread that started it");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }
}
