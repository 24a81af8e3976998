//! The `vm-*` topologies: HAProxy in a QEMU guest booted from the test bed
//! `cargo xtask testbed` builds (Debian kernel, busybox initramfs, HAProxy
//! with its libraries, static hvprof on a 9p share). Owns locating the
//! test bed, choosing the accelerator (KVM only when `/dev/kvm` takes a
//! normal guest), the QEMU command line, the guest's control channel (a
//! virtio-serial port `hv.ctl` speaking one line per command, see the
//! guest `/init` in xtask/src/testbed.rs), and HAProxy in the guest:
//! [`GuestLauncher`] makes loadgen's HAProxy driver start `hvprof
//! guest-haproxy`, a host-side stand-in that hands the config to the guest,
//! forwards the stats socket to the guest's, and stops the guest's HAProxy
//! when it is told to stop.
//!
//! The guest sits behind TAP `hvptap0` (10.77.2.1) in namespace
//! `hvp-<pid>-vm-<nic>-h`; the guest is 10.77.2.2; nothing else is routed.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::cleanup;
use super::netns::Netns;

/// Why a guest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "no test bed at {0}: build it with `cargo xtask testbed` (or pass --testbed DIR / set HVPROF_TESTBED)"
    )]
    NoTestbed(PathBuf),
    #[error("test bed {dir}: {detail} (rebuild it with `cargo xtask testbed`)")]
    BadTestbed { dir: PathBuf, detail: String },
    #[error(
        "qemu-system-x86_64 not found: install qemu-system-x86 from bookworm-backports (cargo xtask setup)"
    )]
    NoQemu,
    #[error("cannot start QEMU: {0}")]
    Spawn(io::Error),
    #[error("guest did not come up within {waited:?} ({accel}): {detail}; console: {console}")]
    Boot {
        waited: Duration,
        accel: String,
        detail: String,
        console: String,
    },
    #[error("KVM requested (--accel kvm) but {0}")]
    NoKvm(String),
    #[error("guest agent: {0}")]
    Agent(String),
}

/// The emulated NICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nic {
    Virtio,
    Vmxnet3,
    E1000,
    E1000e,
    Rtl8139,
}

impl Nic {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "virtio" => Self::Virtio,
            "vmxnet3" => Self::Vmxnet3,
            "e1000" => Self::E1000,
            "e1000e" => Self::E1000e,
            "rtl8139" => Self::Rtl8139,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Virtio => "virtio",
            Self::Vmxnet3 => "vmxnet3",
            Self::E1000 => "e1000",
            Self::E1000e => "e1000e",
            Self::Rtl8139 => "rtl8139",
        }
    }
    /// QEMU's `-nic model=`.
    pub fn qemu_model(self) -> &'static str {
        match self {
            Self::Virtio => "virtio-net-pci",
            Self::Vmxnet3 => "vmxnet3",
            Self::E1000 => "e1000",
            Self::E1000e => "e1000e",
            Self::Rtl8139 => "rtl8139",
        }
    }
    /// The guest driver expected to bind it.
    pub fn guest_driver(self) -> &'static str {
        match self {
            Self::Virtio => "virtio_net",
            Self::Vmxnet3 => "vmxnet3",
            Self::E1000 => "e1000",
            Self::E1000e => "e1000e",
            Self::Rtl8139 => "8139cp",
        }
    }
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator chosen and why.
#[derive(Debug, Clone)]
pub struct AccelChoice {
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    pub reason: String,
}

impl AccelChoice {
    pub fn describe(&self) -> String {
        format!("{}: {}", self.accel, self.reason)
    }
}

/// Why `/dev/kvm` can't run a normal guest here (`None`: it can, as far
/// as can be told without booting one).
fn kvm_unusable() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is absent".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("/dev/kvm is the PVM flavour (kvm_pvm), which hangs normal guests".into());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened".into());
    }
    None
}

pub fn choose_accel(want: Accel) -> AccelChoice {
    match (want, kvm_unusable()) {
        (Accel::Tcg, _) => AccelChoice {
            accel: "tcg",
            reason: "software emulation requested (--accel tcg)".into(),
        },
        (Accel::Kvm, _) => AccelChoice {
            accel: "kvm",
            reason: "requested (--accel kvm)".into(),
        },
        (Accel::Auto, None) => AccelChoice {
            accel: "kvm",
            reason: "/dev/kvm usable (falls back to tcg if the guest does not boot)".into(),
        },
        (Accel::Auto, Some(why)) => AccelChoice {
            accel: "tcg",
            reason: format!("software emulation: {why}"),
        },
    }
}

