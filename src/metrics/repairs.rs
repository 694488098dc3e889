//! Which part of the node a repair line of `commands::reconcile` put back. The lines are written
//! for people (`added ip rule priority 100 fwmark 0x64/0x1fff lookup 100`); a dashboard needs a
//! handful of kinds, so the first words decide.

/// The kinds, as the `kind` label spells them.
pub const KINDS: &[&str] = &["route", "ip_rule", "firewall", "sysctl", "table_name", "other"];

/// The kind of one repair line; `other` for a line no rule below knows (a new kind of repair
/// shows up there rather than being miscounted).
pub fn classify_repair(line: &str) -> &'static str {
    // routing/apply.rs: "installed route ...", "removed stale route ...".
    if line.starts_with("installed route ") || line.starts_with("removed stale route ") {
        return "route";
    }
    // routing/apply.rs: "added ip rule ...", "removed ip -6 rule ... (no record needs it)".
    let rule = |rest: &str| rest.starts_with("ip rule ") || rest.starts_with("ip -6 rule ");
    if line.strip_prefix("added ").is_some_and(rule) || line.strip_prefix("removed ").is_some_and(rule) {
        return "ip_rule";
    }
    // commands/reconcile.rs: "set sysctl PATH to VALUE".
    if line.starts_with("set sysctl ") {
        return "sysctl";
    }
    // commands/reconcile.rs: "registered table names for iproute2".
    if line.starts_with("registered table names") {
        return "table_name";
    }
    // backend/iptables: "iptables Ipv4 nat: -A ..."; backend/nftables: "iptables-nft ipv4 filter:
    // ...", "<attachment>: missing nftables element ...", "table inet bridge-nat is there but ...",
    // "rebuilt table inet bridge-nat ...".
    if line.starts_with("iptables") || line.contains("nftables") || line.contains("table inet ") {
        return "firewall";
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{IpRule, Route};

    #[test]
    fn routing_lines_are_routes_and_ip_rules() {
        let rule = IpRule {
            family: crate::family::Family::Ipv4,
            priority: 100,
            table: 100,
            fwmark: Some((0x64, 0x1fff)),
            from: None,
            suppress_default: false,
        };
        let rule6 = IpRule { family: crate::family::Family::Ipv6, ..rule.clone() };
        let route = Route { table: 101, dst: "0.0.0.0/0".parse().unwrap(), gateway: None, dev: "up2".into() };
        for rule in [rule, rule6] {
            assert_eq!(classify_repair(&format!("added {rule}")), "ip_rule");
            assert_eq!(classify_repair(&format!("removed {rule} (no record needs it)")), "ip_rule");
        }
        assert_eq!(classify_repair(&format!("installed {route}")), "route");
        assert_eq!(classify_repair(&format!("removed stale {route}")), "route");
    }

    #[test]
    fn firewall_lines_of_both_backends_are_firewall() {
        for line in [
            "iptables Ipv4 nat: -A BRIDGE-NAT-DNAT -p tcp --dport 30080 -j DNAT --to-destination 10.20.0.5:8080",
            "iptables-nft ipv4 filter: -A BRIDGE-NAT-NFT-FWD -i dind-br0 -j ACCEPT",
            "dind/0123456789ab/net1: missing nftables element dnat4-any { tcp . 30080 }",
            "dind/0123456789ab/net1: nftables table inet bridge-nat is missing",
            "table inet bridge-nat is there but no attachment needs it",
            "rebuilt table inet bridge-nat for 3 attachment(s)",
        ] {
            assert_eq!(classify_repair(line), "firewall", "{line}");
        }
    }

    #[test]
    fn sysctls_table_names_and_the_unknown() {
        assert_eq!(classify_repair("set sysctl /proc/sys/net/ipv4/conf/up2/src_valid_mark to 1"), "sysctl");
        assert_eq!(classify_repair("registered table names for iproute2"), "table_name");
        assert_eq!(classify_repair("polished the uplinks"), "other");
        assert!(KINDS.contains(&classify_repair("polished the uplinks")));
    }
}
