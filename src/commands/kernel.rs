//! The kernel state both backends share: sysctls, the bridge gateway, policy routing over
//! rtnetlink, iproute2 table names and UDP conntrack entries.

use crate::cni::prev_result::Attachment;
use crate::config::Protocol;
use crate::error::{Context, Error, Result};
use crate::netlink::conntrack::{self, UdpFlow};
use crate::plan::{HostPort, Plan, Sysctl};
use crate::routing::apply::{self as routes, Applied};
use crate::routing::netlink::Netlink;
use crate::routing::rt_tables::RtTables;
use crate::routing::{egress, IpRule, Route};
use std::collections::BTreeSet;

pub fn apply_sysctls(sysctls: &[Sysctl]) -> Result<()> {
    for s in sysctls {
        let current = match std::fs::read_to_string(&s.path) {
            Ok(v) => v,
            Err(e) if !s.required && e.kind() == std::io::ErrorKind::NotFound => {
                log::warn!("sysctl {} not there yet (interface absent?); CHECK will report it", s.path);
                continue;
            }
            Err(e) => return Err(Error::io(format!("read sysctl {}", s.path), e)),
        };
        if current.trim() != s.value {
            write_sysctl(s)?;
        }
    }
    Ok(())
}

/// Write through /proc; where /proc/sys is read-only (the agent in a container without privileges),
/// set the per-interface IPv4 settings bridge-nat uses over rtnetlink instead.
fn write_sysctl(s: &Sysctl) -> Result<()> {
    let err = match std::fs::write(&s.path, &s.value) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let by_netlink = s.path.strip_prefix("/proc/sys/net/ipv4/conf/").and_then(|rest| {
        let (ifname, key) = rest.split_once('/')?;
        let key = match key {
            "src_valid_mark" => 24,
            "route_localnet" => 26,
            _ => return None,
        };
        Some((crate::routing::netlink::link_index(ifname)?, key, s.value.parse::<u32>().ok()?))
    });
    match by_netlink {
        Some((index, key, value)) if err.raw_os_error() == Some(nix::libc::EROFS) => Netlink::open()
            .and_then(|mut nl| nl.set_ipv4_conf(index, key, value))
            .context(format!("set sysctl {} (read-only /proc/sys, tried rtnetlink)", s.path)),
        _ => Err(Error::io(format!("set sysctl {}", s.path), err)),
    }
}

/// What CHECK reports about sysctls.
pub fn check_sysctls(sysctls: &[Sysctl]) -> Vec<String> {
    let mut problems = Vec::new();
    for s in sysctls {
        match std::fs::read_to_string(&s.path) {
            Ok(v) if v.trim() == s.value => {}
            Ok(v) => problems.push(format!("sysctl {} is {} instead of {}", s.path, v.trim(), s.value)),
            Err(e) => problems.push(format!("sysctl {} unreadable: {e}", s.path)),
        }
    }
    problems
}

/// Gateway on the bridge, then this attachment's ip rules and tables. Returns the routes of its
/// tables as installed.
/// The pods' source rule (with a fallback) points at the uplink `healthy` leaves them by.
pub fn apply_routing(
    planned: &Plan,
    healthy: impl Fn(&str, crate::family::Family) -> bool,
    applied: &mut Applied,
) -> Result<BTreeSet<Route>> {
    let mut nl = Netlink::open()?;
    if let Some(gw) = planned.gateway {
        routes::ensure_gateway(&mut nl, &planned.bridge, gw).context("bridge gateway")?;
    }
    let r = &planned.routing;
    if r.ip_rules.is_empty() && r.tables.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (resolved, warnings) = routes::resolve_tables(&mut nl, &r.tables)?;
    for w in warnings {
        log::warn!("{w}; CHECK will report it until it is fixed");
    }
    warn_ipv6_uplinks(planned, &resolved);
    let rules = egress::resolve_rules(&r.ip_rules, r.egress.iter(), healthy);
    routes::apply(&mut nl, &rules, &resolved, applied).context("policy routing")?;
    // The source rule in another form (left by an agent that died while failed over, or health
    // that changed since) would still match first: the one just added is the only right one.
    let stale: BTreeSet<IpRule> =
        egress::with_variants(&r.ip_rules, r.egress.iter()).difference(&rules).cloned().collect();
    routes::remove(&mut nl, &stale, &BTreeSet::new()).context("policy routing: the pods' source rule")?;
    Ok(resolved)
}

