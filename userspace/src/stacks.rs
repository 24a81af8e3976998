//! CPU samples to folded stacks: aggregates samples by thread and stack,
//! symbolises kernel frames from `/proc/kallsyms` (`kernel::kallsyms`) and user frames with
//! blazesym while the sampled processes are still alive (addresses mean
//! nothing later), and writes `stacks.folded` (inferno's input format,
//! `comm-pid/tid;outer;...;inner count`, kernel frames suffixed `_[k]`).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use blazesym::{
    Pid,
    symbolize::{Input, Symbolized, Symbolizer, source::Process, source::Source},
};
use hvprof_common::SampleEvent;

#[derive(Hash, PartialEq, Eq)]
struct Key {
    pid: u32,
    tid: u32,
    comm: String,
    kstack: Vec<u64>,
    ustack: Vec<u64>,
}

/// Sorted text symbols of the kernel and its modules.
pub(crate) struct KernelSymbols(Vec<(u64, Arc<str>)>);

impl KernelSymbols {
    pub(crate) fn load() -> Self {
        let mut v: Vec<(u64, Arc<str>)> = crate::kernel::kallsyms::text_symbols()
            .iter()
            .filter(|s| s.addr != 0)
            .map(|s| (s.addr, s.name.clone()))
            .collect();
        v.sort_unstable_by_key(|(a, _)| *a);
        Self(v)
    }

    pub(crate) fn name(&self, addr: u64) -> Arc<str> {
        match self.0.partition_point(|(a, _)| *a <= addr) {
            0 => Arc::from("[unknown]"),
            i => self.0[i - 1].1.clone(),
        }
    }
}

/// Aggregated samples of one recording.
pub struct Stacks {
    counts: HashMap<Key, u64>,
    pending: HashSet<u32>,
    user: HashMap<(u32, u64), Arc<str>>,
    kernel: KernelSymbols,
    symbolizer: Symbolizer,
    pub samples: u64,
}

impl Default for Stacks {
    fn default() -> Self {
        Self::new()
    }
}

impl Stacks {
    pub fn new() -> Self {
        Self {
            counts: HashMap::new(),
            pending: HashSet::new(),
            user: HashMap::new(),
            kernel: KernelSymbols::load(),
            symbolizer: Symbolizer::new(),
            samples: 0,
        }
    }

    /// Adds one raw sample event (as read from the ring buffer).
    pub fn add(&mut self, bytes: &[u8]) {
        let Some(ev) = SampleEvent::read(bytes) else {
            return;
        };
        self.samples += 1;
        let pid = ev.header.pid;
        if !ev.user_frames().is_empty() {
            self.pending.insert(pid);
        }
        let key = Key {
            pid,
            tid: ev.header.tid,
            comm: crate::event::comm(&ev.header.comm),
            kstack: ev.kernel_frames().to_vec(),
            ustack: ev.user_frames().to_vec(),
        };
        *self.counts.entry(key).or_insert(0) += 1;
    }

    /// Symbolises the user addresses of processes sampled since the last
    /// call, while they still exist.
    pub fn symbolize_pending(&mut self) {
        let pids: Vec<u32> = self.pending.drain().collect();
        for pid in pids {
            let mut addrs: Vec<u64> = self
                .counts
                .keys()
                .filter(|k| k.pid == pid)
                .flat_map(|k| k.ustack.iter().copied())
                .filter(|a| !self.user.contains_key(&(pid, *a)))
                .collect();
            addrs.sort_unstable();
            addrs.dedup();
            if addrs.is_empty() {
                continue;
            }
            let src = Source::Process(Process::new(Pid::from(pid)));
            let Ok(syms) = self.symbolizer.symbolize(&src, Input::AbsAddr(&addrs)) else {
                continue;
            };
            for (addr, sym) in addrs.iter().zip(syms) {
                let name: Arc<str> = match sym {
                    Symbolized::Sym(s) => Arc::from(s.name.as_ref()),
                    Symbolized::Unknown(_) => Arc::from("[unknown]"),
                };
                self.user.insert((pid, *addr), name);
            }
        }
    }

    /// Writes `stacks.folded`; returns the number of distinct stacks.
    pub fn write_folded(&mut self, path: &Path) -> Result<usize> {
        let text = self.folded();
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        Ok(text.lines().count())
    }

    /// The folded stacks as text, one `stack count` line each.
    pub fn folded(&mut self) -> String {
        self.symbolize_pending();
        let mut lines: HashMap<String, u64> = HashMap::new();
        for (k, n) in &self.counts {
            let mut frames: Vec<String> = vec![format!("{}-{}/{}", k.comm, k.pid, k.tid)];
            let mut push = |f: String| {
                if frames.last() != Some(&f) {
                    frames.push(f);
                }
            };
            for a in k.ustack.iter().rev() {
                let name = self
                    .user
                    .get(&(k.pid, *a))
                    .map_or("[unknown]", |s| s.as_ref());
                push(name.replace(';', ":"));
            }
            let kernel: Vec<Arc<str>> = k.kstack.iter().map(|a| self.kernel.name(*a)).collect();
            if k.pid == 0 && crate::classify::idle_loop(kernel.iter().map(|f| f.as_ref())) {
                continue;
            }
            for f in kernel.iter().rev() {
                push(format!("{f}_[k]"));
            }
            *lines.entry(frames.join(";")).or_insert(0) += n;
        }
        let mut sorted: Vec<(String, u64)> = lines.into_iter().collect();
        sorted.sort_unstable();
        let mut out = String::new();
        for (stack, n) in &sorted {
            let _ = writeln!(out, "{stack} {n}");
        }
        out
    }
}
