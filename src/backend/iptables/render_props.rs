//! The iptables rendering of any config: DNAT only ever targets the attachment's own addresses,
//! in the right family, with the attachment's tag (property tests).

use super::tests::{plan, TAG};
use super::*;
use crate::plan::tests::{att, conf, id};
use crate::plan::{family_of, HostPort};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::IpAddr;

// ---------------------------------------------------------------- property

#[derive(Debug, Clone)]
enum Dest {
    Own,
    OwnIndex(usize),
    Neighbour(usize),
}

#[derive(Debug, Clone)]
enum HostIp {
    None,
    Wildcard,
    V4,
    V6,
}

fn arb_protocol() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["tcp", "udp", "sctp"])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn dnat_rules_only_target_the_attachments_addresses(
        stack in prop::sample::select(vec![vec!["10.20.0.10/24"], vec!["fd00::10/64"], vec!["10.20.0.10/24", "fd00::10/64"]]),
        host_ports in prop::collection::hash_set(1u16..=65535, 0..12),
        rules in prop::collection::vec(
            (1u16..=65535, arb_protocol(), prop_oneof![Just(Dest::Own), (0usize..2).prop_map(Dest::OwnIndex), (0usize..2).prop_map(Dest::Neighbour)]),
            0..6),
        mappings in prop::collection::vec(
            (1u16..=65535, arb_protocol(), prop_oneof![Just(HostIp::None), Just(HostIp::Wildcard), Just(HostIp::V4), Just(HostIp::V6)]),
            0..6),
        masquerade in any::<bool>(),
    ) {
        let host_ports: Vec<u16> = host_ports.into_iter().collect();
        let a = att(&conf(json!({})), &stack);
        let neighbours: Vec<IpAddr> = a.addresses.iter().map(|p| match p.ip {
            IpAddr::V4(_) => "10.20.0.99".parse().unwrap(),
            IpAddr::V6(_) => "fd00::99".parse().unwrap(),
        }).collect();
        let n_rules = rules.len().min(host_ports.len());
        let raw_rules: Vec<Value> = rules.iter().zip(&host_ports).map(|((dest, proto, d), host)| {
            let mut r = json!({ "hostPort": host, "destPort": dest, "protocol": proto });
            match d {
                Dest::Own => {}
                Dest::OwnIndex(i) => r["destIP"] = json!(a.addresses[i % a.addresses.len()].ip.to_string()),
                Dest::Neighbour(i) => r["destIP"] = json!(neighbours[i % neighbours.len()].to_string()),
            }
            r
        }).collect();
        let raw_mappings: Vec<Value> = mappings.iter().zip(&host_ports[n_rules..]).map(|((cport, proto, h), host)| {
            let mut m = json!({ "hostPort": host, "containerPort": cport, "protocol": proto });
            match h {
                HostIp::None => {}
                HostIp::Wildcard => m["hostIP"] = json!("0.0.0.0"),
                HostIp::V4 => m["hostIP"] = json!("192.168.1.5"),
                HostIp::V6 => m["hostIP"] = json!("fd00:1::5"),
            }
            m
        }).collect();
        let c = conf(json!({
            "masquerade": masquerade,
            "portForwarding": { "rules": raw_rules },
            "runtimeConfig": { "portMappings": raw_mappings },
        }));
        let p = plan(&c, &id(), &a).expect("destIPs are all inside the subnet");

        for f in &p.forwards {
            prop_assert!(a.owns(f.pod_ip), "forward to {} which the attachment does not own", f.pod_ip);
            prop_assert!(p.host_ports.contains(&f.host));
            prop_assert!(f.host.host_ip.is_none_or(|h| h.is_ipv4() == f.pod_ip.is_ipv4()));
        }
        let mut dnat_count = 0;
        for r in p.rules.iter().filter(|r| r.spec.contains("-j DNAT")) {
            dnat_count += 1;
            prop_assert_eq!(&r.chain, CHAIN_DNAT);
            prop_assert_eq!(&r.table, "nat");
            let (_, to) = r.spec.rsplit_once("--to-destination ").expect("DNAT has a destination");
            let (ip, _port) = to.rsplit_once(':').unwrap();
            let ip: IpAddr = ip.trim_start_matches('[').trim_end_matches(']').parse().unwrap();
            prop_assert!(a.owns(ip), "DNAT to {ip} in {r}");
            prop_assert_eq!(r.family, family_of(ip));
            prop_assert!(r.spec.contains(TAG));
        }
        prop_assert_eq!(dnat_count, p.forwards.len());
        // host_ports: sorted, distinct, and exactly the forwards' ports.
        prop_assert!(p.host_ports.windows(2).all(|w| w[0] < w[1]));
        let from_forwards: BTreeSet<HostPort> = p.forwards.iter().map(|f| f.host).collect();
        prop_assert_eq!(p.host_ports.iter().copied().collect::<BTreeSet<_>>(), from_forwards);
        // Every rule's family is one the attachment has.
        for r in &p.rules {
            prop_assert!(a.addresses.iter().any(|x| family_of(x.ip) == r.family));
        }
    }
}
