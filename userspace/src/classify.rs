//! Charging CPU samples to layers. Kernel frames are matched against the
//! frame prefixes each path declares (the innermost match wins); threads
//! are known by what runs them (the proxy, the load generator, QEMU's vCPU
//! and main-loop threads). The load generator's own work is `loadgen`:
//! measured, never charged to the system under test — but the system's
//! layers that run in its context (bridge, netfilter, TAP) stay theirs.

use crate::{catalog::Layer, paths};

pub struct Classifier {
    /// (prefix, layer), longest prefix first.
    prefixes: Vec<(&'static str, Layer)>,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier {
    pub fn new() -> Self {
        let mut prefixes: Vec<(&'static str, Layer)> = paths::ALL
            .iter()
            .flat_map(|p| p.frames.iter().copied())
            .collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        Self { prefixes }
    }

    /// Layer of one frame, if it is a kernel frame some path claims.
    pub fn frame(&self, frame: &str) -> Option<Layer> {
        let name = frame.strip_suffix("_[k]")?;
        self.prefixes
            .iter()
            .find(|(p, _)| name.starts_with(p))
            .map(|(_, l)| *l)
    }

    /// Layer of a thread by its name alone.
    pub fn thread(comm: &str) -> Option<Layer> {
        let c = comm;
        if c.starts_with("haproxy") {
            Some(Layer::Proxy)
        } else if c.starts_with("load-")
            || c.starts_with("origin")
            || c.starts_with("wrk")
            || c.starts_with("hvprof")
            || c.starts_with("tcp-burst")
        {
            Some(Layer::Loadgen)
        } else if c.starts_with("CPU ") && (c.ends_with("/TCG") || c.ends_with("/KVM")) {
            // A vCPU thread seen from the host: emulation / guest time.
            Some(Layer::Vmexit)
        } else if c.starts_with("qemu-system")
            || c.starts_with("IO ")
            || c.starts_with("vhost-")
            || c == "call_rcu"
        {
            Some(Layer::Backend)
        } else if c.starts_with("ksoftirqd") {
            Some(Layer::Irq)
        } else {
            None
        }
    }

    /// Layer of one folded stack: `comm-pid/tid;outer;...;inner`.
    pub fn stack(&self, frames: &[&str]) -> Layer {
        let Some((head, rest)) = frames.split_first() else {
            return Layer::Other;
        };
        let comm = thread_comm(head);
        let by_thread = Self::thread(comm);
        let by_frame = rest.iter().rev().find_map(|f| self.frame(f));
        if by_thread == Some(Layer::Loadgen) {
            // The load generator's own syscalls and TCP work are its own;
            // what the system under test does in its context (a bridge, the
            // netfilter hooks, a TAP, softirq work on the way) is not.
            return match by_frame {
                Some(l) if l != Layer::Socket => l,
                _ => Layer::Loadgen,
            };
        }
        by_frame.or(by_thread).unwrap_or(Layer::Other)
    }
}

/// Whether a sample of the idle task (pid 0) caught the idle loop itself
/// rather than interrupt work running on top of it (softirq, NAPI, a
/// hard interrupt): only the latter is a cost of anything.
pub fn idle_loop<'a>(kernel_frames: impl IntoIterator<Item = &'a str>) -> bool {
    const INTERRUPT_WORK: [&str; 4] = ["irq", "interrupt", "napi", "net_rx_action"];
    !kernel_frames
        .into_iter()
        .any(|f| INTERRUPT_WORK.iter().any(|m| f.contains(m)))
}

/// `comm-pid/tid` → `comm` (comm may itself contain '-').
pub fn thread_comm(head: &str) -> &str {
    head.rsplit_once('-').map_or(head, |(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_loop_samples_are_told_from_softirq_work_on_the_idle_task() {
        assert!(idle_loop([
            "do_idle",
            "default_idle_call",
            "pv_native_safe_halt"
        ]));
        assert!(!idle_loop([
            "do_idle",
            "asm_sysvec_apic_timer_interrupt",
            "handle_softirqs",
            "net_rx_action",
            "br_handle_frame",
        ]));
    }

    #[test]
    fn innermost_known_frame_wins_and_loadgen_is_never_charged() {
        let c = Classifier::new();
        let l = |s: &str| c.stack(&s.split(';').collect::<Vec<_>>());
        assert_eq!(
            l("haproxy-10/10;main;__x64_sys_sendto_[k];tcp_sendmsg_[k];memcpy_[k]"),
            Layer::Socket
        );
        assert_eq!(
            l("haproxy-10/10;main;tcp_v4_rcv_[k];nf_hook_slow_[k];ipt_do_table_[k]"),
            Layer::Netfilter
        );
        assert_eq!(l("haproxy-10/10;main;http_parse"), Layer::Proxy);
        assert_eq!(l("load-0-7/8;tcp_sendmsg_[k]"), Layer::Loadgen);
        assert_eq!(
            l("load-0-7/8;tcp_sendmsg_[k];nf_hook_slow_[k]"),
            Layer::Netfilter
        );
        assert_eq!(l("CPU 0/TCG-5/6;cpu_exec"), Layer::Vmexit);
        assert_eq!(
            l("qemu-system-x86-5/5;main;tun_get_user_[k]"),
            Layer::Backend
        );
        assert_eq!(
            l("swapper-0/0;net_rx_action_[k];br_handle_frame_[k]"),
            Layer::Switch
        );
        assert_eq!(l("mystery-1/1;foo"), Layer::Other);
        assert_eq!(thread_comm("CPU 0/TCG-5/6"), "CPU 0/TCG");
    }
}
