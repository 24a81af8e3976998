//! Host and guest on one timeline: packets seen on the host's side of a
//! guest's link (the TAP) and inside the guest (its NIC) are matched by
//! 4-tuple, sequence and acknowledgment numbers, flags and payload length.
//! Matched pairs in both directions give the guest clock's offset
//! NTP-style: host→guest pairs bound `offset + delay`, guest→host pairs
//! `−offset + delay`; the minima of each give the offset and an error
//! bound that needs no assumption about the delays. Packets seen at both
//! ends of a host path (two devices of one run) give that path's one-way
//! delay ([`crossing`]).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    agent::collector::ClockOffset,
    event::{self, Body},
    paths::dev::DevPacket,
    rundir::{self, log::LogReader},
};

/// How well the two sides matched.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchStats {
    pub host_packets: u64,
    pub guest_packets: u64,
    pub matched: u64,
    /// matched / min(host, guest) packets.
    pub matched_fraction: f64,
    pub host_to_guest: u64,
    pub guest_to_host: u64,
    /// One-way delay across the virtual NIC and its backend (TAP ⇄ guest
    /// NIC, both directions), with the estimated offset removed, µs.
    pub one_way_us_p50: f64,
    pub one_way_us_p99: f64,
}

type Key = (u32, u16, u32, u16, u32, u32, String, u16);
/// Timestamp of each packet seen once.
type Seen = HashMap<Key, u64>;

fn key(p: &DevPacket) -> Key {
    (
        u32::from(p.saddr),
        p.sport,
        u32::from(p.daddr),
        p.dport,
        p.seq,
        p.ack,
        p.flags.clone(),
        p.payload,
    )
}

/// Each packet seen exactly once in its direction (keys seen more than
/// once — duplicate ACKs, retransmissions — are ambiguous and dropped),
/// with its timestamp.
fn once(m: HashMap<Key, (u64, u32)>) -> Seen {
    m.into_iter()
        .filter(|(_, (_, c))| *c == 1)
        .map(|(k, (t, _))| (k, t))
        .collect()
}

/// The packets of a run's devices taken together: transmitted, received,
/// and how many packet events there were.
fn packets(dir: &Path) -> Result<(Seen, Seen, u64)> {
    let mut xmit = HashMap::new();
    let mut recv = HashMap::new();
    let mut n = 0;
    for d in sightings(dir)?.into_values() {
        n += d.events;
        for (k, (t, c)) in d.xmit {
            let e = xmit.entry(k).or_insert((t, 0));
            e.1 += c;
        }
        for (k, (t, c)) in d.recv {
            let e = recv.entry(k).or_insert((t, 0));
            e.1 += c;
        }
    }
    Ok((once(xmit), once(recv), n))
}

/// What one device saw: per direction, the first timestamp and the number
/// of sightings of each key.
#[derive(Default)]
struct Device {
    name: String,
    xmit: HashMap<Key, (u64, u32)>,
    recv: HashMap<Key, (u64, u32)>,
    events: u64,
}

/// The packet events of a run, per device (netns, ifindex).
fn sightings(dir: &Path) -> Result<BTreeMap<(u32, u32), Device>> {
    let mut devices: BTreeMap<(u32, u32), Device> = BTreeMap::new();
    let mut r = LogReader::open(&dir.join(rundir::EVENTS))?;
    let ctx = event::Context::default();
    while let Some(rec) = r.next_record()? {
        let Ok(ev) = event::decode(rec, &ctx) else {
            continue;
        };
        if let Body::DevPacket(p) = &ev.body {
            let d = devices.entry((p.netns, p.ifindex)).or_default();
            if d.name.is_empty() {
                d.name.clone_from(&p.dev);
            }
            d.events += 1;
            let map = if p.dir == "xmit" {
                &mut d.xmit
            } else {
                &mut d.recv
            };
            map.entry(key(p)).or_insert((ev.ts_ns, 0)).1 += 1;
        }
    }
    Ok(devices)
}

/// The one-way delay across a host path between the two devices a run
/// traced (a namespace topology's client and proxy ends: veth, bridge and
/// its netfilter hooks in between), both directions, on one clock.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Crossing {
    pub devices: [String; 2],
    pub matched: u64,
    pub one_way_us_p50: f64,
    pub one_way_us_p99: f64,
}

