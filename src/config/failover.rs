//! `routing.outbound.fallback` and `routing.health`: which uplinks the pods' own traffic may fail
//! over to, by which tables, and how the agent judges an uplink healthy. Forwards' replies follow
//! their arrival uplink (or their rule's), so a fallback inside a rule's routing block is refused.

use super::raw::{RawHealth, RawRouting, RawRule};
use super::{FallbackUplink, HealthConfig, Outbound};
use crate::cni;
use crate::error::{Error, Result};
use std::net::IpAddr;

fn invalid(msg: String) -> Error {
    Error::invalid_config(msg)
}

/// The fallback list of the global block, each uplink with its table. `rules` give an uplink its
/// table when one of their routing blocks names it; others get `table_id + position`.
pub(super) fn validate_fallback(
    r: &RawRouting,
    primary: &Outbound,
    table_id: u32,
    rules: &[RawRule],
) -> Result<Vec<FallbackUplink>> {
    let names = r.outbound.as_ref().and_then(|o| o.fallback.clone()).unwrap_or_default();
    let mut out: Vec<FallbackUplink> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("routing.outbound.fallback[{i}]");
        cni::validate_ifname(name).map_err(|e| invalid(format!("{field}: {}", e.msg)))?;
        if name == &primary.interface || out.iter().any(|f| &f.outbound.interface == name) {
            return Err(invalid(format!("{field}: {name:?} is already in the list [outbound.interface, ...fallback]")));
        }
        let from_rule = rules
            .iter()
            .enumerate()
            .filter_map(|(at, rule)| Some((at, rule.routing.as_ref()?)))
            .find(|(_, rr)| rr.outbound.as_ref().is_some_and(|o| &o.interface == name) && rr.table_id.is_some());
        let uplink = match from_rule {
            Some((at, rr)) => {
                let o = rr.outbound.as_ref().expect("matched on it");
                let at = format!("portForwarding.rules[{at}].routing.outbound");
                let (gateway, gateway6) = super::validate::validate_gateways(&at, o)?;
                FallbackUplink {
                    table_id: rr.table_id.and_then(|t| u32::try_from(t).ok()).unwrap_or(0),
                    table_name: rr.table_name.clone().filter(|n| !n.is_empty()),
                    outbound: Outbound {
                        interface: name.clone(),
                        gateway,
                        gateway6,
                        use_default_route: o.use_default_route,
                    },
                }
            }
            None => {
                let id = table_id + i as u32 + 1;
                if id > 252 {
                    return Err(invalid(format!(
                        "{field}: {name:?} needs table {id} (routing.tableId + {}), outside 1-252; give it a table in a rule's routing block or lower routing.tableId",
                        i + 1
                    )));
                }
                FallbackUplink {
                    table_id: id,
                    table_name: None,
                    outbound: Outbound {
                        interface: name.clone(),
                        gateway: None,
                        gateway6: None,
                        use_default_route: false,
                    },
                }
            }
        };
        out.push(uplink);
    }
    Ok(out)
}

