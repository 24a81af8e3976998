//! Explaining the lost percentage (DESIGN.md): per-layer CPU cost per
//! connection of each recorded benchmark point, and each topology's loss
//! against `native` at the same size split into layer shares that add up
//! to the predicted loss, with the residual against the measured loss.
//!
//! Costs come from CPU samples (host, and each guest's agent) of the
//! benchmark's processes and the kernel's threads: every sample is charged
//! to one layer (`classify`); unrelated programs are left out. A guest vCPU thread's host
//! time is split across the guest's layers by the guest's own samples
//! ("guest time in host terms"); under software emulation the part of
//! that time beyond what the same layers cost natively is the emulation
//! (`vmexit`) share.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    catalog::Layer,
    classify::{Classifier, thread_comm},
    rundir::{self, meta::Meta},
};

/// What a recorded benchmark point cost, per layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointCosts {
    pub topology: String,
    pub size: u64,
    pub conn_per_s: f64,
    pub body_mbps: f64,
    pub connections: u64,
    /// CPU µs per completed connection, by layer name.
    pub cpu_us_per_conn: BTreeMap<String, f64>,
    pub samples: u64,
    /// `kvm`, `tcg`, or none (not a guest).
    pub accel: Option<String>,
    /// Emulation slowdown of the guest's layers against native (TCG only).
    pub emulation_factor: Option<f64>,
    /// CPUs' worth of time the benchmark's work used (samples over the
    /// recording's duration); none without a duration.
    #[serde(default)]
    pub busy_cpus: Option<f64>,
    /// CPUs' worth of time unrelated work took meanwhile.
    #[serde(default)]
    pub unrelated_cpus: Option<f64>,
    /// CPUs' worth of time the hypervisor under the machine took (steal).
    #[serde(default)]
    pub stolen_cpus: Option<f64>,
}

impl PointCosts {
    pub fn total(&self) -> f64 {
        self.cpu_us_per_conn.values().sum()
    }

    fn layer(&self, l: &str) -> f64 {
        self.cpu_us_per_conn.get(l).copied().unwrap_or(0.0)
    }
}

/// The point's benchmark result (`bench-point.json`), the fields we need.
#[derive(Debug, Deserialize)]
struct BenchPoint {
    topology: String,
    size: u64,
    conn_per_s: f64,
    body_mbps: f64,
    connections: u64,
}

#[derive(Debug, Deserialize, Default)]
struct Env {
    #[serde(default)]
    vm: Option<VmEnv>,
}

#[derive(Debug, Deserialize)]
struct VmEnv {
    accel: String,
}

/// What one run directory's `stacks.folded` says: samples per layer of
/// the benchmark's own work, of the vCPU threads (`CPU n/TCG|KVM`), and of
/// everything else that took CPU meanwhile.
#[derive(Default)]
struct Samples {
    layers: BTreeMap<Layer, u64>,
    vcpu: u64,
    /// Unrelated programs and kernel threads doing unrelated work: CPU
    /// the benchmark could not have.
    unrelated: u64,
}

fn layer_samples(dir: &Path, c: &Classifier) -> Samples {
    let mut out = Samples::default();
    let Ok(text) = std::fs::read_to_string(dir.join(rundir::STACKS)) else {
        return out;
    };
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let frames: Vec<&str> = stack.split(';').collect();
        let comm = frames.first().map_or("", |h| thread_comm(h));
        if comm.starts_with("CPU ") && (comm.ends_with("/TCG") || comm.ends_with("/KVM")) {
            out.vcpu += n;
            continue;
        }
        // Only the benchmark's own processes and the kernel's work for
        // them (softirq, the network path in any thread) are costs of the
        // run; an unrelated program (a compiler, a daemon) or a kernel
        // thread busy with something else (memory management, ...) is not.
        let layer = c.stack(&frames);
        let kernel_thread = frames[1..].iter().all(|f| f.ends_with("_[k]"));
        let ours = Classifier::thread(comm).is_some() || (kernel_thread && layer != Layer::Other);
        if ours {
            *out.layers.entry(layer).or_insert(0) += n;
        } else {
            out.unrelated += n;
        }
    }
    out
}

