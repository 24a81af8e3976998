//! What hvprof created, and removing it: the state file
//! `/run/hvprof/<pid>.json` lists every namespace, process (pid plus a
//! marker its `/proc/PID/cmdline` must contain) and directory a run
//! created, written *before* each object exists and updated as it goes.
//! Owns the Ctrl-C/SIGTERM teardown of a running topology and `hvprof
//! cleanup`, which removes what a killed run left: only objects recorded in
//! a state file whose owner is gone, and namespaces named
//! `hvp-<dead pid>-…`. Nothing else is ever touched.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};

/// Where state files and per-run directories live.
pub const STATE_DIR: &str = "/run/hvprof";

/// A process hvprof started and may kill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// A string its command line contains (so a reused pid is never hit).
    pub marker: String,
}

/// Everything one hvprof process created.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub pid: u32,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub processes: Vec<Process>,
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

impl State {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.processes.is_empty() && self.dirs.is_empty()
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state_path(pid: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{pid}.json"))
}

/// Applies `f` to this process's state and rewrites the state file (or
/// removes it once empty). Installs the signal teardown on first use.
fn update(f: impl FnOnce(&mut State)) {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let first = guard.is_none();
    let state = guard.get_or_insert_with(|| State {
        pid: std::process::id(),
        ..State::default()
    });
    f(state);
    let path = state_path(state.pid);
    if state.is_empty() {
        let _ = std::fs::remove_file(&path);
    } else {
        let _ = std::fs::create_dir_all(STATE_DIR);
        match serde_json::to_vec_pretty(state) {
            Ok(bytes) => {
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, bytes)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .is_err()
                {
                    log::warn!("cannot write state file {}", path.display());
                }
            }
            Err(e) => log::warn!("cannot encode state: {e}"),
        }
    }
    drop(guard);
    if first {
        install_signal_teardown();
    }
}

pub fn record_netns(name: &str) {
    update(|s| s.namespaces.push(name.to_string()));
}
pub fn forget_netns(name: &str) {
    update(|s| s.namespaces.retain(|n| n != name));
}
pub fn record_process(pid: u32, marker: &str) {
    update(|s| {
        s.processes.push(Process {
            pid,
            marker: marker.to_string(),
        })
    });
}
pub fn forget_process(pid: u32) {
    update(|s| s.processes.retain(|p| p.pid != pid));
}
pub fn record_dir(dir: &Path) {
    update(|s| s.dirs.push(dir.to_path_buf()));
}
pub fn forget_dir(dir: &Path) {
    update(|s| s.dirs.retain(|d| d != dir));
}

/// The command line of a process, NULs as spaces (`None`: no such process).
fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// SIGTERM, then SIGKILL after `grace`, to `p` if its command line still
/// carries its marker. Returns whether it was signalled.
pub fn kill_process(p: &Process, grace: Duration) -> bool {
    let matches = |pid: u32| cmdline(pid).is_some_and(|c| c.contains(&p.marker));
    if p.pid <= 1 || !matches(p.pid) {
        return false;
    }
    let pid = p.pid as libc::pid_t;
    // SAFETY: signalling a pid whose command line we just checked.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        // Our own child turns zombie: reap it if it is ours.
        // SAFETY: non-blocking waitpid; fails harmlessly for non-children.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !matches(p.pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches(p.pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: as above.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    }
    true
}