/// `routing.health` with its defaults; only meaningful with a fallback.
pub(super) fn validate_health(raw: Option<&RawHealth>, has_fallback: bool) -> Result<HealthConfig> {
    let mut h = HealthConfig::default();
    let Some(raw) = raw else { return Ok(h) };
    if !has_fallback {
        return Err(invalid(
            "routing.health: needs routing.outbound.fallback (with no uplink to fail over to, there is nothing to decide)".into(),
        ));
    }
    for (i, t) in raw.targets.iter().enumerate() {
        match t.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(v4)) if !v4.is_unspecified() && !v4.is_broadcast() && !v4.is_multicast() => {
                h.targets.push(ip)
            }
            // One list per family, as gateway and gateway6: say where an IPv6 target belongs.
            Ok(IpAddr::V6(_)) => {
                return Err(invalid(format!(
                    "routing.health.targets[{i}]: {t:?} is an IPv6 address; IPv6 targets go in routing.health.targets6"
                )))
            }
            _ => return Err(invalid(format!("routing.health.targets[{i}]: {t:?} is not a unicast IPv4 address"))),
        }
    }
    for (i, t) in raw.targets6.iter().enumerate() {
        match t.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V6(v6)) if is_probe_target6(v6) => h.targets.push(ip),
            Ok(IpAddr::V6(_)) => {
                return Err(invalid(format!(
                    "routing.health.targets6[{i}]: {t:?} is not a global unicast IPv6 address (a probe goes beyond the uplink's router, which link-local, multicast and loopback addresses never do)"
                )))
            }
            Ok(IpAddr::V4(_)) => {
                return Err(invalid(format!(
                    "routing.health.targets6[{i}]: {t:?} is an IPv4 address; IPv4 targets go in routing.health.targets"
                )))
            }
            Err(_) => {
                return Err(invalid(format!("routing.health.targets6[{i}]: {t:?} is not a unicast IPv6 address")))
            }
        }
    }
    let within = |field: &str, v: Option<i64>, lo: i64, hi: i64, default: u32| -> Result<u32> {
        match v {
            None => Ok(default),
            Some(n) if (lo..=hi).contains(&n) => Ok(n as u32),
            Some(n) => Err(invalid(format!("routing.health.{field}: {n} is outside {lo}-{hi}"))),
        }
    };
    h.interval_ms = within("intervalMs", raw.interval_ms, 100, 60_000, h.interval_ms)?;
    h.timeout_ms = within("timeoutMs", raw.timeout_ms, 10, 59_999, h.timeout_ms.min(h.interval_ms.saturating_sub(1)))?;
    h.fail_after = within("failAfter", raw.fail_after, 1, 100, h.fail_after)?;
    h.recover_after = within("recoverAfter", raw.recover_after, 1, 100, h.recover_after)?;
    if h.timeout_ms >= h.interval_ms {
        return Err(invalid(format!(
            "routing.health.timeoutMs: {} must be less than intervalMs ({}): a round's answers must be in before the next round",
            h.timeout_ms, h.interval_ms
        )));
    }
    Ok(h)
}

/// An IPv6 probe is sent from the uplink's global address through its router: a target it can
/// reach that way is neither unspecified, loopback, multicast nor link-local.
fn is_probe_target6(ip: std::net::Ipv6Addr) -> bool {
    !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast() && !ip.is_unicast_link_local()
}

