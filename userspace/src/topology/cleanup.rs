//! What hvprof created, and removing it: the state file
//! `/run/hvprof/<pid>.json` lists every namespace, process (pid plus a
//! marker its `/proc/PID/cmdline` must contain) and directory a run
//! created, written *before* each object exists and updated as it goes.
//! Owns the Ctrl-C/SIGTERM teardown of a running topology and `hvprof
//! cleanup`, which removes what a killed run left: only objects recorded in
//! a state file whose owner is gone, and namespaces named
//! `hvp-<dead pid>-…`. Nothing else is ever touched. Commands that create
//! topologies or start proxies run the same cleanup first
//! ([`cleanup_at_start`]); it also removes HAProxy's temporary directories
//! (`hvprof-haproxy-<pid>-…`) and `record --live`'s scratch directories
//! (`hvprof-live-<pid>-…`) of processes that are gone.
//!
//! Creating an object and recording it happen under one lock
//! ([`creating`]) that the signal teardown takes too, so a signal never
//! lands between the two: the teardown waits for the object in flight,
//! then removes everything while holding the lock, and nothing new is
//! created before the process exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
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

/// Held while an object is recorded and created, and by the teardown.
static CREATE: Mutex<()> = Mutex::new(());

/// Hold the returned guard while recording an object and creating it (and
/// while spawning a process and recording it), so that the signal teardown
/// sees either neither or both.
pub fn creating() -> MutexGuard<'static, ()> {
    CREATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn state_path(pid: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{pid}.json"))
}

/// Applies `f` to this process's state and rewrites the state file (or
/// removes it once empty). Installs the signal teardown before the first
/// state file is written, so a signal can't leave one behind.
fn update(f: impl FnOnce(&mut State)) {
    install_signal_teardown();
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let state = guard.get_or_insert_with(|| State {
        pid: std::process::id(),
        ..State::default()
    });
    f(state);
    write_state(state);
}

fn write_state(state: &State) {
    let path = state_path(state.pid);
    if state.is_empty() {
        let _ = std::fs::remove_file(&path);
        return;
    }
    let _ = std::fs::create_dir_all(STATE_DIR);
    match serde_json::to_vec_pretty(state) {
        Ok(bytes) => {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                let _ = std::fs::remove_file(&tmp);
                log::warn!("cannot write state file {}", path.display());
            }
        }
        Err(e) => log::warn!("cannot encode state: {e}"),
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
/// The signal the teardown is handling (0: none yet).
static GOT_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Seconds a command that stops on signals itself (`record --topology`)
/// gets to finish in order before the teardown takes over (0: none).
static GRACE_S: AtomicI32 = AtomicI32::new(0);

/// While the returned guard lives, a stop signal lets the command finish
/// in order (write what it recorded, take its topology down) for up to
/// `grace`; a second signal, or the grace running out, tears down at
/// once. The exit status stays 128 + signal either way.
pub fn stop_in_order(grace: Duration) -> GraceGuard {
    GRACE_S.store(grace.as_secs().clamp(1, 3600) as i32, Ordering::SeqCst);
    install_signal_teardown();
    GraceGuard
}

/// The stop signal received, if any (see [`stop_in_order`]).
pub fn stop_signal() -> Option<i32> {
    Some(GOT_SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// See [`stop_in_order`].
pub struct GraceGuard;

impl Drop for GraceGuard {
    fn drop(&mut self) {
        GRACE_S.store(0, Ordering::SeqCst);
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    GOT_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; one byte to our pipe.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove everything this process created,
/// then exit (128 + signal). Children started with a parent-death signal
/// (HAProxy, QEMU) stop with us. Installed once: by `bench` and `profile`
/// at start, by anything else on its first object.
pub fn install_signal_teardown() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if let Err(e) = start_teardown_thread() {
            log::warn!("{e}: teardown on Ctrl-C disabled");
        }
    });
}

fn start_teardown_thread() -> Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot create signal pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let read_fd = fds[0];
    std::thread::Builder::new()
        .name("hvprof-teardown".into())
        .spawn(move || {
            let Some(b) = read_signal(read_fd, -1) else {
                return;
            };
            let grace = GRACE_S.load(Ordering::SeqCst);
            if grace > 0 {
                eprintln!(
                    "hvprof: signal {b}: stopping (again to tear down at once; at the latest in {grace} s)"
                );
                // The command ends in order and exits through `finish`;
                // a second signal or the deadline ends it here.
                let _ = read_signal(read_fd, grace.saturating_mul(1000));
            }
            eprintln!("hvprof: signal {b}: tearing down topologies");
            teardown_and_exit(128 + i32::from(b));
        })
        .map_err(|e| format!("cannot start teardown thread: {e}"))?;
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only stores to an atomic and
        // writes to a pipe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    Ok(())
}

/// The next signal number written to the pipe, waiting at most
/// `timeout_ms` (-1: for ever).
fn read_signal(fd: libc::c_int, timeout_ms: i32) -> Option<u8> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n != 1 {
            return None;
        }
        let mut b = 0u8;
        // SAFETY: one-byte read from our pipe into a byte we own.
        let r = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        return (r == 1).then_some(b);
    }
}