/// The crossing between the run's two devices; `None` unless exactly two
/// devices saw packets that match.
pub fn crossing(dir: &Path) -> Result<Option<Crossing>> {
    let devices: Vec<Device> = sightings(dir)?.into_values().collect();
    let Ok([a, b]) = <[Device; 2]>::try_from(devices) else {
        return Ok(None);
    };
    let (ax, ar, bx, br) = (once(a.xmit), once(a.recv), once(b.xmit), once(b.recv));
    let across = |from: &Seen, to: &Seen| -> Vec<u64> {
        from.iter()
            .filter_map(|(k, t0)| to.get(k).and_then(|t1| t1.checked_sub(*t0)))
            .collect()
    };
    let mut delays: Vec<u64> = across(&ax, &br);
    delays.extend(across(&bx, &ar));
    if delays.is_empty() {
        return Ok(None);
    }
    delays.sort_unstable();
    let q = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    Ok(Some(Crossing {
        devices: [a.name, b.name],
        matched: delays.len() as u64,
        one_way_us_p50: q(0.5),
        one_way_us_p99: q(0.99),
    }))
}

/// Matches the host run in `host` with the guest run in `guest`;
/// `None` when no packet matched in one of the directions.
pub fn packet_offset(
    host: &Path,
    guest: &Path,
    name: &str,
) -> Result<Option<(ClockOffset, MatchStats)>> {
    let (h_xmit, h_recv, hn) = packets(host)?;
    let (g_xmit, g_recv, gn) = packets(guest)?;
    // Host transmits on the TAP → guest receives on its NIC; (host time,
    // guest − host).
    let down_at: Vec<(u64, i128)> = h_xmit
        .iter()
        .filter_map(|(k, h)| g_recv.get(k).map(|g| (*h, *g as i128 - *h as i128)))
        .collect();
    // Guest transmits → host receives from the TAP; (host time, host − guest).
    let up_at: Vec<(u64, i128)> = g_xmit
        .iter()
        .filter_map(|(k, g)| h_recv.get(k).map(|h| (*h, *h as i128 - *g as i128)))
        .collect();
    let mut down: Vec<i128> = down_at.iter().map(|(_, d)| *d).collect();
    let mut up: Vec<i128> = up_at.iter().map(|(_, d)| *d).collect();
    let mut stats = MatchStats {
        host_packets: hn,
        guest_packets: gn,
        matched: (down.len() + up.len()) as u64,
        matched_fraction: if hn.min(gn) > 0 {
            (down.len() + up.len()) as f64 / hn.min(gn) as f64
        } else {
            0.0
        },
        host_to_guest: down.len() as u64,
        guest_to_host: up.len() as u64,
        one_way_us_p50: 0.0,
        one_way_us_p99: 0.0,
    };
    let Some((offset, bound)) = offset_from(&mut down, &mut up) else {
        return Ok(None);
    };
    // The bound holds for one fixed offset. A guest clock that drifts (an
    // emulated guest that calibrated its TSC on a busy host) moves the
    // offset during the run: the offsets of each quarter of the run, and
    // their own bounds, widen it to cover every part of the run.
    let error = drift_bound(&down_at, &up_at, offset).max(bound).max(0);
    let mut delays: Vec<f64> = down
        .iter()
        .map(|d| (d - offset) as f64 / 1000.0)
        .chain(up.iter().map(|d| (d + offset) as f64 / 1000.0))
        .collect();
    delays.sort_by(f64::total_cmp);
    let q = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
    stats.one_way_us_p50 = q(0.5);
    stats.one_way_us_p99 = q(0.99);
    Ok(Some((
        ClockOffset {
            guest: name.to_string(),
            offset_ns: offset as i64,
            error_ns: error as u64,
            method: "packets".into(),
            samples: stats.matched as usize,
        },
        stats,
    )))
}

/// Pairs per thousand, at most, left out of the estimate as impossible.
/// The smallest delays decide the offset, and one pair no single offset
/// explains would move it: a key matched across two sightings of which
/// each side traced a different one (a retransmission, say, whose other
/// copy fell outside one side's recording) can put a delay tens of
/// milliseconds below every real one.
const OUTLIERS_PER_MILLE: usize = 2;

/// The smallest of `delays` once the outliers are left out (reorders
/// `delays`).
fn low(delays: &mut [i128]) -> Option<i128> {
    if delays.is_empty() {
        return None;
    }
    let k = delays.len() * OUTLIERS_PER_MILLE / 1000;
    Some(*delays.select_nth_unstable(k).1)
}

/// The guest − host offset, and its bound, from the delays one way
/// (guest − host time of each packet the host sent) and the other (host −
/// guest time of each packet the guest sent): the true offset lies
/// between −(smallest up) and the smallest down. Reorders both.
fn offset_from(down: &mut [i128], up: &mut [i128]) -> Option<(i128, i128)> {
    let (a, b) = (low(down)?, low(up)?);
    Some(((a - b) / 2, (a + b) / 2))
}

