//! Loading the eBPF object and attaching catalog probes: decides each
//! probe's method from what this kernel offers (fentry → kprobe → raw
//! tracepoint → tracepoint → sampling), hands the programs this kernel's
//! offsets as read-only globals, attaches, and detaches everything when
//! dropped (all attachments are fd-based, so even a killed hvprof leaves
//! nothing).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, KProbe, PerfEvent, RawTracePoint, TracePoint},
};
use hvprof_common::{COMM_LEN, ListenKey, MAX_PROBES, SockOwner, task_filter};

use crate::{
    batch,
    catalog::{self, Hook, Method, ProbeSpec},
    kernel::{btf as kbtf, features::Features, tracefs},
    paths::{cpu, dev, sched, tcp, vmexit},
    rundir::meta::ProbeStatus,
};

/// The eBPF object, built by build.rs from `ebpf/hvprof-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hvprof-ebpf"));

pub const EVENTS_MAP: &str = "HVP_EVENTS";
/// Name under which function-entry probes report lost events.
pub const FUNC_PROBES: &str = "functions";
pub const LOST_MAP: &str = "HVP_LOST";

/// Methods to treat as unavailable, comma-separated.
pub const AVOID_METHODS_ENV: &str = "HVPROF_AVOID_METHODS";
/// Set (and not `0`): every program returns at once, so the probes attach
/// and cost what their attachment points alone cost, and nothing is
/// recorded (`cargo xtask bench overhead --floor`).
pub const HOOKS_ONLY_ENV: &str = "HVPROF_HOOKS_ONLY";