/// Removes everything this process created and exits with `code`, holding
/// the creation and state locks throughout: an object being created is
/// finished (and recorded) first, and no new one is started.
fn teardown_and_exit(code: i32) -> ! {
    let _creating = creating();
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    // HAProxy's directories (HAProxy itself stops with us), and any
    // `record --live` scratch directory (its drop won't run).
    loadgen::haproxy::remove_own_dirs();
    for (dir, _) in temp_dirs(crate::record::LIVE_PREFIX)
        .into_iter()
        .filter(|d| d.1 == me)
    {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some(state) = guard.as_mut() {
        remove_all(state);
        // Namespaces named after this process that the state lost track
        // of (none expected; cheap to make sure).
        for ns in marked_namespaces() {
            if ns.1 == me {
                super::netns::delete_netns(&ns.0);
            }
        }
        state.namespaces.clear();
        state.processes.clear();
        state.dirs.clear();
        let _ = std::fs::remove_file(state_path(state.pid));
        let _ = std::fs::remove_file(state_path(state.pid).with_extension("tmp"));
    }
    std::process::exit(code);
}

/// Called when a command returns: if a stop signal arrived, the teardown
/// thread owns the exit (with 128 + signal) and this waits for it, so the
/// process never exits halfway through a teardown or with success after
/// Ctrl-C.
pub fn finish() {
    let sig = GOT_SIGNAL.load(Ordering::SeqCst);
    if sig != 0 {
        // Blocks while the teardown thread runs (it holds the locks until
        // it exits); does its work if it has not started yet.
        teardown_and_exit(128 + sig);
    }
}

/// `/run/netns` entries named `hvp-<pid>-…`, with that pid.
fn marked_namespaces() -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix("hvp-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())?;
            Some((name, pid))
        })
        .collect()
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

/// Run by the commands that create topologies or start proxies (`bench`,
/// `profile`, `record`) before anything else: removes what killed runs
/// left, saying so in one line on stderr (nothing when there was nothing).
pub fn cleanup_at_start() {
    // SAFETY: plain getter. Only root can have created anything.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let report = cleanup_stale(false);
    if !report.removed.is_empty() {
        eprintln!(
            "hvprof: removed {} leftover(s) of killed hvprof runs: {}",
            report.removed.len(),
            report.removed.join(", ")
        );
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
        // The state file is a leftover too: a run killed before its first
        // object (or whose children all died with it) leaves only this.
        report
            .removed
            .push(format!("state file {}", path.display()));
    }
    // Namespaces marked by name whose creator is gone (state file lost, or
    // killed between creating one and recording it).
    for (name, pid) in marked_namespaces() {
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
    // Run directories (`/run/hvprof/<pid>-…`) and half-written state files
    // (`<pid>.tmp`) of dead runs.
    if let Ok(entries) = std::fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let (pid, is_tmp) = match name.strip_suffix(".tmp") {
                Some(p) => (p.parse::<u32>().ok(), true),
                None => (name.split('-').next().and_then(|p| p.parse().ok()), false),
            };
            let Some(pid) = pid else {
                continue;
            };
            if pid == me || hvprof_alive(pid) || (!is_tmp && !path.is_dir()) {
                continue;
            }
            let line = if is_tmp {
                format!("state file {}", path.display())
            } else {
                format!("directory {}", path.display())
            };
            if report.removed.contains(&line) {
                continue;
            }
            if !dry_run {
                let _ = if is_tmp {
                    std::fs::remove_file(&path)
                } else {
                    std::fs::remove_dir_all(&path)
                };
            }
            report.removed.push(line);
        }
    }
    // HAProxy's temporary directories (`hvprof-haproxy-<pid>-…`) and
    // `record --live`'s scratch directories (`hvprof-live-<pid>-…`) whose
    // process is gone: any process, since the HAProxy driver also runs
    // inside other programs (its tests), and a reused pid keeps its
    // directory until that process is gone too.
    for prefix in [loadgen::haproxy::TEMP_PREFIX, crate::record::LIVE_PREFIX] {
        for (path, pid) in temp_dirs(prefix) {
            if pid == me || !process_gone(pid) {
                continue;
            }
            let line = format!("directory {}", path.display());
            if dry_run {
                report.removed.push(line);
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => report.removed.push(line),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report
                    .kept
                    .push(format!("{} (cannot remove: {e})", path.display())),
            }
        }
    }
    report
}