/// Removes everything in `state`; returns one line per object removed.
fn remove_all(state: &State) -> Vec<String> {
    let mut done = Vec::new();
    for p in &state.processes {
        if kill_process(p, Duration::from_secs(3)) {
            done.push(format!("process {} ({})", p.pid, p.marker));
        }
    }
    for ns in state.namespaces.iter().filter(|n| n.starts_with("hvp-")) {
        if Path::new("/run/netns").join(ns).exists() {
            super::netns::delete_netns(ns);
            done.push(format!("namespace {ns}"));
        }
    }
    for d in state.dirs.iter().filter(|d| d.starts_with(STATE_DIR)) {
        if d.exists() && std::fs::remove_dir_all(d).is_ok() {
            done.push(format!("directory {}", d.display()));
        }
    }
    done
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte to our pipe.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove everything this process created,
/// then exit (128 + signal). Children started with a parent-death signal
/// (HAProxy, QEMU) stop with us.
fn install_signal_teardown() {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        log::warn!("cannot create signal pipe: teardown on Ctrl-C disabled");
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    let read_fd = fds[0];
    let spawned = std::thread::Builder::new()
        .name("hvprof-teardown".into())
        .spawn(move || {
            let mut b = 0u8;
            // SAFETY: blocking one-byte read from our pipe.
            let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
            if n != 1 {
                return;
            }
            eprintln!("hvprof: signal {b}: tearing down topologies");
            let state = STATE.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(state) = state {
                remove_all(&state);
                let _ = std::fs::remove_file(state_path(state.pid));
            }
            std::process::exit(128 + i32::from(b));
        });
    if spawned.is_err() {
        log::warn!("cannot start teardown thread: teardown on Ctrl-C disabled");
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only writes to a pipe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether `pid` is a live hvprof process.
fn hvprof_alive(pid: u32) -> bool {
    cmdline(pid).is_some_and(|c| {
        c.split(' ')
            .next()
            .is_some_and(|argv0| argv0.contains("hvprof"))
    })
}

/// `hvprof cleanup`: removes what killed runs left.
#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

impl CleanupArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let report = cleanup_stale(self.dry_run);
        for line in &report.removed {
            println!(
                "{}{line}",
                if self.dry_run {
                    "would remove "
                } else {
                    "removed "
                }
            );
        }
        for line in &report.kept {
            println!("kept {line}");
        }
        if report.removed.is_empty() {
            println!("nothing to clean up");
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// What `cleanup_stale` did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub removed: Vec<String>,
    pub kept: Vec<String>,
}

/// Removes objects of hvprof runs that are no longer alive.
pub fn cleanup_stale(dry_run: bool) -> CleanupReport {
    let mut report = CleanupReport::default();
    let me = std::process::id();
    let mut states = Vec::new();
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            {
                Some(s) => states.push((path, s)),
                None => report
                    .kept
                    .push(format!("{} (unreadable state file)", path.display())),
            }
        }
    }
    for (path, state) in states {
        if state.pid == me || hvprof_alive(state.pid) {
            report
                .kept
                .push(format!("objects of running hvprof pid {}", state.pid));
            continue;
        }
        if dry_run {
            report
                .removed
                .extend(state.namespaces.iter().map(|n| format!("namespace {n}")));
            report.removed.extend(
                state
                    .processes
                    .iter()
                    .map(|p| format!("process {} ({})", p.pid, p.marker)),
            );
            report.removed.extend(
                state
                    .dirs
                    .iter()
                    .map(|d| format!("directory {}", d.display())),
            );
        } else {
            report.removed.extend(remove_all(&state));
            let _ = std::fs::remove_file(&path);
        }
    }
    // Namespaces marked by name whose creator is gone (state file lost).
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = name
                .strip_prefix("hvp-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me || hvprof_alive(pid) {
                continue;
            }
            let line = format!("namespace {name}");
            if report.removed.contains(&line) {
                continue;
            }
            if !dry_run {
                super::netns::delete_netns(&name);
            }
            report.removed.push(line);
        }
    }
    // Run directories of dead runs (`/run/hvprof/<pid>-…`).
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !path.is_dir() || pid == me || hvprof_alive(pid) {
                continue;
            }
            let line = format!("directory {}", path.display());
            if report.removed.contains(&line) {
                continue;
            }
            if !dry_run {
                let _ = std::fs::remove_dir_all(&path);
            }
            report.removed.push(line);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let s = State {
            pid: 7,
            namespaces: vec!["hvp-7-veth-c".into()],
            processes: vec![Process {
                pid: 9,
                marker: "hvp-7-".into(),
            }],
            dirs: vec![PathBuf::from("/run/hvprof/7-vm-virtio")],
        };
        let t = serde_json::to_string(&s).unwrap();
        let back: State = serde_json::from_str(&t).unwrap();
        assert_eq!(back.namespaces, s.namespaces);
        assert_eq!(back.processes, s.processes);
    }

    #[test]
    fn never_kills_unmarked() {
        // Our own pid with a marker our command line lacks.
        let p = Process {
            pid: std::process::id(),
            marker: "no-such-marker-hvp-xyz".into(),
        };
        assert!(!kill_process(&p, Duration::from_millis(10)));
    }
}