/// A forward's replies leave by the uplink its connection arrived on (or its rule's): failing them
/// over to another uplink would answer from an address the client never talked to.
pub(super) fn refuse_rule_fallback(rule: &RawRule) -> Result<()> {
    match rule.routing.as_ref().and_then(|r| r.outbound.as_ref()).and_then(|o| o.fallback.as_ref()) {
        Some(_) => Err(invalid(
            "routing.outbound.fallback: only the global routing block (the pods' own traffic) fails over; a forward's replies must leave by the uplink its client reached".into(),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{decode, NetConf};
    use serde_json::{json, Value};

    fn conf(routing: Value, rules: Value) -> crate::error::Result<NetConf> {
        let v = json!({"cniVersion": "1.0.0", "name": "dind", "type": "bridge-nat",
                       "routing": routing, "portForwarding": {"rules": rules}});
        decode(v.to_string().as_bytes())?.validate()
    }

    fn routing(outbound: Value, health: Option<Value>) -> Value {
        let mut r = json!({"tableId": 100, "fwmark": "0x64", "outbound": outbound});
        if let Some(h) = health {
            r["health"] = h;
        }
        r
    }

    #[test]
    fn fallbacks_get_a_rules_table_or_table_id_plus_position_and_health_defaults() {
        let rule = json!({"name": "ssh", "hostPort": 2222, "destPort": 22,
            "routing": {"fwmark": "0x65", "tableId": 120, "outbound": {"interface": "wwan0"}}});
        let c =
            conf(routing(json!({"interface": "wan1", "fallback": ["wan0", "wwan0"]}), None), json!([rule])).unwrap();
        let g = c.routing.unwrap();
        let tables: Vec<(String, u32)> =
            g.fallback.iter().map(|f| (f.outbound.interface.clone(), f.table_id)).collect();
        assert_eq!(tables, vec![("wan0".into(), 101), ("wwan0".into(), 120)]);
        assert_eq!(
            (g.health.interval_ms, g.health.timeout_ms, g.health.fail_after, g.health.recover_after),
            (1000, 800, 3, 5)
        );
    }

    #[test]
    fn targets6_join_the_ipv4_targets_in_one_list_of_both_families() {
        let health = json!({"targets": ["192.0.2.9"], "targets6": ["2001:db8::9", "2606:4700:4700::1111"]});
        let c = conf(routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(health)), json!([])).unwrap();
        let targets: Vec<String> = c.routing.unwrap().health.targets.iter().map(|t| t.to_string()).collect();
        assert_eq!(targets, ["192.0.2.9", "2001:db8::9", "2606:4700:4700::1111"]);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (routing(json!({"interface": "wan1", "fallback": ["wan1"]}), None), "routing.outbound.fallback[0]"),
            (routing(json!({"interface": "wan1", "fallback": ["bad/name"]}), None), "routing.outbound.fallback[0]"),
            (routing(json!({"interface": "wan1"}), Some(json!({"targets": ["192.0.2.9"]}))), "routing.health: needs"),
            (
                routing(
                    json!({"interface": "wan1", "fallback": ["wan0"]}),
                    Some(json!({"intervalMs": 500, "timeoutMs": 500})),
                ),
                "routing.health.timeoutMs: 500 must be less than intervalMs (500)",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"targets": ["example.com"]}))),
                "routing.health.targets[0]",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"targets": ["2001:db8::9"]}))),
                "routing.health.targets[0]: \"2001:db8::9\" is an IPv6 address; IPv6 targets go in routing.health.targets6",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"targets6": ["192.0.2.9"]}))),
                "routing.health.targets6[0]: \"192.0.2.9\" is an IPv4 address; IPv4 targets go in routing.health.targets",
            ),
            (
                routing(
                    json!({"interface": "wan1", "fallback": ["wan0"]}),
                    Some(json!({"targets6": ["2001:db8::9", "fe80::1"]})),
                ),
                "routing.health.targets6[1]: \"fe80::1\" is not a global unicast IPv6 address",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"targets6": ["ff02::1"]}))),
                "routing.health.targets6[0]",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"targets6": ["dns.google"]}))),
                "routing.health.targets6[0]: \"dns.google\" is not a unicast IPv6 address",
            ),
            (
                routing(json!({"interface": "wan1", "fallback": ["wan0"]}), Some(json!({"failAfter": 0}))),
                "routing.health.failAfter: 0 is outside 1-100",
            ),
        ];
        for (r, needle) in cases {
            let e = conf(r, json!([])).unwrap_err();
            assert_eq!(e.code, 7, "{}", e.msg);
            assert!(e.msg.contains(needle), "{:?} does not contain {needle:?}", e.msg);
        }
        // table 101 taken by a rule of another uplink
        let rule = json!({"name": "x", "hostPort": 1, "destPort": 1,
            "routing": {"fwmark": "0x65", "tableId": 101, "outbound": {"interface": "eth9"}}});
        let e = conf(routing(json!({"interface": "wan1", "fallback": ["wan0"]}), None), json!([rule])).unwrap_err();
        assert!(e.msg.contains("gets table 101"), "{}", e.msg);
        // a forward's own block cannot fail over
        let rule = json!({"name": "x", "hostPort": 1, "destPort": 1,
            "routing": {"fwmark": "0x65", "tableId": 120, "outbound": {"interface": "eth9", "fallback": ["wan0"]}}});
        let e = conf(routing(json!({"interface": "wan1"}), None), json!([rule])).unwrap_err();
        assert!(
            e.msg.contains("portForwarding.rules[0]") && e.msg.contains("only the global routing block"),
            "{}",
            e.msg
        );
    }
}
