//! The iptables rendering of routing marks: arrival uplinks in a chain of the network, and
//! `replyVia: "rule"` keeping the seed's per-forward marks.

use super::tests::{plan_v4, NET, TAG};
use super::*;
use crate::plan::tests::conf;
use serde_json::json;

#[test]
fn arrival_uplinks_mark_new_connections_in_a_chain_of_the_network() {
    let c = conf(json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" } },
        "portForwarding": { "rules": [
            { "name": "plain", "hostPort": 2376, "destPort": 2376 },
            { "name": "web", "hostPort": 30080, "destPort": 8080,
              "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "eth0" } } }
        ] }
    }));
    let p = plan_v4(&c);
    let mangle: Vec<String> = p.rules.iter().filter(|r| r.table == "mangle").map(|r| r.to_string()).collect();
    let chain = "BRIDGE-NAT-IN-3618c5ec";
    let new = "-m addrtype --dst-type LOCAL -m conntrack --ctstate NEW";
    for want in [
        format!("ipv4 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 2376 {new} {TAG} -j {chain}"),
        format!("ipv4 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 30080 {new} {TAG} -j {chain}"),
        format!("ipv4 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 30080 {new} -m mark --mark 0x0/0x1fff {TAG} -j MARK --set-xmark 0x65/0x1fff"),
        format!("ipv4 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 2376 {new} -m mark --mark 0x0/0x1fff {TAG} -j MARK --set-xmark 0x64/0x1fff"),
        format!("ipv4 mangle -A {chain} -i eth0 {NET} -j MARK --set-xmark 0x65/0x1fff"),
        format!("ipv4 mangle -A {chain} -i eth5 {NET} -j MARK --set-xmark 0x64/0x1fff"),
    ] {
        assert!(mangle.contains(&want), "missing {want}\nin:\n{}", mangle.join("\n"));
    }
    // The jumps, restore and save of every marked network.
    assert_eq!(mangle.len(), 6 + 4, "{}", mangle.join("\n"));
    assert!(chain.len() <= 28);
}

#[test]
fn reply_via_rule_keeps_the_seeds_mark_rules() {
    let c = conf(json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" }, "replyVia": "rule" },
        "portForwarding": { "rules": [ { "name": "plain", "hostPort": 2376, "destPort": 2376 } ] }
    }));
    let p = plan_v4(&c);
    let mark: Vec<&Rule> = p.rules.iter().filter(|r| r.chain == CHAIN_MARK && r.spec.contains("--set-xmark")).collect();
    assert_eq!(mark.len(), 1);
    assert_eq!(
        mark[0].spec,
        format!("-p tcp -m tcp --dport 2376 -m addrtype --dst-type LOCAL -m conntrack --ctstate NEW {TAG} -j MARK --set-xmark 0x64/0x1fff")
    );
    assert!(!p.rules.iter().any(|r| r.chain.starts_with("BRIDGE-NAT-IN-") || r.spec.contains("BRIDGE-NAT-IN-")));
}

#[test]
fn ipv6_forwards_are_marked_in_ip6tables_by_the_same_marks() {
    let c = conf(json!({
        "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" } },
        "portForwarding": { "rules": [
            { "name": "web", "hostPort": 30080, "destPort": 8080,
              "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "eth0" } } }
        ] },
        "runtimeConfig": { "portMappings": [ { "hostPort": 8443, "containerPort": 80, "hostIP": "2001:db8::2" } ] }
    }));
    let a = crate::plan::tests::att(&c, &["10.20.0.10/24", "fd00::10/64"]);
    let p = super::tests::plan(&c, &crate::plan::tests::id(), &a).expect("plan");
    let mangle6: Vec<String> =
        p.rules.iter().filter(|r| r.table == "mangle" && r.family == Family::Ipv6).map(|r| r.to_string()).collect();
    let chain = "BRIDGE-NAT-IN-3618c5ec";
    let new = "-m addrtype --dst-type LOCAL -m conntrack --ctstate NEW";
    for want in [
        format!("ipv6 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 30080 {new} {TAG} -j {chain}"),
        format!("ipv6 mangle -A BRIDGE-NAT-MARK -d 2001:db8::2/128 -p tcp -m tcp --dport 8443 {new} {TAG} -j {chain}"),
        format!("ipv6 mangle -A BRIDGE-NAT-MARK -p tcp -m tcp --dport 30080 {new} -m mark --mark 0x0/0x1fff {TAG} -j MARK --set-xmark 0x65/0x1fff"),
        format!("ipv6 mangle -A BRIDGE-NAT-MARK -d 2001:db8::2/128 -p tcp -m tcp --dport 8443 {new} -m mark --mark 0x0/0x1fff {TAG} -j MARK --set-xmark 0x64/0x1fff"),
        format!("ipv6 mangle -A {chain} -i eth0 {NET} -j MARK --set-xmark 0x65/0x1fff"),
        format!("ipv6 mangle -A {chain} -i eth5 {NET} -j MARK --set-xmark 0x64/0x1fff"),
        "ipv6 mangle -A PREROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-MARK".to_string(),
        "ipv6 mangle -A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-SAVE".to_string(),
    ] {
        assert!(mangle6.contains(&want), "missing {want}\nin:\n{}", mangle6.join("\n"));
    }
    assert_eq!(mangle6.len(), 6 + 4, "{}", mangle6.join("\n"));
}