/// Whether [`HOOKS_ONLY_ENV`] asks for programs that return at once.
pub fn hooks_only() -> bool {
    std::env::var_os(HOOKS_ONLY_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A catalog row with the method it gets here.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub spec: &'static ProbeSpec,
    pub obtained: Option<Method>,
    /// One entry per better method that failed, `method: why`.
    pub reasons: Vec<String>,
}

impl Resolution {
    pub fn status(&self) -> ProbeStatus {
        ProbeStatus {
            name: self.spec.name.into(),
            layer: self.spec.layer.name().into(),
            path: self.spec.path.into(),
            point: self.spec.point(),
            wanted: self.spec.wanted().name().into(),
            obtained: self.obtained.map(|m| m.name().to_string()),
            reason: self.reasons.join("; "),
            fields: self.spec.fields.iter().map(|f| f.to_string()).collect(),
        }
    }
}

/// What the kernel offers, probed once.
pub struct Probe {
    pub features: Features,
    /// `Err(why)` when fentry programs can't be loaded here.
    pub fentry: Result<(), String>,
    /// Per raw-tracepoint program: `Err(why)` when the struct offsets it
    /// reads can't be resolved from this kernel's BTF.
    pub raw_tracepoint: BTreeMap<&'static str, Result<(), String>>,
}

impl Probe {
    /// Detects features; `ebpf` is used to test-load the fentry probe.
    pub fn detect(ebpf: &mut Ebpf) -> Self {
        let btf = kbtf::running().map_err(|e| log::warn!("{e:#}")).ok();
        let fentry = test_fentry(ebpf, btf.as_ref());
        let ready = |why: Option<String>, what: &str| match why {
            None => Ok(()),
            Some(why) => Err(format!("struct {what} offsets unresolved ({why})")),
        };
        let sock = ready(tcp::sock_offsets(btf.as_ref()).1, "sock");
        let task = ready(sched::task_offsets(btf.as_ref()).1, "task_struct");
        let skb = ready(dev::raw_unready(btf.as_ref()), "sk_buff");
        let raw_tracepoint = BTreeMap::from([
            (tcp::RAW_PROGRAM, sock),
            (sched::SWITCH_RAW_PROGRAM, task.clone()),
            (sched::WAKEUP_RAW_PROGRAM, task),
            (dev::XMIT_RAW_PROGRAM, skb.clone()),
            (dev::RECV_RAW_PROGRAM, skb),
        ]);
        let mut probe = Self {
            features: Features::detect(),
            fentry,
            raw_tracepoint,
        };
        probe.avoid(
            std::env::var(AVOID_METHODS_ENV)
                .unwrap_or_default()
                .split(','),
        );
        probe
    }

    /// Treats the named methods as unavailable (`$HVPROF_AVOID_METHODS`,
    /// e.g. `raw_tracepoint`: to exercise or measure the fallbacks).
    fn avoid<'a>(&mut self, methods: impl Iterator<Item = &'a str>) {
        let why = || Err(format!("avoided (${AVOID_METHODS_ENV})"));
        for m in methods {
            match m.trim() {
                "fentry" => self.fentry = why(),
                "kprobe" => self.features.kprobe = why(),
                "raw_tracepoint" => self.raw_tracepoint.values_mut().for_each(|r| *r = why()),
                "sampling" => self.features.sampling = why(),
                "" => {}
                other => log::warn!("${AVOID_METHODS_ENV}: unknown method {other:?}"),
            }
        }
    }

    /// Resolves every row of `specs`.
    pub fn resolve(&self, specs: &[&'static ProbeSpec]) -> Vec<Resolution> {
        specs.iter().map(|s| self.resolve_one(s)).collect()
    }

    fn resolve_one(&self, spec: &'static ProbeSpec) -> Resolution {
        let mut reasons = Vec::new();
        let obtained = self.method_for(spec, &mut reasons);
        Resolution {
            spec,
            obtained,
            reasons,
        }
    }

    /// The best method `spec` gets here; pushes why each better one failed.
    fn method_for(&self, spec: &ProbeSpec, reasons: &mut Vec<String>) -> Option<Method> {
        match spec.hook {
            Hook::Function {
                func,
                module,
                tracepoint,
            } => {
                let present = self.features.symbol(func);
                let absent = || match module {
                    Some(m) => format!("{func} is not in this kernel (module {m} not loaded)"),
                    None => format!("{func} is not in this kernel"),
                };
                // fentry
                let why = if let Err(e) = &self.fentry {
                    Some(e.clone())
                } else if spec.programs.fentry.is_none() {
                    Some("no hvprof fentry program for it yet".to_string())
                } else if present.is_none() {
                    Some(absent())
                } else {
                    None
                };
                match why {
                    None => return Some(Method::Fentry),
                    Some(w) => reasons.push(format!("fentry: {w}")),
                }
                // kprobe
                let why = if let Err(e) = &self.features.kprobe {
                    Some(e.clone())
                } else if spec.programs.kprobe.is_none() {
                    Some("no hvprof kprobe program for it yet".to_string())
                } else if present.is_none() {
                    Some(absent())
                } else {
                    None
                };
                match why {
                    None => return Some(Method::Kprobe),
                    Some(w) => reasons.push(format!("kprobe: {w}")),
                }
                // tracepoint carrying the same event
                match tracepoint {
                    Some((c, n)) if spec.programs.tracepoint.is_some() => {
                        if tracefs::tracepoint_exists(c, n) {
                            return Some(Method::Tracepoint);
                        }
                        reasons.push(format!("tracepoint: {c}:{n} not in this kernel"));
                    }
                    _ => reasons.push("tracepoint: none carries this event".into()),
                }
                // sampling only: its frames are attributed from CPU samples
                match (&self.features.sampling, present) {
                    (Ok(()), Some(_)) => Some(Method::Sampling),
                    (Err(e), _) => {
                        reasons.push(format!("sampling: {e}"));
                        None
                    }
                    (Ok(()), None) => {
                        reasons.push(format!("sampling: {}", absent()));
                        None
                    }
                }
            }
            Hook::PerfEvent => match &self.features.sampling {
                Ok(()) if spec.programs.perf_event.is_some() => Some(Method::Sampling),
                Ok(()) => {
                    reasons.push("sampling: no hvprof program for it yet".into());
                    None
                }
                Err(e) => {
                    reasons.push(format!("sampling: {e}"));
                    None
                }
            },
            Hook::Tracepoint { category, name, .. } => {
                if let Some(program) = spec.programs.raw_tracepoint {
                    match self.raw_tracepoint.get(program) {
                        Some(Ok(())) if tracefs::tracepoint_exists(category, name) => {
                            return Some(Method::RawTracepoint);
                        }
                        Some(Ok(())) => {}
                        Some(Err(e)) => reasons.push(format!("raw_tracepoint: {e}")),
                        None => reasons
                            .push(format!("raw_tracepoint: {program} reads no known offsets")),
                    }
                }
                if spec.programs.tracepoint.is_none() {
                    reasons.push("tracepoint: no hvprof program for it yet".into());
                    None
                } else if !tracefs::tracepoint_exists(category, name) {
                    reasons.push(format!("tracepoint: {category}:{name} not in this kernel"));
                    None
                } else {
                    Some(Method::Tracepoint)
                }
            }
        }
    }
}

/// Loads the fentry test program against a function this kernel has, then
/// unloads it.
fn test_fentry(ebpf: &mut Ebpf, btf: Option<&btf_rs::Btf>) -> Result<(), String> {
    let func = ["tcp_sendmsg", "tcp_v4_connect", "inet_sendmsg"]
        .into_iter()
        .find(|f| btf.is_some_and(|b| kbtf::has_function(b, f)))
        .ok_or("no BTF function to test fentry against (kernel without BTF?)")?;
    let abtf = Btf::from_sys_fs().map_err(|e| format!("kernel BTF unreadable: {e}"))?;
    let prog: &mut FEntry = ebpf
        .program_mut("hvp_fentry_test")
        .ok_or("fentry test program missing from the object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let r = prog.load(func, &abtf);
    let _ = prog.unload();
    r.map_err(|e| format!("loading an fentry program failed here ({})", one_error(&e)))
}

fn one_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    let s = s.lines().next().unwrap_or_default();
    s.trim_end()
        .trim_end_matches(". Verifier output:")
        .to_string()
}

/// Options for loading.
pub struct LoadOptions<'a> {
    pub ringbuf_bytes: u32,
    /// Open sockets followed at once at most.
    pub max_sockets: u32,
    /// Trace only the devices put in the device filter (else every device).
    pub dev_filter: bool,
    /// Only these tasks' samples, function and socket events.
    pub tasks: &'a TaskFilter,
    /// Follow every TCP state change, not only those something reads.
    pub all_tcp_states: bool,
}