/// Guest options.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub testbed: Option<PathBuf>,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 512,
            accel: Accel::Auto,
            testbed: None,
        }
    }
}

/// The test bed directory: `--testbed`, `$HVPROF_TESTBED`, else
/// `target/testbed` next to this binary's `target/<profile>/`.
pub fn testbed_dir(opt: Option<&Path>) -> PathBuf {
    if let Some(p) = opt {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("HVPROF_TESTBED") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("testbed")))
        .unwrap_or_else(|| PathBuf::from("target/testbed"))
}

/// A test bed that has what a guest needs.
#[derive(Debug, Clone)]
pub struct Testbed {
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
}

impl Testbed {
    pub fn open(opt: Option<&Path>) -> Result<Self, VmError> {
        let dir = testbed_dir(opt);
        let manifest_path = dir.join("testbed.json");
        if !manifest_path.is_file() {
            return Err(VmError::NoTestbed(dir));
        }
        let bad = |detail: String| VmError::BadTestbed {
            dir: dir.clone(),
            detail,
        };
        let manifest = std::fs::read(&manifest_path)
            .map_err(|e| bad(format!("cannot read testbed.json: {e}")))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| bad(format!("bad testbed.json: {e}")))
            })?;
        for f in ["vmlinuz", "initramfs.cpio.gz", "share"] {
            if !dir.join(f).exists() {
                return Err(bad(format!("{f} is missing")));
            }
        }
        Ok(Self { dir, manifest })
    }
    fn field(&self, k: &str) -> String {
        self.manifest
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }
}

fn qemu_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// `QEMU emulator version X` → `X`.
pub fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .map(|l| l.trim_start_matches("QEMU emulator version ").to_string())
        .unwrap_or_default()
}

/// Whether a `vm-*` topology can run here.
pub fn available(_nic: Nic, opts: &VmOptions) -> Result<(), String> {
    if qemu_binary().is_none() {
        return Err(VmError::NoQemu.to_string());
    }
    Testbed::open(opts.testbed.as_deref()).map_err(|e| e.to_string())?;
    if opts.accel == Accel::Kvm
        && let Some(why) = kvm_unusable()
    {
        return Err(VmError::NoKvm(why).to_string());
    }
    Ok(())
}

/// What the guest ran on, for results.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VmEnvironment {
    pub nic_model: String,
    pub guest_driver: String,
    pub accel: String,
    pub accel_reason: String,
    pub qemu_version: String,
    pub guest_kernel: String,
    pub guest_kernel_package: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// QEMU start → guest answering on its control channel.
    pub boot_s: f64,
    pub testbed: PathBuf,
}

/// Port of the guest HAProxy's stats socket (TCP, on the guest address).
const GUEST_STATS_PORT: u16 = 9999;

/// A booted guest. Dropping it powers it off (QEMU killed if it does not
/// stop) and removes its namespace and run directory.
pub struct Vm {
    // Drop order: QEMU (in Drop) before the namespace and directory.
    qemu: Option<Child>,
    qemu_pid: u32,
    run_dir: PathBuf,
    ctl: PathBuf,
    host_ip: Ipv4Addr,
    guest_ip: Ipv4Addr,
    env: VmEnvironment,
    launcher: GuestLauncher,
    netns: Netns,
}