/// Per-layer costs of a `bench --record` run directory.
pub fn point_costs(dir: &Path, c: &Classifier, native: Option<&PointCosts>) -> Result<PointCosts> {
    let point: BenchPoint = serde_json::from_slice(
        &std::fs::read(dir.join(rundir::BENCH_POINT)).with_context(|| {
            format!(
                "{} has no {} (record it with `hvprof bench --record`)",
                dir.display(),
                rundir::BENCH_POINT
            )
        })?,
    )
    .with_context(|| format!("{}: invalid {}", dir.display(), rundir::BENCH_POINT))?;
    let meta: Meta = rundir::open(dir)?;
    let env: Env = std::fs::read(dir.join(rundir::ENVIRONMENT))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let hz = meta.sample_hz.unwrap_or(crate::paths::cpu::DEFAULT_HZ) as f64;
    let conns = point.connections.max(1) as f64;
    let summary = rundir::summary(dir);
    let taken = summary
        .as_ref()
        .and_then(|s| s["samples"].as_u64())
        .filter(|n| *n > 0);
    // Time the hypervisor took is no CPU's to sample: it is left out of
    // what the samples stand for, and charged to `sched` (`attribute`).
    let stolen_s = summary
        .as_ref()
        .and_then(|s| s["steal"]["cpu_s"].as_f64())
        .filter(|s| s.is_finite() && *s >= 0.0);
    // Timer samples go missing now and then (a CPU with interrupts off):
    // each sample stands for its share of the CPUs' time the machine had
    // over the window, idle samples included.
    let scale = match (taken, meta.cpus, meta.duration_s) {
        (Some(n), Some(cpus), Some(d)) => {
            let had = (f64::from(cpus) * d - stolen_s.unwrap_or(0.0)).max(0.0);
            (had * hz / n as f64).clamp(0.5, 2.0)
        }
        _ => 1.0,
    };
    let us = |samples: u64| samples as f64 * scale / hz * 1e6 / conns;
    let Samples {
        layers: host,
        vcpu,
        unrelated,
    } = layer_samples(dir, c);
    let mut cost: BTreeMap<String, f64> = BTreeMap::new();
    let samples: u64 = host.values().sum::<u64>() + vcpu;
    // CPUs' worth of time (CPU-seconds per second) the benchmark had, and
    // that unrelated work took.
    let cpus = |samples: u64| {
        meta.duration_s
            .filter(|d| *d > 0.0)
            .map(|d| samples as f64 * scale / hz / d)
    };
    for (l, n) in &host {
        *cost.entry(l.name().into()).or_insert(0.0) += us(*n);
    }
    // The vCPU threads' host time, split by the guest's own samples.
    let mut emulation_factor = None;
    if vcpu > 0 {
        let guest_dir = dir.join("guest-0");
        let guest = layer_samples(&guest_dir, c).layers;
        let gtotal: u64 = guest.values().sum();
        let vcpu_us = us(vcpu);
        if gtotal == 0 {
            *cost.entry(Layer::Vmexit.name().into()).or_insert(0.0) += vcpu_us;
        } else {
            let share: BTreeMap<&str, f64> = guest
                .iter()
                .map(|(l, n)| (l.name(), vcpu_us * *n as f64 / gtotal as f64))
                .collect();
            let tcg = env.vm.as_ref().is_some_and(|v| v.accel == "tcg");
            // Under KVM the exits are discrete: their time is vmexit, the
            // rest of the vCPU threads' time is the guest's.
            let exited_us = std::fs::read(dir.join(rundir::KVM))
                .ok()
                .and_then(|b| serde_json::from_slice::<crate::paths::vmexit::KvmSnapshot>(&b).ok())
                .map_or(0.0, |k| k.exit_ns() as f64 / 1000.0 / conns);
            let exited_us = exited_us.min(vcpu_us);
            let share: BTreeMap<&str, f64> = share
                .into_iter()
                .map(|(l, v)| (l, v * (1.0 - exited_us / vcpu_us.max(1e-9))))
                .collect();
            *cost.entry(Layer::Vmexit.name().into()).or_insert(0.0) += exited_us;
            match (tcg, native) {
                // Under emulation, what the guest's layers cost beyond
                // their native cost is emulation, charged to vmexit; the
                // rest stays with the layers.
                (true, Some(n)) => {
                    let native_same: f64 = share.keys().map(|l| n.layer(l)).sum();
                    let f = if native_same > 0.0 {
                        vcpu_us / native_same
                    } else {
                        1.0
                    };
                    emulation_factor = Some(f);
                    for (l, v) in &share {
                        let own = v / f.max(1.0);
                        *cost.entry((*l).to_string()).or_insert(0.0) += own;
                        *cost.entry(Layer::Vmexit.name().into()).or_insert(0.0) += v - own;
                    }
                }
                _ => {
                    for (l, v) in &share {
                        *cost.entry((*l).to_string()).or_insert(0.0) += v;
                    }
                }
            }
        }
    }
    let accel = env.vm.map(|v| v.accel);
    Ok(PointCosts {
        topology: point.topology,
        size: point.size,
        conn_per_s: point.conn_per_s,
        body_mbps: point.body_mbps,
        connections: point.connections,
        cpu_us_per_conn: cost,
        samples,
        accel,
        emulation_factor,
        busy_cpus: cpus(samples),
        unrelated_cpus: cpus(unrelated),
        stolen_cpus: stolen_s.and_then(|s| meta.duration_s.filter(|d| *d > 0.0).map(|d| s / d)),
    })
}