/// `--pid` / `--comm` / `--cgroup`: the tasks whose CPU samples, function-entry and
/// socket events are kept, decided in the kernel by the current task
/// (so packet events handled in softirq on another task's time stay
/// with the device filter) — for a socket, once, by its owner: the task
/// that connects or listens, for an accepted socket its listener's
/// owner. Empty: every task.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Thread-group ids (the pids `ps` shows).
    pub pids: Vec<u32>,
    /// Thread names (`comm`, at most 15 bytes).
    pub comms: Vec<String>,
    /// cgroup v2 ids (the inode numbers of their directories).
    pub cgroups: Vec<u64>,
}

impl TaskFilter {
    fn bits(&self) -> u32 {
        let mut b = 0;
        if !self.pids.is_empty() {
            b |= task_filter::PIDS;
        }
        if !self.comms.is_empty() {
            b |= task_filter::COMMS;
        }
        if !self.cgroups.is_empty() {
            b |= task_filter::CGROUPS;
        }
        b
    }

    /// Checks the filter as given on the command line.
    pub fn validate(&self) -> Result<()> {
        for pid in &self.pids {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("--pid {pid}: no such process; `ps -e` lists them");
            }
        }
        for c in &self.comms {
            if c.is_empty() || c.len() >= COMM_LEN {
                bail!(
                    "--comm {c:?}: a thread name has 1 to {} bytes (as `ps -L -o comm` shows it)",
                    COMM_LEN - 1
                );
            }
        }
        if self.pids.len() > task_filter::MAX_PIDS as usize
            || self.comms.len() > task_filter::MAX_COMMS as usize
            || self.cgroups.len() > task_filter::MAX_COMMS as usize
        {
            bail!(
                "at most {} --pid, {} --comm and {} --cgroup",
                task_filter::MAX_PIDS,
                task_filter::MAX_COMMS,
                task_filter::MAX_COMMS
            );
        }
        Ok(())
    }

    /// The owner of the sockets that process `pid` listens on: the
    /// thread the filter's names picked (else the process itself), and
    /// whether the filter keeps it.
    fn owner(&self, pid: u32) -> SockOwner {
        let comm_of = |path: String| {
            let name = std::fs::read_to_string(path).unwrap_or_default();
            comm_key(name.trim_end_matches('\n'))
        };
        let mut owner = SockOwner {
            pid,
            tid: pid,
            comm: comm_of(format!("/proc/{pid}/comm")),
            wanted: u32::from(self.bits() == 0 || self.pids.contains(&pid)),
            _pad: 0,
        };
        if owner.wanted == 0 && !self.comms.is_empty() {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task"));
            for tid in threads.into_iter().flatten().flatten() {
                let Some(tid) = tid.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let comm = comm_of(format!("/proc/{pid}/task/{tid}/comm"));
                if self.comms.iter().any(|c| comm_key(c) == comm) {
                    (owner.tid, owner.comm, owner.wanted) = (tid, comm, 1);
                    break;
                }
            }
        }
        if owner.wanted == 0 && !self.cgroups.is_empty() {
            owner.wanted = u32::from(cgroup_id(pid).is_some_and(|id| self.cgroups.contains(&id)));
        }
        owner
    }

    fn install(&self, ebpf: &mut Ebpf) -> Result<()> {
        let map = |name: &str| anyhow!("map {name} missing from the object");
        let mut pids: aya::maps::HashMap<_, u32, u8> =
            aya::maps::HashMap::try_from(ebpf.map_mut(PIDS_MAP).ok_or_else(|| map(PIDS_MAP))?)?;
        for pid in &self.pids {
            pids.insert(pid, 1, 0)?;
        }
        let mut comms: aya::maps::HashMap<_, [u8; COMM_LEN], u8> =
            aya::maps::HashMap::try_from(ebpf.map_mut(COMMS_MAP).ok_or_else(|| map(COMMS_MAP))?)?;
        for c in &self.comms {
            comms.insert(comm_key(c), 1, 0)?;
        }
        let mut cgroups: aya::maps::HashMap<_, u64, u8> = aya::maps::HashMap::try_from(
            ebpf.map_mut(CGROUPS_MAP).ok_or_else(|| map(CGROUPS_MAP))?,
        )?;
        for id in &self.cgroups {
            cgroups.insert(id, 1, 0)?;
        }
        Ok(())
    }
}