/// The pid in a directory name `<prefix><pid>-<suffix>`: `None` unless the
/// name has exactly that form (a pid of decimal digits without a leading
/// zero, a dash, a non-empty suffix).
fn pid_in_name(name: &str, prefix: &str) -> Option<u32> {
    let (pid, suffix) = name.strip_prefix(prefix)?.split_once('-')?;
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    if !digits || pid.starts_with('0') || suffix.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Directories `<prefix><pid>-…` in the temporary directory (HAProxy's,
/// `record --live`'s scratch), with their pid: only real directories (not
/// symlinks) of this user.
fn temp_dirs(prefix: &str) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    // SAFETY: plain getter.
    let euid = unsafe { libc::geteuid() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = pid_in_name(&e.file_name().to_string_lossy(), prefix)?;
            // Not followed: a symlink is not a directory here.
            let m = e.metadata().ok()?;
            (m.is_dir() && m.uid() == euid).then(|| (e.path(), pid))
        })
        .collect()
}

/// Whether no process has `pid` (or only a zombie does). In doubt — `/proc`
/// not mounted, `/proc/PID/stat` unreadable — the process counts as alive.
fn process_gone(pid: u32) -> bool {
    if !Path::new("/proc/self/stat").exists() {
        return false;
    }
    match proc_state(pid) {
        Ok(st) => st.is_some_and(|st| st == "Z" || st == "X"),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The state field of `/proc/PID/stat` (`R`, `S`, `Z` …; `None` if the
/// line can't be parsed).
fn proc_state(pid: u32) -> std::io::Result<Option<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(s.rfind(')')
        .and_then(|i| s[i + 1..].split_whitespace().next())
        .map(String::from))
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

    /// A pid no process has (a child that was started and reaped).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[test]
    fn stale_objects_of_dead_runs_are_found_and_live_ones_kept() {
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: /run/hvprof needs root");
            return;
        }
        std::fs::create_dir_all(STATE_DIR).unwrap();
        let dead = dead_pid();
        // A state file cut short between write and rename, and a run
        // directory: both of a dead run, found by a dry run.
        let tmp = state_path(dead).with_extension("tmp");
        let dir = Path::new(STATE_DIR).join(format!("{dead}-vm-test"));
        let hp = std::env::temp_dir().join(format!("{}{dead}-test", loadgen::haproxy::TEMP_PREFIX));
        let hp_mine = std::env::temp_dir().join(format!(
            "{}{}-test",
            loadgen::haproxy::TEMP_PREFIX,
            std::process::id()
        ));
        std::fs::write(&tmp, b"{\"pid\":").unwrap();
        // A run killed before its first object leaves only its state file.
        let bare = state_path(dead);
        std::fs::write(&bare, format!("{{\"pid\":{dead}}}")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&hp).unwrap();
        std::fs::create_dir_all(&hp_mine).unwrap();
        // Ours (a live hvprof: this test binary is named after it) is kept.
        let mine = state_path(std::process::id()).with_extension("tmp");
        std::fs::write(&mine, b"{").unwrap();
        let report = cleanup_stale(true);
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&bare);
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_file(&mine);
        let _ = std::fs::remove_dir(&hp);
        let _ = std::fs::remove_dir(&hp_mine);
        for gone in [&dir, &hp] {
            assert!(
                report
                    .removed
                    .contains(&format!("directory {}", gone.display())),
                "{report:?}"
            );
        }
        assert!(
            !report
                .removed
                .iter()
                .any(|l| l.contains(&hp_mine.display().to_string())),
            "{report:?}"
        );
        assert!(
            report
                .removed
                .contains(&format!("state file {}", tmp.display())),
            "{report:?}"
        );
        assert!(
            report
                .removed
                .contains(&format!("state file {}", bare.display())),
            "{report:?}"
        );
        assert!(
            !report
                .removed
                .iter()
                .any(|l| l.contains(&mine.display().to_string())),
            "{report:?}"
        );
    }

    #[test]
    fn live_scratch_names_parse_only_in_their_exact_form() {
        let p = crate::record::LIVE_PREFIX;
        assert_eq!(pid_in_name("hvprof-live-1234-abcDEF", p), Some(1234));
        assert_eq!(pid_in_name("hvprof-live-7-a-b", p), Some(7));
        for bad in [
            "hvprof-live-abcDEF",  // the old names: no pid
            "hvprof-live-1234",    // no suffix
            "hvprof-live-1234-",   // empty suffix
            "hvprof-live--1234-x", // no pid
            "hvprof-live-+12-x",
            "hvprof-live-012-x",
            "hvprof-live-12a-x",
            "hvprof-live-99999999999-x", // beyond u32
            "hvprof-haproxy-1234-x",
            "xhvprof-live-1234-x",
        ] {
            assert_eq!(pid_in_name(bad, p), None, "{bad}");
        }
    }

    #[test]
    fn only_dead_pids_are_gone() {
        assert!(!process_gone(std::process::id()));
        assert!(!process_gone(1));
        assert!(process_gone(dead_pid()));
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
