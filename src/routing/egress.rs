//! The pods' own traffic with a fallback: one source rule per pod subnet (`from <pod subnet> lookup
//! T` at rulePriority+10, `ip -6 rule` for an IPv6 subnet) whose table is that of the first uplink
//! of `[outbound, ...fallback]` healthy in the subnet's family. The families' rules are separate
//! kernel rules and move separately: an uplink whose IPv6 provider is dark but whose IPv4 works
//! (or one with no IPv4 at all) keeps the family it carries.
//! Only this rule moves; every table stays on its uplink, so forwards arriving on an uplink that is
//! failed over from are still answered through it. Pure: health comes in as a function.

use super::IpRule;
use crate::config::HealthConfig;
use crate::family::{family_of, Family};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Recorded with each attachment of a network whose `routing.outbound` has a fallback.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    pub network: String,
    pub priority: u32,
    pub subnets: Vec<IpNetwork>,
    /// `[outbound, ...fallback]`, in order of preference.
    pub uplinks: Vec<EgressUplink>,
    pub health: HealthConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressUplink {
    pub interface: String,
    pub table: u32,
}

impl Egress {
    pub fn rule(&self, subnet: IpNetwork, table: u32) -> IpRule {
        let family = family_of(subnet.ip());
        IpRule { family, priority: self.priority, table, fwmark: None, from: Some(subnet), suppress_default: false }
    }

    pub fn primary(&self) -> &EgressUplink {
        &self.uplinks[0]
    }

    /// The first uplink healthy in `family`; the primary when none is.
    pub fn chosen(&self, family: Family, healthy: impl Fn(&str, Family) -> bool) -> &EgressUplink {
        self.uplinks.iter().find(|u| healthy(&u.interface, family)).unwrap_or_else(|| self.primary())
    }

    /// The families of the pods' ranges, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        let mut out: Vec<Family> = self.subnets.iter().map(|s| family_of(s.ip())).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every form this network's source rule can take, for removal.
    pub fn variants(&self) -> BTreeSet<IpRule> {
        self.subnets.iter().flat_map(|s| self.uplinks.iter().map(|u| self.rule(*s, u.table))).collect()
    }
}

/// The ip rules as they should be now: each network's source rule pointed at the uplink health
/// chose. Rules of networks without a fallback are as recorded.
pub fn resolve_rules<'a>(
    rules: &BTreeSet<IpRule>,
    egress: impl IntoIterator<Item = &'a Egress>,
    healthy: impl Fn(&str, Family) -> bool,
) -> BTreeSet<IpRule> {
    let mut out = rules.clone();
    for e in egress {
        for subnet in &e.subnets {
            let chosen = e.chosen(family_of(subnet.ip()), &healthy).table;
            if out.remove(&e.rule(*subnet, e.primary().table)) {
                out.insert(e.rule(*subnet, chosen));
            }
        }
    }
    out
}

/// `rules` plus every other form of the egress rules among them (what DEL must remove, whichever
/// uplink the pods were leaving by).
pub fn with_variants<'a>(rules: &BTreeSet<IpRule>, egress: impl IntoIterator<Item = &'a Egress>) -> BTreeSet<IpRule> {
    let mut out = rules.clone();
    for e in egress {
        if e.subnets.iter().any(|s| rules.contains(&e.rule(*s, e.primary().table))) {
            out.extend(e.variants());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress() -> Egress {
        Egress {
            network: "dind".into(),
            priority: 110,
            subnets: vec!["10.20.0.0/24".parse().unwrap()],
            uplinks: vec![
                EgressUplink { interface: "wan1".into(), table: 100 },
                EgressUplink { interface: "wan0".into(), table: 101 },
                EgressUplink { interface: "wwan0".into(), table: 102 },
            ],
            health: HealthConfig::default(),
        }
    }

    #[test]
    fn the_first_healthy_uplink_wins_and_the_primary_when_none_is() {
        let e = egress();
        let v4 = Family::Ipv4;
        assert_eq!(e.chosen(v4, |_, _| true).interface, "wan1");
        assert_eq!(e.chosen(v4, |u, _| u != "wan1").interface, "wan0");
        assert_eq!(e.chosen(v4, |u, _| u == "wwan0").interface, "wwan0");
        assert_eq!(e.chosen(v4, |_, _| false).interface, "wan1");
    }

    #[test]
    fn each_familys_source_rule_moves_by_that_familys_health() {
        let mut e = egress();
        e.subnets.push("fd00:20::/64".parse().unwrap());
        let (v4, v6) = (e.subnets[0], e.subnets[1]);
        assert_eq!(e.families(), [Family::Ipv4, Family::Ipv6]);
        let rules: BTreeSet<IpRule> = [e.rule(v4, 100), e.rule(v6, 100)].into_iter().collect();
        // wan1 carries IPv6 only (an IPv6-only plan): IPv4 leaves by wan0, IPv6 stays on wan1.
        let v6_only = |u: &str, f: Family| u != "wan1" || f == Family::Ipv6;
        assert_eq!(resolve_rules(&rules, [&e], v6_only), [e.rule(v4, 101), e.rule(v6, 100)].into_iter().collect());
        // wan1's IPv6 provider is dark, its IPv4 works: only the IPv6 rule moves.
        let v6_dark = |u: &str, f: Family| u != "wan1" || f == Family::Ipv4;
        assert_eq!(resolve_rules(&rules, [&e], v6_dark), [e.rule(v4, 100), e.rule(v6, 101)].into_iter().collect());
    }

    #[test]
    fn both_families_source_rules_move_together_when_both_are_unhealthy() {
        let mut e = egress();
        e.subnets.push("fd00:20::/64".parse().unwrap());
        let (v4, v6) = (e.subnets[0], e.subnets[1]);
        assert_eq!(e.rule(v6, 100).family, crate::family::Family::Ipv6);
        assert_eq!(e.rule(v6, 100).to_string(), "ip -6 rule priority 110 from fd00:20::/64 lookup 100");
        let rules: BTreeSet<IpRule> = [e.rule(v4, 100), e.rule(v6, 100)].into_iter().collect();
        let resolved = resolve_rules(&rules, [&e], |u, _| u == "wwan0");
        assert_eq!(resolved, [e.rule(v4, 102), e.rule(v6, 102)].into_iter().collect());
        // DEL removes every form of both.
        assert_eq!(with_variants(&rules, [&e]).len(), 6);
    }

    #[test]
    fn only_the_source_rule_moves() {
        let e = egress();
        let subnet = e.subnets[0];
        let mark_rule = IpRule { fwmark: Some((0x64, 0x1fff)), from: None, ..e.rule(subnet, 100) };
        let rules: BTreeSet<IpRule> = [mark_rule.clone(), e.rule(subnet, 100)].into_iter().collect();
        let resolved = resolve_rules(&rules, [&e], |u, _| u != "wan1");
        assert_eq!(resolved, [mark_rule.clone(), e.rule(subnet, 101)].into_iter().collect());
        assert_eq!(resolve_rules(&rules, [&e], |_, _| true), rules);
        // An attachment that does not hold the source rule gets none.
        let only_mark: BTreeSet<IpRule> = [mark_rule].into_iter().collect();
        assert_eq!(resolve_rules(&only_mark, [&e], |_, _| false), only_mark);
        assert_eq!(with_variants(&rules, [&e]).len(), 4);
        assert_eq!(with_variants(&only_mark, [&e]), only_mark);
    }
}