/// A thread name as the kernel keeps it: at most `COMM_LEN - 1` bytes,
/// NUL padded (`--comm` names are checked to fit; `/proc` shows them cut
/// already).
fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut key = [0u8; COMM_LEN];
    let n = name.len().min(COMM_LEN - 1);
    key[..n].copy_from_slice(&name.as_bytes()[..n]);
    key
}

/// The cgroup v2 id of process `pid` (its directory's inode number), from
/// `/proc/PID/cgroup` and where cgroup2 is mounted.
fn cgroup_id(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS... - FSTYPE SOURCE ...`
    let root = mounts.lines().find_map(|l| {
        let (fields, fs) = l.split_once(" - ")?;
        fs.starts_with("cgroup2 ")
            .then(|| fields.split(' ').nth(4))
            .flatten()
    })?;
    let dir = std::path::Path::new(root).join(path.trim_start_matches('/'));
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// Notes the owners of the TCP sockets listening now (whose accepted
/// sockets are theirs), for the listeners the kernel didn't see start:
/// run once the socket program is attached, so that a listener opened
/// meanwhile is one or the other, and never overwriting what the kernel
/// noted (its owner is the fresher). A listener several processes hold
/// (a server's master and workers) goes to one the filter keeps, if any:
/// which of them accepts a connection is only known later. Beyond the
/// map's room, accepted sockets fall back to the task their handshake ran
/// on.
fn install_listeners(ebpf: &mut Ebpf, tasks: &TaskFilter, with_netns: bool) -> Result<()> {
    use std::collections::HashMap;
    let name = tcp::LISTENERS_MAP;
    let mut map: aya::maps::HashMap<_, ListenKey, SockOwner> = aya::maps::HashMap::try_from(
        ebpf.map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?,
    )?;
    let mut owners = HashMap::new();
    let mut chosen: HashMap<ListenKey, SockOwner> = HashMap::new();
    for (key, pid) in tcp::listeners(with_netns) {
        let owner = *owners.entry(pid).or_insert_with(|| tasks.owner(pid));
        let o = chosen.entry(key).or_insert(owner);
        if o.wanted == 0 && owner.wanted != 0 {
            *o = owner;
        }
    }
    for (key, owner) in chosen {
        match map.insert(key, owner, BPF_NOEXIST) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                log::debug!("listener owners: {e}; the rest are left out");
                break;
            }
            Ok(()) => {}
        }
    }
    Ok(())
}

/// `bpf_map_update_elem`'s flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;
const PIDS_MAP: &str = "HVP_PIDS";
const COMMS_MAP: &str = "HVP_COMMS";
const CGROUPS_MAP: &str = "HVP_CGROUPS";
const TASK_FILTER_GLOBAL: &str = "HVP_TASK_FILTER";
/// Bytes waiting in the ring at which a program wakes the reader.
const WAKEUP_GLOBAL: &str = "HVP_WAKEUP_BYTES";
const HOOKS_ONLY_GLOBAL: &str = "HVP_HOOKS_ONLY";

/// The object loaded by [`load`], with what [`attach`] needs of the load's
/// options.
pub struct Loaded {
    pub ebpf: Ebpf,
    tasks: TaskFilter,
    /// Listeners are known by network namespace (this kernel's BTF has
    /// the offsets the socket program reads it at).
    listen_netns: bool,
}

/// Loads the object with this kernel's offsets as globals. Nothing is
/// attached yet.
pub fn load(opts: &LoadOptions) -> Result<Loaded> {
    let tp = tcp::tp_offsets()?;
    let btf = kbtf::running().ok();
    let koff = tcp::kernel_offsets(btf.as_ref());
    let (sock_off, _) = tcp::sock_offsets(btf.as_ref());
    let sched_tp = sched::tp_offsets()?;
    let (task_off, _) = sched::task_offsets(btf.as_ref());
    let dev_off = dev::offsets(btf.as_ref(), opts.dev_filter);
    let wakeup_bytes = u64::from(opts.ringbuf_bytes) / 4;
    let (slots, overflow) = tcp::map_sizes(opts.max_sockets);
    let hooks_only = hooks_only();
    if hooks_only {
        log::warn!(
            "${HOOKS_ONLY_ENV} is set: every program returns at once, so the probes cost only \
             their attachment and nothing is recorded"
        );
    }
    let mut ebpf = EbpfLoader::new()
        .override_global(dev::OFFSETS_GLOBAL, &dev_off, true)
        .override_global(tcp::TP_GLOBAL, &tp, true)
        .override_global(tcp::KERNEL_GLOBAL, &koff, true)
        .override_global(tcp::SOCK_GLOBAL, &sock_off, true)
        .override_global(sched::TP_GLOBAL, &sched_tp, true)
        .override_global(sched::TASK_GLOBAL, &task_off, true)
        .override_global(vmexit::TP_GLOBAL, &vmexit::tp_offsets(), true)
        .override_global(TASK_FILTER_GLOBAL, &opts.tasks.bits(), true)
        .override_global(WAKEUP_GLOBAL, &wakeup_bytes, true)
        .override_global(HOOKS_ONLY_GLOBAL, &u32::from(hooks_only), true)
        .override_global(tcp::SLOT_COUNT_GLOBAL, &slots, true)
        .override_global(
            tcp::ALL_STATES_GLOBAL,
            &u32::from(opts.all_tcp_states),
            true,
        )
        .map_max_entries(EVENTS_MAP, opts.ringbuf_bytes)
        .map_max_entries(tcp::SLOTS_MAP, slots)
        .map_max_entries(tcp::SOCKS_MAP, overflow)
        .load(OBJECT)
        .context("loading hvprof's eBPF object")?;
    opts.tasks
        .install(&mut ebpf)
        .context("filling the task filter")?;
    Ok(Loaded {
        ebpf,
        tasks: opts.tasks.clone(),
        listen_netns: sock_off.net_valid != 0,
    })
}

/// Attached probes. Dropping it detaches them.
pub struct Session {
    pub ebpf: Ebpf,
    /// Status of every probe considered (attached or not).
    pub statuses: Vec<ProbeStatus>,
    /// Names of the attached probes' programs, by probe name.
    pub programs: BTreeMap<&'static str, &'static str>,
    /// Functions probed by the generic function-entry program.
    pub functions: Vec<FunctionAddr>,
    /// Programs that serve an attached probe without being its program
    /// (those sending the socket lives' batches), with that probe's name.
    helpers: Vec<(&'static str, &'static str)>,
    /// Runs the kernel skipped, per probe, read when the programs were
    /// detached (afterwards their counters are gone).
    skipped_at_detach: Option<BTreeMap<String, u64>>,
    /// Kernel BPF run-time statistics stay on while this fd is open (when
    /// they were asked for).
    stats: Option<OwnedFd>,
}

/// A probed function's address, to name function-entry events.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct FunctionAddr {
    pub addr: u64,
    pub function: String,
    pub probe: String,
}

/// Attaches the resolved probes that obtained a method. `required` probes
/// (asked for by name) must attach; others are skipped with their reason.
pub fn attach(
    loaded: Loaded,
    resolved: Vec<Resolution>,
    required: &[&str],
    sample_hz: u64,
    bpf_stats: bool,
    features: &Features,
) -> Result<Session> {
    let stats = if bpf_stats {
        Some(enable_stats()?)
    } else {
        None
    };
    let Loaded {
        mut ebpf,
        tasks,
        listen_netns,
    } = loaded;
    let mut statuses = Vec::new();
    let mut programs = BTreeMap::new();
    let mut functions = Vec::new();
    let mut helpers = Vec::new();
    let mut batching_tried = false;
    // The CPU sampler and the scheduler accounting go last, so that the
    // window they measure starts when everything is attached (loading
    // the other programs takes a while), like the recording's duration.
    let mut resolved: Vec<(usize, Resolution)> = resolved.into_iter().enumerate().collect();
    resolved.sort_by_key(|(_, r)| {
        matches!(r.spec.hook, Hook::PerfEvent) || r.spec.path == sched::PATH.name
    });
    for (index, mut r) in resolved {
        let required = required.contains(&r.spec.name);
        if let Some(mut method) = r.obtained {
            let mut res = attach_one(&mut ebpf, r.spec, method, sample_hz, features);
            if let (Err(e), Method::RawTracepoint) = (&res, method)
                && r.spec.programs.tracepoint.is_some()
            {
                // The classic tracepoint carries the same event. What the
                // raw program did attach (the wakeup program has more than
                // one tracepoint) goes first, or it would count twice.
                r.reasons
                    .push(format!("raw_tracepoint: attach failed: {e:#}"));
                if let Some(raw) = r.spec.programs.raw_tracepoint {
                    let _ = unload(&mut ebpf, raw);
                }
                method = Method::Tracepoint;
                r.obtained = Some(method);
                res = attach_one(&mut ebpf, r.spec, method, sample_hz, features);
            }
            if let Err(e) = res {
                let why = format!("{}: attach failed: {e:#}", method.name());
                if required {
                    bail!("probe {} could not be attached: {why}", r.spec.name);
                }
                r.reasons.push(why);
                r.obtained = None;
            } else if let Some(p) = program_for(r.spec, method) {
                programs.insert(r.spec.name, p);
                if r.spec.name == tcp::PROBE {
                    install_listeners(&mut ebpf, &tasks, listen_netns)
                        .context("noting the listening sockets' owners")?;
                }
                // Socket lives and packets cross in per-CPU batches; the
                // programs that send them serve the first of these probes.
                if batch::batched(r.spec) && !batching_tried && features.sampling.is_ok() {
                    batching_tried = true;
                    match batch::start(&mut ebpf) {
                        Ok(()) => {
                            helpers.extend(batch::FLUSH_PROGRAMS.map(|p| (r.spec.name, p)));
                        }
                        Err(e) => {
                            log::info!("socket lives and packets sent one by one: {e:#}");
                            for p in batch::FLUSH_PROGRAMS {
                                let _ = unload(&mut ebpf, p);
                            }
                        }
                    }
                }
                if let (Method::Kprobe, Hook::Function { func, module, .. }) = (method, r.spec.hook)
                {
                    functions.push(FunctionAddr {
                        addr: features.locate(func, module).map_or(0, |(_, a)| a),
                        function: func.to_string(),
                        probe: r.spec.name.to_string(),
                    });
                }
            }
        } else if required {
            bail!(
                "probe {} is unavailable on this kernel: {}",
                r.spec.name,
                r.reasons.join("; ")
            );
        }
        statuses.push((index, r.status()));
    }
    statuses.sort_by_key(|(i, _)| *i);
    let statuses = statuses.into_iter().map(|(_, s)| s).collect();
    if programs.is_empty() {
        bail!("no probe could be attached on this kernel; see `hvprof probes list`");
    }
    Ok(Session {
        ebpf,
        statuses,
        programs,
        functions,
        helpers,
        skipped_at_detach: None,
        stats,
    })
}

fn program_for(spec: &ProbeSpec, method: Method) -> Option<&'static str> {
    match method {
        Method::Fentry => spec.programs.fentry,
        Method::Kprobe => spec.programs.kprobe,
        Method::RawTracepoint => spec.programs.raw_tracepoint,
        Method::Tracepoint => spec.programs.tracepoint,
        Method::Sampling => spec.programs.perf_event,
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    method: Method,
    sample_hz: u64,
    features: &Features,
) -> Result<()> {
    // A function sampled only: the CPU sampler carries it.
    if let (Method::Sampling, Hook::Function { .. }) = (method, spec.hook) {
        return Ok(());
    }
    let name = program_for(spec, method).ok_or_else(|| anyhow!("no program"))?;
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    // Tracepoints a tracepoint row's program attaches to besides its own.
    let also: &[(&str, &str)] = if spec.name == "sched:sched_wakeup" {
        sched::WAKEUP_ALSO
    } else {
        &[]
    };
    match (method, spec.hook) {
        (
            Method::Tracepoint,
            Hook::Tracepoint {
                category, name: tp, ..
            },
        )
        | (
            Method::Tracepoint,
            Hook::Function {
                tracepoint: Some((category, tp)),
                ..
            },
        ) => {
            let prog: &mut TracePoint = prog.try_into()?;
            if prog.fd().is_err() {
                prog.load().with_context(|| format!("loading {name}"))?;
            }
            for &(c, t) in std::iter::once(&(category, tp)).chain(also) {
                prog.attach(c, t)
                    .with_context(|| format!("attaching {name} to {c}:{t}"))?;
            }
            Ok(())
        }
        (Method::RawTracepoint, Hook::Tracepoint { name: tp, .. }) => {
            let prog: &mut RawTracePoint = prog.try_into()?;
            if prog.fd().is_err() {
                prog.load().with_context(|| format!("loading {name}"))?;
            }
            for &t in std::iter::once(&tp).chain(also.iter().map(|(_, t)| t)) {
                prog.attach(t)
                    .with_context(|| format!("attaching {name} to raw tracepoint {t}"))?;
            }
            Ok(())
        }
        (Method::Kprobe, Hook::Function { func, module, .. }) => {
            let prog: &mut KProbe = prog.try_into()?;
            if prog.fd().is_err() {
                prog.load().with_context(|| format!("loading {name}"))?;
            }
            let target = features
                .locate(func, module)
                .map_or_else(|| func.to_string(), |(t, _)| t);
            prog.attach(&target, 0)
                .with_context(|| format!("kprobe on {target}"))?;
            Ok(())
        }
        (Method::Sampling, Hook::PerfEvent) => {
            let prog: &mut PerfEvent = prog.try_into()?;
            if prog.fd().is_err() {
                prog.load().with_context(|| format!("loading {name}"))?;
            }
            cpu::attach_clock(prog, 1_000_000_000 / sample_hz.max(1), name)
        }
        (m, _) => bail!(
            "{} attachment is not implemented for {}",
            m.name(),
            spec.name
        ),
    }
}

/// Turns the kernel's BPF run-time statistics on for as long as the fd
/// returned stays open.
pub fn enable_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("turning on the kernel's BPF run-time statistics: {e}"))
}

/// Per-program kernel statistics (`None`: not kept, see `--bpf-stats`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramStats {
    pub name: String,
    pub program: String,
    pub run_time_ns: Option<u64>,
    pub run_count: Option<u64>,
}

impl Session {
    /// Each attached program (the probes' own, then those serving them),
    /// with its run time and count since attach when the statistics are
    /// on.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.programs
            .iter()
            .chain(self.helpers.iter().map(|(probe, prog)| (probe, prog)))
            .map(|(probe, prog)| {
                let info = self
                    .stats
                    .as_ref()
                    .and_then(|_| self.ebpf.program(prog)?.info().ok());
                ProgramStats {
                    name: (*probe).to_string(),
                    program: (*prog).to_string(),
                    run_time_ns: info
                        .as_ref()
                        .map(|i| u64::try_from(i.run_time().as_nanos()).unwrap_or(u64::MAX)),
                    run_count: info.as_ref().map(|i| i.run_count()),
                }
            })
            .collect()
    }

    /// Runs of each attached probe's program the kernel skipped because a
    /// BPF program was already running on that CPU (`recursion_misses`):
    /// events no program saw, so none could count them.
    fn skipped_runs(&self) -> BTreeMap<String, u64> {
        if let Some(s) = &self.skipped_at_detach {
            return s.clone();
        }
        self.programs
            .iter()
            .filter_map(|(probe, prog)| {
                let fd = self.ebpf.program(prog)?.fd().ok()?;
                let n = recursion_misses(fd.as_fd())
                    .inspect_err(|e| log::debug!("{prog}: {e:#}"))
                    .ok()?;
                Some(((*probe).to_string(), n))
            })
            .collect()
    }

    /// Lost events per attached probe (summed over CPUs): dropped by the
    /// programs (ring or map full) and runs the kernel skipped.
    pub fn lost(&self) -> Result<BTreeMap<String, u64>> {
        let map = self
            .ebpf
            .map(LOST_MAP)
            .ok_or_else(|| anyhow!("map {LOST_MAP} missing"))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut out = BTreeMap::new();
        for spec in catalog::all() {
            let Some(id) = spec.id else { continue };
            if !self.programs.contains_key(spec.name) || u32::from(id) >= MAX_PROBES {
                continue;
            }
            let per_cpu = arr.get(&u32::from(id), 0)?;
            out.insert(spec.name.to_string(), per_cpu.iter().sum());
        }
        if !self.functions.is_empty() {
            let per_cpu = arr.get(&u32::from(hvprof_common::probe::FUNC), 0)?;
            out.insert(FUNC_PROBES.to_string(), per_cpu.iter().sum());
        }
        for (probe, n) in self.skipped_runs() {
            *out.entry(probe).or_insert(0) += n;
        }
        Ok(out)
    }

    /// Takes the event ring buffer out of the object.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or_else(|| anyhow!("map {EVENTS_MAP} missing"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Detaches and unloads every program; maps stay readable.
    pub fn detach(&mut self) {
        self.skipped_at_detach = Some(self.skipped_runs());
        // The sampler and the scheduler accounting first: their window is
        // the recording's.
        let mut names: Vec<(&str, &str)> = self.programs.iter().map(|(p, n)| (*p, *n)).collect();
        names.sort_by_key(|(probe, _)| !(*probe == "cpu:samples" || probe.starts_with("sched:")));
        let names: Vec<&str> = names
            .into_iter()
            .map(|(_, n)| n)
            .chain(self.helpers.iter().map(|(_, p)| *p))
            .collect();
        let ids: Vec<u32> = names
            .iter()
            .filter_map(|n| Some(self.ebpf.program(n)?.info().ok()?.id()))
            .collect();
        for name in names {
            if let Err(e) = unload(&mut self.ebpf, name) {
                log::warn!("detaching {name}: {e}");
            }
        }
        wait_freed(&ids, std::time::Duration::from_secs(3));
    }
}

/// Detaches and unloads the program `name` (nothing if it isn't loaded).
fn unload(ebpf: &mut Ebpf, name: &str) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::Program;
    match ebpf.program_mut(name) {
        Some(Program::TracePoint(p)) => p.unload(),
        Some(Program::RawTracePoint(p)) => p.unload(),
        Some(Program::PerfEvent(p)) => p.unload(),
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        _ => Ok(()),
    }
}

/// `recursion_misses` of the program `fd`: its runs the kernel skipped
/// because a BPF program was running on that CPU already.
fn recursion_misses(fd: BorrowedFd<'_>) -> Result<u64> {
    // `struct bpf_prog_info` up to `recursion_misses` (the kernel's ABI
    // only ever appends to it): 29 u64s, the field at byte 208.
    const INFO_WORDS: usize = 29;
    const MISSES_WORD: usize = 208 / 8;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u64; INFO_WORDS];
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).context("program fd")?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).context("info size")?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` describes `info`, a buffer of `info_len` bytes the
    // kernel fills (at most that many); both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    // A kernel older than the field fills less of the buffer.
    if (attr.info_len as usize) < (MISSES_WORD + 1) * 8 {
        return Ok(0);
    }
    Ok(info[MISSES_WORD])
}