/// How far the offset of any quarter of the run (by host time) lies from
/// `offset`, its own error bound included.
fn drift_bound(down: &[(u64, i128)], up: &[(u64, i128)], offset: i128) -> i128 {
    let (Some(t0), Some(t1)) = (
        down.iter().chain(up).map(|(t, _)| *t).min(),
        down.iter().chain(up).map(|(t, _)| *t).max(),
    ) else {
        return 0;
    };
    let span = (t1 - t0).max(1);
    let quarter = |t: u64| (((t - t0) as u128 * 4 / (span as u128 + 1)) as usize).min(3);
    let mut worst = 0;
    for q in 0..4 {
        let of = |pairs: &[(u64, i128)]| -> Vec<i128> {
            pairs
                .iter()
                .filter(|(t, _)| quarter(*t) == q)
                .map(|(_, d)| *d)
                .collect()
        };
        if let Some((off, err)) = offset_from(&mut of(down), &mut of(up)) {
            // A negative bound: the quarter is inconsistent with one
            // offset (drift within it), which widens the bound as much.
            worst = worst.max((off - offset).abs() + err.abs());
        }
    }
    worst
}

/// The best offset recorded for `guest` in a run's meta (smallest error).
pub fn best_offset(offsets: &[serde_json::Value], guest: &str) -> Option<ClockOffset> {
    let clocks: Vec<ClockOffset> = offsets
        .iter()
        .filter_map(|v| serde_json::from_value::<ClockOffset>(v.clone()).ok())
        .filter(|c| c.guest == guest)
        .collect();
    best(&clocks).cloned()
}

/// The offset to use: from packets when there is one (its bound covers the
/// whole run, drift included; a ping's is taken at one moment), else the
/// one with the smallest bound.
pub fn best(clocks: &[ClockOffset]) -> Option<&ClockOffset> {
    clocks
        .iter()
        .min_by_key(|c| (c.method != "packets", c.error_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drifting_guest_clock_widens_the_error_bound() {
        // Offset rises from 0 to 8 ms over the run; one-way delay 50 µs.
        let pairs = |sign: i128| -> Vec<(u64, i128)> {
            (0..100u64)
                .map(|i| {
                    let t = i * 10_000_000;
                    let offset = i128::from(i) * 80_000;
                    (t, sign * offset + 50_000)
                })
                .collect()
        };
        let (down, up) = (pairs(1), pairs(-1));
        let delays = |p: &[(u64, i128)]| p.iter().map(|(_, d)| *d).collect::<Vec<_>>();
        let (offset, _) = offset_from(&mut delays(&down), &mut delays(&up)).expect("pairs");
        let bound = drift_bound(&down, &up, offset);
        assert!(bound > 3_500_000, "bound {bound} ns under 8 ms of drift");
        // A steady clock keeps a tight bound.
        let steady = |sign: i128| -> Vec<(u64, i128)> {
            (0..100u64)
                .map(|i| (i * 10_000_000, sign * 1_000_000 + 50_000))
                .collect()
        };
        let (down, up) = (steady(1), steady(-1));
        assert!(drift_bound(&down, &up, 1_000_000) <= 50_000);
    }

    #[test]
    fn one_impossible_pair_neither_moves_the_offset_nor_widens_the_bound() {
        // Guest clock 5 ms ahead, one-way delays 100..150 µs, 2000 pairs
        // each way over 4 s; then one guest packet "received" by the host
        // 37 ms before the guest sent it.
        let pairs = |sign: i128| -> Vec<(u64, i128)> {
            (0..2000u64)
                .map(|i| {
                    let delay = 100_000 + i128::from(i % 50) * 1_000;
                    (i * 2_000_000, sign * 5_000_000 + delay)
                })
                .collect()
        };
        let (down, mut up) = (pairs(1), pairs(-1));
        up.push((3_000_000_000, -5_000_000 - 37_000_000));
        let delays = |p: &[(u64, i128)]| p.iter().map(|(_, d)| *d).collect::<Vec<_>>();
        let (offset, bound) = offset_from(&mut delays(&down), &mut delays(&up)).expect("pairs");
        assert!((offset - 5_000_000).abs() <= 5_000, "offset {offset}");
        assert!(bound <= 110_000, "bound {bound}");
        assert!(drift_bound(&down, &up, offset) <= 120_000);
    }
}
