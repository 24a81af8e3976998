//! Where a load target is reached from here: this host (loopback or one
//! of its own addresses), a link of its own (a TAP, bridge or veth with
//! no default route on it, as hvprof's topologies make), or the wider
//! network (through a gateway, or on the link of a default route).
//! `hvprof load` refuses the last unless told otherwise, so that a typo
//! in a URL doesn't flood somebody else's host. Read from this network
//! namespace's main routing tables in `/proc/net`; nothing is sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// How a target address is reached from this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Loopback, or an address of this host.
    ThisHost,
    /// On a link with no default route on it (hvprof's namespaces, TAPs).
    OwnLink { iface: String },
    /// Through a gateway, or on the link that leads out.
    Beyond { why: String },
}

/// The routing tables couldn't be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReachError {
    path: &'static str,
    source: std::io::Error,
}

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;
const RTF_REJECT: u32 = 0x200;
const RTF_LOCAL: u32 = 0x8000_0000;

/// One route of `/proc/net/route` or `/proc/net/ipv6_route`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    iface: String,
    dest: u128,
    prefix: u32,
    gateway: IpAddr,
    flags: u32,
    metric: u32,
}

impl Route {
    fn usable(&self) -> bool {
        self.flags & RTF_UP != 0 && self.flags & RTF_REJECT == 0
    }

    fn covers(&self, addr: u128, bits: u32) -> bool {
        let shift = bits - self.prefix.min(bits);
        shift >= bits || (addr ^ self.dest) >> shift == 0
    }
}

/// Where `ip` is reached from this network namespace.
pub fn reach(ip: IpAddr) -> Result<Reach, ReachError> {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() || is_own_address(ip) {
        return Ok(Reach::ThisHost);
    }
    let (path, parse): (_, fn(&str) -> Vec<Route>) = match ip {
        IpAddr::V4(_) => ("/proc/net/route", parse_v4),
        IpAddr::V6(_) => ("/proc/net/ipv6_route", parse_v6),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ReachError { path, source })?;
    Ok(classify(ip, &parse(&text)))
}

/// Whether `ip` is one of this host's addresses: binding to it works
/// (unless non-local binds are allowed, when that proves nothing).
fn is_own_address(ip: IpAddr) -> bool {
    let sysctl = match ip {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
    };
    let nonlocal = std::fs::read_to_string(sysctl).is_ok_and(|s| s.trim() != "0");
    !nonlocal && UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn classify(ip: IpAddr, routes: &[Route]) -> Reach {
    let (addr, bits) = match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let best = routes
        .iter()
        .filter(|r| r.usable() && r.covers(addr, bits))
        .max_by_key(|r| (r.prefix, std::cmp::Reverse(r.metric)));
    let Some(route) = best else {
        return Reach::Beyond {
            why: "no route leads there".into(),
        };
    };
    if route.flags & RTF_LOCAL != 0 {
        return Reach::ThisHost;
    }
    if route.flags & RTF_GATEWAY != 0 {
        return Reach::Beyond {
            why: format!(
                "it is reached through gateway {} on {}",
                route.gateway, route.iface
            ),
        };
    }
    let leads_out = routes
        .iter()
        .any(|r| r.usable() && r.prefix == 0 && r.iface == route.iface);
    if leads_out {
        return Reach::Beyond {
            why: format!(
                "it is on {}, the link of this host's default route",
                route.iface
            ),
        };
    }
    Reach::OwnLink {
        iface: route.iface.clone(),
    }
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric
/// Mask ...`, addresses as the hex of their bytes read as a native u32.
fn parse_v4(text: &str) -> Vec<Route> {
    let v4 = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|n| Ipv4Addr::from(n.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gw, flags, metric, mask) = (
                f.first()?,
                f.get(1)?,
                f.get(2)?,
                f.get(3)?,
                f.get(6)?,
                f.get(7)?,
            );
            let mask = u32::from(v4(mask)?);
            // A mask is leading ones; anything else is not a prefix.
            let prefix = mask.leading_ones();
            if mask.checked_shl(prefix).unwrap_or(0) != 0 {
                return None;
            }
            Some(Route {
                iface: iface.to_string(),
                dest: u128::from(u32::from(v4(dest)?)),
                prefix,
                gateway: IpAddr::V4(v4(gw)?),
                flags: u32::from_str_radix(flags, 16).ok()?,
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dest plen src splen nexthop metric refcnt use
/// flags iface`, all hex.
fn parse_v6(text: &str) -> Vec<Route> {
    let hex128 = |s: &str| u128::from_str_radix(s, 16).ok();
    let hex32 = |s: &str| u32::from_str_radix(s, 16).ok();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            Some(Route {
                iface: f[9].to_string(),
                dest: hex128(f[0])?,
                prefix: hex32(f[1])?.min(128),
                gateway: IpAddr::V6(Ipv6Addr::from(hex128(f[4])?)),
                flags: hex32(f[8])?,
                metric: hex32(f[5])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
hvptap0\t00024D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
lab0\t0000A8C0\t0100A8C0\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0\n";

    const V6: &str = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
fd000000000000000000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000004 00000000 80200001     eth0
fd770000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001  hvptap0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn ipv4_routes_tell_own_links_from_the_way_out() {
        let routes = parse_v4(V4);
        assert_eq!(routes.len(), 4);
        assert_eq!(
            classify(ip("10.77.2.2"), &routes),
            Reach::OwnLink {
                iface: "hvptap0".into()
            }
        );
        let Reach::Beyond { why } = classify(ip("10.1.2.3"), &routes) else {
            panic!("a gateway's target is beyond");
        };
        assert_eq!(why, "it is reached through gateway 192.0.2.1 on eth0");
        let Reach::Beyond { why } = classify(ip("192.0.2.7"), &routes) else {
            panic!("the default route's link is beyond");
        };
        assert!(why.contains("on eth0, the link of this host's default route"));
        // The longest prefix wins over the default route.
        let Reach::Beyond { why } = classify(ip("192.168.4.4"), &routes) else {
            panic!("a gateway's target is beyond");
        };
        assert!(why.contains("gateway 192.168.0.1 on lab0"), "{why}");
    }

    #[test]
    fn ipv6_routes_and_local_entries() {
        let routes = parse_v6(V6);
        assert_eq!(routes.len(), 5);
        assert_eq!(classify(ip("fd00::2"), &routes), Reach::ThisHost);
        assert_eq!(
            classify(ip("fd77::9"), &routes),
            Reach::OwnLink {
                iface: "hvptap0".into()
            }
        );
        assert!(matches!(
            classify(ip("2001:db8::1"), &routes),
            Reach::Beyond { why } if why.contains("gateway fd00::1 on eth0")
        ));
        // The reject route on lo is not a way anywhere.
        assert!(matches!(
            classify(ip("2001:db8::1"), &parse_v6(V6.lines().last().unwrap_or(""))),
            Reach::Beyond { why } if why == "no route leads there"
        ));
    }

    #[test]
    fn no_routes_and_odd_lines() {
        assert!(parse_v4("Iface\tDestination\nbad line\n").is_empty());
        assert!(parse_v4("h\neth0\t0\t0\t1\t0\t0\t0\t00FF00FF\n").is_empty());
        assert!(parse_v6("zz 40 x\n").is_empty());
        assert!(matches!(
            classify(ip("10.0.0.1"), &[]),
            Reach::Beyond { .. }
        ));
    }

    #[test]
    fn loopback_and_own_addresses_are_this_host() {
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert_eq!(reach(ip(a)).ok(), Some(Reach::ThisHost), "{a}");
        }
    }
}