/// One layer's part of a loss.
#[derive(Debug, Clone, Serialize)]
pub struct LayerShare {
    pub layer: &'static str,
    pub cpu_us_per_conn: f64,
    pub native_cpu_us_per_conn: f64,
    /// Percentage points of the loss this layer explains (negative: the
    /// layer got cheaper than natively).
    pub loss_points: f64,
}

/// A topology's loss against native at one size, explained.
#[derive(Debug, Clone, Serialize)]
pub struct Attribution {
    pub loss_pct: f64,
    pub predicted_loss_pct: f64,
    pub residual_pct: f64,
    /// |residual| over 5 points.
    pub residual_flagged: bool,
    pub layers: Vec<LayerShare>,
}

/// Of the CPUs the benchmark lost (`lost`, negative: gained), the part
/// other work took (`others`: how much more CPU unrelated work had). What
/// others took from idle CPUs was not the benchmark's; what the benchmark
/// lost to idle (it waited on something else) is not contention.
fn taken_by_others(lost: f64, others: f64) -> f64 {
    if lost >= 0.0 {
        others.clamp(0.0, lost)
    } else {
        others.clamp(lost, 0.0)
    }
}

/// Residuals beyond this many points are flagged.
pub const RESIDUAL_FLAG_POINTS: f64 = 5.0;