impl Vm {
    /// Creates the namespace and TAP, starts QEMU and waits until the guest
    /// answers on its control channel.
    pub fn start(topology: &str, nic: Nic, opts: &VmOptions) -> Result<Self, super::TopologyError> {
        let testbed = Testbed::open(opts.testbed.as_deref())?;
        let mut choice = choose_accel(opts.accel);
        if choice.accel == "kvm"
            && opts.accel == Accel::Kvm
            && let Some(why) = kvm_unusable()
        {
            return Err(VmError::NoKvm(why).into());
        }
        let (host_ip, guest_ip) = super::plan(2);
        let netns = Netns::create(&super::netns::ns_name(topology, "h"))?;
        netns.ip(
            "creating TAP hvptap0",
            &["tuntap", "add", "dev", "hvptap0", "mode", "tap"],
        )?;
        netns.ip(
            "addressing hvptap0",
            &["addr", "add", &format!("{host_ip}/24"), "dev", "hvptap0"],
        )?;
        netns.ip("bringing up hvptap0", &["link", "set", "hvptap0", "up"])?;
        let run_dir =
            Path::new(cleanup::STATE_DIR).join(format!("{}-{topology}", std::process::id()));
        {
            let _creating = cleanup::creating();
            cleanup::record_dir(&run_dir);
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(run_dir.join("share"))?;
        }
        let ctl = run_dir.join("ctl.sock");
        let mut vm = Self {
            qemu: None,
            qemu_pid: 0,
            run_dir: run_dir.clone(),
            ctl: ctl.clone(),
            host_ip,
            guest_ip,
            env: VmEnvironment {
                nic_model: nic.qemu_model().into(),
                guest_driver: String::new(),
                accel: choice.accel.into(),
                accel_reason: choice.reason.clone(),
                qemu_version: qemu_version(),
                guest_kernel: testbed.field("kernel_release"),
                guest_kernel_package: format!(
                    "{} {}",
                    testbed.field("kernel_package"),
                    testbed.field("kernel_version")
                ),
                vcpus: opts.cpus,
                memory_mib: opts.memory_mib,
                boot_s: 0.0,
                testbed: testbed.dir.clone(),
            },
            launcher: GuestLauncher {
                ctl,
                run_dir,
                guest: guest_ip,
                topology: topology.to_string(),
                qemu_pid: 0,
            },
            netns,
        };
        let booted = vm.boot(&testbed, nic, opts, &choice);
        let booted = match booted {
            Err(e) if choice.accel == "kvm" && opts.accel == Accel::Auto => {
                log::warn!(
                    "{topology}: KVM guest did not boot ({e}); falling back to software emulation"
                );
                vm.kill_qemu();
                choice = AccelChoice {
                    accel: "tcg",
                    reason: format!("software emulation: a KVM guest did not boot ({e})"),
                };
                vm.env.accel = "tcg".into();
                vm.env.accel_reason = choice.reason.clone();
                vm.boot(&testbed, nic, opts, &choice)
            }
            other => other,
        };
        booted?;
        Ok(vm)
    }

