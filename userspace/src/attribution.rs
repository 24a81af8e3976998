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

/// Samples per layer of one run directory's `stacks.folded`, and the
/// samples of vCPU threads (`CPU n/TCG|KVM`) separately.
fn layer_samples(dir: &Path, c: &Classifier) -> (BTreeMap<Layer, u64>, u64) {
    let mut out = BTreeMap::new();
    let mut vcpu = 0;
    let Ok(text) = std::fs::read_to_string(dir.join(rundir::STACKS)) else {
        return (out, 0);
    };
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        let frames: Vec<&str> = stack.split(';').collect();
        let comm = frames.first().map_or("", |h| thread_comm(h));
        if comm.starts_with("CPU ") && (comm.ends_with("/TCG") || comm.ends_with("/KVM")) {
            vcpu += n;
            continue;
        }
        // Only the benchmark's own processes and the kernel's threads
        // (softirq, workers, idle) are costs of the run; an unrelated
        // program that happened to run (a compiler, a daemon) is not.
        let kernel_thread = frames[1..].iter().all(|f| f.ends_with("_[k]"));
        if Classifier::thread(comm).is_none() && !kernel_thread {
            continue;
        }
        *out.entry(c.stack(&frames)).or_insert(0) += n;
    }
    (out, vcpu)
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
    let us = |samples: u64| samples as f64 / hz * 1e6 / conns;
    let (host, vcpu) = layer_samples(dir, c);
    let mut cost: BTreeMap<String, f64> = BTreeMap::new();
    let samples: u64 = host.values().sum::<u64>() + vcpu;
    for (l, n) in &host {
        *cost.entry(l.name().into()).or_insert(0.0) += us(*n);
    }
    // The vCPU threads' host time, split by the guest's own samples.
    let mut emulation_factor = None;
    if vcpu > 0 {
        let guest_dir = dir.join("guest-0");
        let (guest, _) = layer_samples(&guest_dir, c);
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

/// Residuals beyond this many points are flagged.
pub const RESIDUAL_FLAG_POINTS: f64 = 5.0;

/// `t` against `n`: measured loss `1 − X_T/X_N`; layer shares
/// `(c_T,l − c_N,l)/c_T`, adding up to the predicted loss `1 − c_N/c_T`.
pub fn attribute(t: &PointCosts, n: &PointCosts) -> Attribution {
    let loss = if n.conn_per_s > 0.0 {
        100.0 * (1.0 - t.conn_per_s / n.conn_per_s)
    } else {
        0.0
    };
    let ct = t.total();
    let mut layers = Vec::new();
    let mut predicted = 0.0;
    for l in Layer::ALL {
        let (a, b) = (t.layer(l.name()), n.layer(l.name()));
        let points = if ct > 0.0 { 100.0 * (a - b) / ct } else { 0.0 };
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
}