/// `t` against `n`: measured loss `1 − X_T/X_N`; layer shares
/// `(c_T,l − c_N,l)/c_T`, adding up to the predicted loss `1 − c_N/c_T`.
///
/// Throughput is the CPU the benchmark gets over its cost per connection,
/// `X = U/c`, so a loss also comes from CPU taken away: when unrelated work
/// and the hypervisor under the machine (steal) took `o_T − o_N` more CPUs
/// than natively, the benchmark's threads waited for a CPU (run-queue
/// delay, or a vCPU not running), and `(c_N/c_T)·(o_T − o_N)/U_N` is
/// charged to `sched` (no more than the CPU the benchmark lost,
/// `U_N − U_T`). CPUs left idle (latency-bound) are not charged: they stay
/// in the residual.
pub fn attribute(t: &PointCosts, n: &PointCosts) -> Attribution {
    let loss = if n.conn_per_s > 0.0 {
        100.0 * (1.0 - t.conn_per_s / n.conn_per_s)
    } else {
        0.0
    };
    let ct = t.total();
    let mut layers = Vec::new();
    let mut predicted = 0.0;
    let others = |p: &PointCosts| p.unrelated_cpus.map(|o| o + p.stolen_cpus.unwrap_or(0.0));
    let contention = match (others(t), others(n), t.busy_cpus, n.busy_cpus) {
        (Some(ot), Some(on), Some(ut), Some(un)) if ct > 0.0 && un > 0.0 => {
            100.0 * (n.total() / ct) * taken_by_others(un - ut, ot - on) / un
        }
        _ => 0.0,
    };
    for l in Layer::ALL {
        let (a, b) = (t.layer(l.name()), n.layer(l.name()));
        let mut points = if ct > 0.0 { 100.0 * (a - b) / ct } else { 0.0 };
        if l == Layer::Sched {
            points += contention;
        }
        predicted += points;
        layers.push(LayerShare {
            layer: l.name(),
            cpu_us_per_conn: a,
            native_cpu_us_per_conn: b,
            loss_points: points,
        });
    }
    let residual = loss - predicted;
    Attribution {
        loss_pct: loss,
        predicted_loss_pct: predicted,
        residual_pct: residual,
        residual_flagged: residual.abs() > RESIDUAL_FLAG_POINTS,
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(conn_per_s: f64, costs: &[(&str, f64)]) -> PointCosts {
        PointCosts {
            topology: "t".into(),
            size: 0,
            conn_per_s,
            body_mbps: 0.0,
            connections: 1000,
            cpu_us_per_conn: costs.iter().map(|(l, v)| ((*l).to_string(), *v)).collect(),
            samples: 1,
            accel: None,
            emulation_factor: None,
            busy_cpus: None,
            unrelated_cpus: None,
            stolen_cpus: None,
        }
    }

    #[test]
    fn shares_add_up_to_the_predicted_loss() {
        let native = point(1000.0, &[("proxy", 100.0), ("socket", 100.0)]);
        let t = point(
            500.0,
            &[("proxy", 100.0), ("socket", 100.0), ("netfilter", 200.0)],
        );
        let a = attribute(&t, &native);
        assert!((a.loss_pct - 50.0).abs() < 1e-9);
        assert!((a.predicted_loss_pct - 50.0).abs() < 1e-9);
        assert!(a.residual_pct.abs() < 1e-9 && !a.residual_flagged);
        let nf = a
            .layers
            .iter()
            .find(|l| l.layer == "netfilter")
            .expect("row");
        assert!((nf.loss_points - 50.0).abs() < 1e-9);
        let sum: f64 = a.layers.iter().map(|l| l.loss_points).sum();
        assert!((sum - a.predicted_loss_pct).abs() < 1e-9);
        // A measured loss the costs don't explain is flagged.
        let slow = point(
            200.0,
            &[("proxy", 100.0), ("socket", 100.0), ("netfilter", 200.0)],
        );
        assert!(attribute(&slow, &native).residual_flagged);
    }

    /// Natively the benchmark had 1.8 CPUs of 2, others 0.1; in `t` the
    /// benchmark had 0.9: half the throughput at the same cost per
    /// connection. Who took the rest is for the caller to say.
    fn halved() -> (PointCosts, PointCosts) {
        let mut native = point(1000.0, &[("proxy", 100.0), ("socket", 100.0)]);
        native.busy_cpus = Some(1.8);
        native.unrelated_cpus = Some(0.1);
        let mut t = point(500.0, &[("proxy", 100.0), ("socket", 100.0)]);
        t.busy_cpus = Some(0.9);
        t.unrelated_cpus = Some(0.1);
        (native, t)
    }

    /// `halved`'s 50 % loss, all of it `sched`'s.
    fn assert_sched_explains_it_all(a: &Attribution) {
        let sched = a.layers.iter().find(|l| l.layer == "sched").expect("row");
        assert!(
            (sched.loss_points - 50.0).abs() < 1e-9,
            "{}",
            sched.loss_points
        );
        assert!(a.residual_pct.abs() < 1e-9, "{}", a.residual_pct);
    }

    #[test]
    fn cpu_taken_by_other_work_is_sched() {
        // A hog beside the benchmark.
        let (native, mut t) = halved();
        t.unrelated_cpus = Some(1.1);
        assert_sched_explains_it_all(&attribute(&t, &native));
        // Others also took idle CPU: only what the benchmark lost counts.
        t.unrelated_cpus = Some(1.2);
        let a = attribute(&t, &native);
        assert!((a.predicted_loss_pct - 50.0).abs() < 1e-9);
        // The benchmark lost CPU to idle, not to others: not sched.
        t.unrelated_cpus = Some(0.1);
        let a = attribute(&t, &native);
        assert!(a.predicted_loss_pct.abs() < 1e-9 && a.residual_flagged);
    }

    #[test]
    fn cpu_the_hypervisor_took_is_sched() {
        // No other program here, but the host ran the vCPUs 0.9 CPUs less
        // than natively: the same loss as a hog's, charged the same.
        let (mut native, mut t) = halved();
        native.stolen_cpus = Some(0.05);
        t.stolen_cpus = Some(0.95);
        assert_sched_explains_it_all(&attribute(&t, &native));
        // Recorded before steal was: the same as none.
        t.stolen_cpus = None;
        let a = attribute(&t, &native);
        assert!(a.residual_flagged);
    }
}