    fn boot(
        &mut self,
        tb: &Testbed,
        nic: Nic,
        opts: &VmOptions,
        choice: &AccelChoice,
    ) -> Result<(), VmError> {
        let dir = self.run_dir.clone();
        let _ = std::fs::remove_file(&self.ctl);
        let name = format!("{},debug-threads=on", self.netns.name());
        let append = format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 hvp.ip={}/24",
            self.guest_ip
        );
        let share = |p: &Path| p.display().to_string().replace(',', ",,");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.netns.name(), "qemu-system-x86_64"])
            .args(["-name", &name])
            .args(["-accel", choice.accel, "-M", "q35"])
            .args([
                "-m",
                &opts.memory_mib.to_string(),
                "-smp",
                &opts.cpus.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(tb.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(tb.dir.join("initramfs.cpio.gz"))
            .args(["-append", &append])
            .args([
                "-chardev",
                &format!("file,id=con,path={}", share(&dir.join("console.log"))),
                "-serial",
                "chardev:con",
            ])
            .args([
                "-nic",
                &format!(
                    "tap,ifname=hvptap0,script=no,downscript=no,model={},mac=52:54:00:77:02:02",
                    nic.qemu_model()
                ),
            ])
            .args([
                "-virtfs",
                &format!(
                    "local,path={},mount_tag=hvtb,security_model=none,readonly=on",
                    share(&tb.dir.join("share"))
                ),
            ])
            .args([
                "-virtfs",
                &format!(
                    "local,path={},mount_tag=hvrun,security_model=none",
                    share(&dir.join("share"))
                ),
            ])
            .args(["-device", "virtio-serial-pci"])
            .args([
                "-chardev",
                &format!("socket,id=ctl,path={},server=on,wait=off", share(&self.ctl)),
                "-device",
                "virtserialport,chardev=ctl,name=hv.ctl",
            ]);
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(VmError::Spawn)?;
        let log2 = log.try_clone().map_err(VmError::Spawn)?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // QEMU stops if hvprof dies.
        loadgen::haproxy::stop_with_parent(&mut cmd, libc::SIGTERM);
        let t0 = Instant::now();
        let creating = cleanup::creating();
        let child = cmd.spawn().map_err(VmError::Spawn)?;
        self.qemu_pid = child.id();
        self.launcher.qemu_pid = child.id();
        cleanup::record_process(child.id(), self.netns.name());
        self.qemu = Some(child);
        drop(creating);
        let limit = if choice.accel == "kvm" {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(180)
        };
        match self.wait_ready(limit) {
            Ok(reply) => {
                self.env.boot_s = t0.elapsed().as_secs_f64();
                // ready KERNEL NCPU NIC DRIVER
                let f: Vec<&str> = reply.split_whitespace().collect();
                if let Some(k) = f.get(1) {
                    self.env.guest_kernel = (*k).to_string();
                }
                self.env.guest_driver = f.get(4).map(|s| s.to_string()).unwrap_or_default();
                if self.env.guest_driver != nic.guest_driver() {
                    log::warn!(
                        "guest NIC driver is '{}', expected {}",
                        self.env.guest_driver,
                        nic.guest_driver()
                    );
                }
                Ok(())
            }
            Err(detail) => {
                let console = tail_file(&dir.join("console.log"), 4)
                    + " | qemu: "
                    + &tail_file(&dir.join("qemu.log"), 2);
                self.kill_qemu();
                Err(VmError::Boot {
                    waited: limit,
                    accel: choice.accel.to_string(),
                    detail,
                    console,
                })
            }
        }
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<String, String> {
        let t0 = Instant::now();
        let mut ctl = loop {
            if let Some(child) = self.qemu.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("QEMU exited ({status})"));
            }
            if let Ok(s) = UnixStream::connect(&self.ctl) {
                break Control::new(s, &self.ctl).map_err(|e| e.to_string())?;
            }
            if t0.elapsed() > limit {
                return Err("QEMU never opened its control socket".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        ctl.send("hello").map_err(|e| e.to_string())?;
        loop {
            match ctl.try_line(Duration::from_millis(500)) {
                Ok(Some(line)) if line.starts_with("ready") => return Ok(line),
                Ok(Some(_)) => {}
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if let Some(child) = self.qemu.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("QEMU exited ({status})"));
            }
            if t0.elapsed() > limit {
                return Err("no answer on the control channel".into());
            }
        }
    }

    fn kill_qemu(&mut self) {
        if let Some(mut child) = self.qemu.take() {
            if let Ok(None) = child.try_wait() {
                // SAFETY: signalling our own, not yet reaped child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(3) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
            cleanup::forget_process(self.qemu_pid);
        }
    }

    pub fn netns(&self) -> &str {
        self.netns.name()
    }
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }
    pub fn guest_ip(&self) -> Ipv4Addr {
        self.guest_ip
    }
    pub fn environment(&self) -> &VmEnvironment {
        &self.env
    }
    pub fn launcher(&self) -> &GuestLauncher {
        &self.launcher
    }

    /// The host end of the guest's link, in [`Self::netns`].
    pub fn tap(&self) -> &'static str {
        "hvptap0"
    }

    /// Starts `hvprof agent` in the guest, streaming to `collector` (on the
    /// host side of the TAP) with `token`; returns the agent's guest pid.
    pub fn start_agent(&self, collector: SocketAddr, token: &[u8]) -> Result<u32, VmError> {
        let share = self.run_dir.join("share");
        std::fs::write(share.join("agent.token"), token)
            .map_err(|e| VmError::Agent(format!("writing the token to the guest share: {e}")))?;
        let answer = UnixStream::connect(&self.ctl)
            .and_then(|s| Control::new(s, &self.ctl))
            .and_then(|mut c| c.request(&format!("agent {collector}"), Duration::from_secs(10)))
            .map_err(|e| VmError::Agent(format!("starting it: {e}")))?;
        answer
            .trim()
            .parse()
            .map_err(|_| VmError::Agent(format!("guest answered '{answer}'")))
    }

    /// The guest agent's log (on the run share), for error messages.
    pub fn agent_log(&self) -> String {
        tail_file(&self.run_dir.join("share/agent.log"), 5)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = self.qemu.as_mut()
            && let Ok(None) = child.try_wait()
        {
            // Ask the guest to power off; QEMU then exits by itself.
            let asked = UnixStream::connect(&self.ctl)
                .and_then(|s| Control::new(s, &self.ctl))
                .and_then(|mut c| c.request("poweroff", Duration::from_secs(5)))
                .is_ok();
            if asked {
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(5) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.kill_qemu();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        cleanup::forget_dir(&self.run_dir);
        // The namespace goes when `netns` drops, after this.
    }
}

fn tail_file(p: &Path, n: usize) -> String {
    let text = std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let t = lines[lines.len().saturating_sub(n)..].join(" | ");
    if t.is_empty() { "(empty)".into() } else { t }
}

/// One connection to the guest's control port.
struct Control {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Control {
    fn new(stream: UnixStream, path: &Path) -> io::Result<Self> {
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self {
            stream,
            reader,
            path: path.to_path_buf(),
        })
    }

    fn send(&mut self, cmd: &str) -> io::Result<()> {
        self.stream.write_all(format!("{cmd}\n").as_bytes())
    }

    /// A line, or `None` when nothing arrived within `wait`.
    fn try_line(&mut self, wait: Duration) -> io::Result<Option<String>> {
        self.stream.set_read_timeout(Some(wait))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "control channel closed",
            )),
            Ok(_) => Ok(Some(line.trim().to_string())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `cmd` and returns the rest of the `ok ...` answer.
    fn request(&mut self, cmd: &str, limit: Duration) -> io::Result<String> {
        self.send(cmd)?;
        let t0 = Instant::now();
        loop {
            if let Some(line) = self.try_line(Duration::from_millis(200))? {
                if let Some(rest) = line.strip_prefix("ok") {
                    return Ok(rest.trim().to_string());
                }
                if let Some(rest) = line.strip_prefix("err") {
                    return Err(io::Error::other(rest.trim().to_string()));
                }
                // `ready` from an earlier hello: skip.
            }
            if t0.elapsed() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer to '{cmd}' within {limit:?} on {}",
                        self.path.display()
                    ),
                ));
            }
        }
    }
}