/// What of an IPv6 uplink's own settings defeats its table (logged).
fn warn_ipv6_uplinks(planned: &Plan, resolved: &BTreeSet<Route>) {
    use crate::routing::uplink6::{read_ipv6_conf, uplink_warnings};
    let uplinks: BTreeSet<&str> = planned
        .routing
        .tables
        .iter()
        .filter(|t| t.family() == crate::plan::Family::Ipv6)
        .map(|t| t.outbound.interface.as_str())
        .collect();
    for uplink in uplinks {
        let advertised = resolved.iter().any(|r| {
            r.dev == uplink
                && r.dst.prefix() == 0
                && matches!(r.gateway, Some(std::net::IpAddr::V6(g)) if g.is_unicast_link_local())
        });
        for w in uplink_warnings(uplink, advertised, read_ipv6_conf) {
            log::warn!("{w}");
        }
    }
}

/// Delete the node's neighbour entries for the pod's addresses on the bridge that point at a MAC
/// the pod does not have (see routing/neighbour.rs); never create one. The pod's namespace is
/// read only when there is an entry to judge, which on a new address there is not. A failure is
/// logged, not fatal: the kernel still re-verifies an entry once it ages, so the pod is only late.
pub fn refresh_neighbours(att: &Attachment, netns: &str, ifname: &str) {
    use crate::routing::neighbour::{choose_action, read_pod_mac, Action};
    let Some(ifindex) = crate::routing::netlink::link_index(&att.bridge) else {
        return;
    };
    // Read once, and only for the first address that has an entry.
    let mut real: Option<Option<[u8; 6]>> = None;
    let mut read_real = || match read_pod_mac(netns, ifname) {
        Ok(Some(mac)) => {
            if let Some(reported) = att.mac.filter(|p| *p != mac) {
                log::info!(
                    "prevResult names MAC {} for the pod; its {ifname} has {}",
                    show_mac(reported),
                    show_mac(mac)
                );
            }
            Some(mac)
        }
        Ok(None) => {
            log::debug!("no interface {ifname} with a MAC in {netns}");
            None
        }
        Err(e) => {
            log::debug!("cannot read the MAC of {ifname} in {netns}: {e}");
            None
        }
    };
    let result = Netlink::open().and_then(|mut nl| {
        for a in &att.addresses {
            let Some(existing) = nl.lookup_neighbour(ifindex, a.ip)? else { continue };
            let pod_mac = *real.get_or_insert_with(&mut read_real);
            match choose_action(Some(existing), pod_mac, att.mac) {
                Action::Keep => {}
                Action::Forget => nl.delete_neighbour(ifindex, a.ip)?,
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        log::warn!("neighbour entries of the pod on {}: {e}", att.bridge);
    }
}

fn show_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Remove ip rules and empty tables nobody needs any more.
pub fn remove_routing(ip_rules: &BTreeSet<IpRule>, tables: &BTreeSet<u32>) -> Result<()> {
    if ip_rules.is_empty() && tables.is_empty() {
        return Ok(());
    }
    let mut nl = Netlink::open()?;
    routes::remove(&mut nl, ip_rules, tables).context("remove policy routing")
}

pub fn register_table_names(names: &BTreeSet<(u32, String)>) -> Result<()> {
    RtTables::system().sync(names)
}

/// Flows to these host ports may be pinned to an old pod (or to no pod) by conntrack. Only flows
/// addressed to the node are touched, not traffic it forwards to the same port elsewhere.
pub fn clear_udp_conntrack(host_ports: &[HostPort]) {
    let udp: Vec<&HostPort> = host_ports.iter().filter(|h| h.protocol == Protocol::Udp).collect();
    if udp.is_empty() {
        return;
    }
    let local = match Netlink::open().and_then(|mut nl| nl.local_addresses()) {
        Ok(addrs) => addrs,
        Err(e) => return log::warn!("clear UDP conntrack entries: list the node's addresses: {e}"),
    };
    let flows: Vec<UdpFlow> = udp
        .iter()
        .flat_map(|h| match h.host_ip {
            Some(ip) => vec![UdpFlow { port: h.port, dst: Some(ip) }],
            None => local.iter().map(|ip| UdpFlow { port: h.port, dst: Some(*ip) }).collect(),
        })
        .collect();
    for v6 in [false, true] {
        let of_family: Vec<UdpFlow> =
            flows.iter().copied().filter(|f| f.dst.is_none_or(|d| d.is_ipv6() == v6)).collect();
        match conntrack::clear_udp(v6, &of_family) {
            Ok(0) => {}
            Ok(n) => log::info!("cleared {n} stale UDP conntrack entries"),
            Err(e) => log::warn!("clear UDP conntrack entries: {e}"),
        }
    }
}