/// Waits (at most `limit`) until the kernel has freed the programs `ids`:
/// a detached raw tracepoint's program lingers until an RCU grace period
/// ends, and whoever looks right after hvprof exits (`bpftool prog`)
/// should find nothing of ours.
fn wait_freed(ids: &[u32], limit: std::time::Duration) {
    let t0 = std::time::Instant::now();
    loop {
        let left = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| ids.contains(&p.id()))
            .count();
        if left == 0 {
            return;
        }
        if t0.elapsed() >= limit {
            log::warn!("{left} detached program(s) not freed by the kernel yet");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// No program calls the byte-at-a-time `memmove`/`memset`/`memcpy`
    /// that the BPF target links in for a copy or zeroing it doesn't
    /// expand (a copied or zeroed byte array, a struct default on the
    /// stack): on a per-event path that cost more than the rest of the
    /// program.
    #[test]
    fn no_program_calls_a_byte_loop() {
        let obj = object::File::parse(super::OBJECT).expect("the eBPF object parses");
        let mut calls = Vec::new();
        for section in obj.sections() {
            for (_, rel) in section.relocations() {
                let RelocationTarget::Symbol(i) = rel.target() else {
                    continue;
                };
                let name = obj
                    .symbol_by_index(i)
                    .and_then(|s| s.name().map(str::to_string))
                    .unwrap_or_default();
                if ["memmove", "memset", "memcpy"].contains(&name.as_str()) {
                    calls.push(format!("{} -> {name}", section.name().unwrap_or("?")));
                }
            }
        }
        assert!(
            obj.sections().count() > 10,
            "not the eBPF object: {} sections",
            obj.sections().count()
        );
        assert!(calls.is_empty(), "{calls:?}");
    }
}