/// Starts HAProxy in the guest through `hvprof guest-haproxy`.
#[derive(Debug, Clone)]
pub struct GuestLauncher {
    ctl: PathBuf,
    run_dir: PathBuf,
    guest: Ipv4Addr,
    topology: String,
    qemu_pid: u32,
}

impl loadgen::haproxy::Launcher for GuestLauncher {
    fn command(&self, _program: &Path, args: &[String]) -> Command {
        // This very binary, even if the file was replaced since it started.
        let mut c = Command::new("/proc/self/exe");
        c.arg("guest-haproxy")
            .arg("--ctl")
            .arg(&self.ctl)
            .arg("--share")
            .arg(self.run_dir.join("share"))
            .arg("--stats")
            .arg(SocketAddr::from((self.guest, GUEST_STATS_PORT)).to_string())
            .arg("--")
            .args(args);
        c
    }
    fn describe(&self) -> String {
        format!("{} guest (QEMU pid {})", self.topology, self.qemu_pid)
    }
    fn cpu_pid(&self) -> Option<u32> {
        Some(self.qemu_pid)
    }
}

/// `hvprof guest-haproxy` (internal): stands in for HAProxy on the host
/// while the real one runs in the guest.
#[derive(Args, Debug)]
pub struct GuestHaproxyArgs {
    /// The guest's control socket.
    #[arg(long)]
    ctl: PathBuf,
    /// The run's 9p share (the guest's /mnt/run).
    #[arg(long)]
    share: PathBuf,
    /// Where the guest HAProxy's stats socket listens.
    #[arg(long)]
    stats: SocketAddr,
    /// HAProxy's arguments (`-db -f CFG`).
    #[arg(last = true)]
    haproxy_args: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The config for the guest: the stats socket on TCP, `maxconn` within
/// what a small guest holds.
pub fn guest_config(host_cfg: &str, stats: SocketAddr) -> (String, Option<PathBuf>) {
    let mut socket = None;
    let mut out = String::new();
    for line in host_cfg.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if let Some(rest) = t.strip_prefix("stats socket ") {
            socket = rest.split_whitespace().next().map(PathBuf::from);
            out.push_str(&format!("{indent}stats socket ipv4@{stats} level admin\n"));
        } else if let Some(n) = t
            .strip_prefix("maxconn ")
            .and_then(|n| n.trim().parse::<u32>().ok())
        {
            out.push_str(&format!("{indent}maxconn {}\n", n.min(20_000)));
        } else if t.starts_with("server ") {
            // `server NAME ADDR maxconn N`: clamp the trailing maxconn too.
            let words: Vec<String> = t
                .split_whitespace()
                .scan(false, |after, w| {
                    let out = if *after {
                        w.parse::<u32>()
                            .map(|n| n.min(20_000).to_string())
                            .unwrap_or_else(|_| w.to_string())
                    } else {
                        w.to_string()
                    };
                    *after = w == "maxconn";
                    Some(out)
                })
                .collect();
            out.push_str(&format!("{indent}{}\n", words.join(" ")));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    (out, socket)
}

impl GuestHaproxyArgs {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        use anyhow::Context as _;
        let cfg = self
            .haproxy_args
            .iter()
            .position(|a| a == "-f")
            .and_then(|i| self.haproxy_args.get(i + 1))
            .context("no -f CONFIG among the haproxy arguments")?;
        let text = std::fs::read_to_string(cfg).with_context(|| format!("cannot read {cfg}"))?;
        let (guest_cfg, socket) = guest_config(&text, self.stats);
        let target = self.share.join("haproxy.cfg");
        std::fs::write(&target, guest_cfg)
            .with_context(|| format!("cannot write {}", target.display()))?;
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(
                    sig,
                    on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
                )
            };
        }
        // The control port takes one connection at a time: hold it only
        // per request, so that others (the agent, power-off) get through
        // while HAProxy runs.
        let request = |line: &str, limit: Duration| -> anyhow::Result<String> {
            let stream = UnixStream::connect(&self.ctl).with_context(|| {
                format!(
                    "cannot reach the guest control socket {}",
                    self.ctl.display()
                )
            })?;
            Ok(Control::new(stream, &self.ctl)?.request(line, limit)?)
        };
        let pids =
            request("start", Duration::from_secs(60)).context("starting HAProxy in the guest")?;
        log::info!("guest haproxy pids {pids}");
        // Forward the host-side stats socket to the guest's.
        let listener = match &socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        while !STOP.load(Ordering::Relaxed) {
            if let Some(l) = &listener
                && let Ok((client, _)) = l.accept()
            {
                let stats = self.stats;
                std::thread::spawn(move || forward(client, stats));
                continue;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        request("stop", Duration::from_secs(15)).context("stopping HAProxy in the guest")?;
        Ok(ExitCode::SUCCESS)
    }
}

/// Copies a stats connection both ways until the guest closes it.
fn forward(client: UnixStream, to: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let Ok(guest) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return;
    };
    let _ = guest.set_read_timeout(Some(Duration::from_secs(10)));
    let (Ok(mut c_in), Ok(mut g_out)) = (client.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_in, &mut g_out);
        let _ = g_out.shutdown(std::net::Shutdown::Write);
    });
    let mut g_in = guest;
    let mut c_out = client;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match g_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c_out.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_config_rewrites_stats_and_maxconn() {
        let host = "global\n    nbthread 2\n    maxconn 500000\n    stats socket /tmp/x/stats.sock mode 600 level admin\nbackend be\n    server origin 10.77.2.1:4000 maxconn 500000\n";
        let (g, sock) = guest_config(host, "10.77.2.2:9999".parse().unwrap());
        assert_eq!(sock, Some(PathBuf::from("/tmp/x/stats.sock")));
        assert!(
            g.contains("    stats socket ipv4@10.77.2.2:9999 level admin\n"),
            "{g}"
        );
        assert!(g.contains("    maxconn 20000\n"), "{g}");
        assert!(
            g.contains("server origin 10.77.2.1:4000 maxconn 20000"),
            "{g}"
        );
        assert!(g.contains("nbthread 2"));
    }

    #[test]
    fn nic_names() {
        for n in ["virtio", "vmxnet3", "e1000", "e1000e", "rtl8139"] {
            assert_eq!(Nic::parse(n).map(Nic::name), Some(n));
        }
        assert_eq!(Nic::Rtl8139.guest_driver(), "8139cp");
    }
}
