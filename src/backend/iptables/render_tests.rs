//! The iptables rendering of a plan, rule by rule: exact rule texts for every kind of forward,
//! network and family. Every rule traces to one function of render.rs. Properties over any config
//! are in render_props.rs.

use super::*;
use crate::config::{AttachmentId, NetConf, Protocol};
use crate::plan::tests::{att, conf, id};
use crate::plan::{Forward, HostPort, Plan, Sysctl};
use serde_json::{json, Value};
use std::net::IpAddr;

/// A plan with its iptables rendering beside it, so tests read `p.rules` next to `p.sysctls`.
pub(super) struct Rendered {
    plan: Plan,
    pub(super) rules: BTreeSet<Rule>,
}

impl std::ops::Deref for Rendered {
    type Target = Plan;
    fn deref(&self) -> &Plan {
        &self.plan
    }
}

pub(super) fn plan(
    c: &NetConf,
    id: &AttachmentId,
    a: &crate::cni::prev_result::Attachment,
) -> crate::error::Result<Rendered> {
    let plan = crate::plan::plan(c, id, a, None)?;
    let rules = render(&plan);
    Ok(Rendered { plan, rules })
}

fn families_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<Family> {
    let set: BTreeSet<Family> = rules.map(|r| r.family).collect();
    set.into_iter().collect()
}

fn rules_conf(rules: Value) -> NetConf {
    conf(json!({ "portForwarding": { "rules": rules } }))
}

fn mappings_conf(mappings: Value) -> NetConf {
    conf(json!({ "runtimeConfig": { "portMappings": mappings } }))
}

fn id_of(container: &str, ifname: &str) -> AttachmentId {
    AttachmentId { network: "dind".into(), container_id: container.into(), ifname: ifname.into() }
}

// ---------------------------------------------------------------- helpers

const BR: &str = "dind-br0";
/// The comment on an attachment's own rules.
pub(super) const TAG: &str = "-m comment --comment bridge-nat:dind:CID:net1";
/// The comment on rules shared by the network.
pub(super) const NET: &str = "-m comment --comment bridge-nat:dind";
/// The comment on the global jumps.
const GLOBAL: &str = "-m comment --comment bridge-nat";

#[track_caller]
pub(super) fn plan_v4(c: &NetConf) -> Rendered {
    plan(c, &id(), &att(c, &["10.20.0.10/24"])).expect("plan")
}

fn r4(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv4, table, chain, spec)
}

fn r6(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv6, table, chain, spec)
}

fn rule_in(family: Family, table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(family, table, chain, spec)
}

fn global_jumps(f: Family) -> Vec<Rule> {
    vec![
        rule_in(f, "nat", "PREROUTING", &format!("-m addrtype --dst-type LOCAL {GLOBAL} -j BRIDGE-NAT-DNAT")),
        rule_in(f, "nat", "OUTPUT", &format!("-m addrtype --dst-type LOCAL {GLOBAL} -j BRIDGE-NAT-DNAT")),
        rule_in(f, "nat", "POSTROUTING", &format!("{GLOBAL} -j BRIDGE-NAT-POSTRT")),
        rule_in(f, "filter", "FORWARD", &format!("{GLOBAL} -j BRIDGE-NAT-FORWARD")),
    ]
}

fn masquerade_v4() -> Rule {
    r4("nat", "BRIDGE-NAT-POSTRT", &format!("-s 10.20.0.0/24 ! -o {BR} {NET} -j MASQUERADE"))
}

/// Everything a v4 attachment on 10.20.0.0/24 gets whatever its forwards.
fn shared_v4() -> BTreeSet<Rule> {
    let mut s: BTreeSet<Rule> = global_jumps(Family::Ipv4).into_iter().collect();
    s.extend([
        r4("filter", "BRIDGE-NAT-FORWARD", &format!("-i {BR} {NET} -j ACCEPT")),
        r4(
            "filter",
            "BRIDGE-NAT-FORWARD",
            &format!("-o {BR} -m conntrack --ctstate RELATED,ESTABLISHED {NET} -j ACCEPT"),
        ),
        r4(
            "nat",
            "BRIDGE-NAT-POSTRT",
            &format!("-s 10.20.0.0/24 -o {BR} -m conntrack --ctstate DNAT {NET} -j MASQUERADE"),
        ),
        r4(
            "nat",
            "BRIDGE-NAT-POSTRT",
            &format!("-s 127.0.0.0/8 -o {BR} -m conntrack --ctstate DNAT {NET} -j MASQUERADE"),
        ),
        masquerade_v4(),
    ]);
    s
}

fn shared_v6() -> BTreeSet<Rule> {
    let mut s: BTreeSet<Rule> = global_jumps(Family::Ipv6).into_iter().collect();
    s.extend([
        r6("filter", "BRIDGE-NAT-FORWARD", &format!("-i {BR} {NET} -j ACCEPT")),
        r6(
            "filter",
            "BRIDGE-NAT-FORWARD",
            &format!("-o {BR} -m conntrack --ctstate RELATED,ESTABLISHED {NET} -j ACCEPT"),
        ),
        r6(
            "nat",
            "BRIDGE-NAT-POSTRT",
            &format!("-s fd00::/64 -o {BR} -m conntrack --ctstate DNAT {NET} -j MASQUERADE"),
        ),
        r6("nat", "BRIDGE-NAT-POSTRT", &format!("-s fd00::/64 ! -o {BR} {NET} -j MASQUERADE")),
    ]);
    s
}

fn dnat_rules(p: &Rendered) -> Vec<&Rule> {
    p.rules.iter().filter(|r| r.chain == CHAIN_DNAT).collect()
}

fn sysctl(path: &str) -> Sysctl {
    Sysctl { path: path.into(), value: "1".into(), required: true }
}

fn hp(port: u16, protocol: Protocol, host_ip: Option<&str>) -> HostPort {
    HostPort { port, protocol, host_ip: host_ip.map(|ip| ip.parse().unwrap()) }
}

// ---------------------------------------------------------------- exact rules

#[test]
fn one_static_tcp_rule() {
    let c = rules_conf(
        json!([{ "name": "web", "hostPort": 30080, "destIP": "10.20.0.10", "destPort": 8080, "protocol": "tcp" }]),
    );
    let p = plan_v4(&c);
    let mut expected = shared_v4();
    expected.extend([
        r4(
            "nat",
            "BRIDGE-NAT-DNAT",
            "-p tcp -m tcp --dport 30080 -m comment --comment bridge-nat:dind:CID:net1 -j DNAT --to-destination 10.20.0.10:8080",
        ),
        r4(
            "filter",
            "BRIDGE-NAT-FORWARD",
            "-d 10.20.0.10/32 -o dind-br0 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT \
             -m comment --comment bridge-nat:dind:CID:net1 -j ACCEPT",
        ),
    ]);
    let got: Vec<String> = p.rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(p.rules, expected, "got:\n{}", got.join("\n"));
    assert_eq!(p.rules.len(), 11);
    assert_eq!(p.bridge, BR);
    assert_eq!(
        p.forwards,
        vec![Forward {
            host: hp(30080, Protocol::Tcp, None),
            pod_ip: "10.20.0.10".parse().unwrap(),
            pod_port: 8080,
            mark: None
        }]
    );
    assert_eq!(p.host_ports, vec![hp(30080, Protocol::Tcp, None)]);
    assert_eq!(
        p.sysctls,
        vec![sysctl("/proc/sys/net/ipv4/conf/dind-br0/route_localnet"), sysctl("/proc/sys/net/ipv4/ip_forward")]
    );
    assert_eq!(families_of(p.rules.iter()), vec![Family::Ipv4]);
    assert_eq!(p.addresses.len(), 1);
    // The chain constants are the names the texts use.
    assert_eq!(
        (CHAIN_DNAT, CHAIN_POSTROUTING, CHAIN_FORWARD),
        ("BRIDGE-NAT-DNAT", "BRIDGE-NAT-POSTRT", "BRIDGE-NAT-FORWARD")
    );
}

#[test]
fn udp_and_sctp_rules() {
    let c = rules_conf(json!([
        { "hostPort": 5353, "destPort": 53, "protocol": "udp" },
        { "hostPort": 3868, "destPort": 3869, "protocol": "sctp" }
    ]));
    let p = plan_v4(&c);
    let mut expected = shared_v4();
    expected.extend([
        r4("nat", CHAIN_DNAT, &format!("-p udp -m udp --dport 5353 {TAG} -j DNAT --to-destination 10.20.0.10:53")),
        r4(
            "filter",
            CHAIN_FORWARD,
            &format!("-d 10.20.0.10/32 -o {BR} -p udp -m udp --dport 53 -m conntrack --ctstate DNAT {TAG} -j ACCEPT"),
        ),
        r4("nat", CHAIN_DNAT, &format!("-p sctp -m sctp --dport 3868 {TAG} -j DNAT --to-destination 10.20.0.10:3869")),
        r4(
            "filter",
            CHAIN_FORWARD,
            &format!(
                "-d 10.20.0.10/32 -o {BR} -p sctp -m sctp --dport 3869 -m conntrack --ctstate DNAT {TAG} -j ACCEPT"
            ),
        ),
    ]);
    assert_eq!(p.rules, expected);
    assert_eq!(p.host_ports, vec![hp(3868, Protocol::Sctp, None), hp(5353, Protocol::Udp, None)]);
}

#[test]
fn port_mapping_with_host_ip() {
    let c = mappings_conf(json!([
        { "hostPort": 8443, "containerPort": 443, "protocol": "tcp", "hostIP": "192.168.1.5" },
        { "hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "0.0.0.0" }
    ]));
    let p = plan_v4(&c);
    let dnat: Vec<&str> = dnat_rules(&p).iter().map(|r| r.spec.as_str()).collect();
    assert_eq!(
        dnat,
        vec![
            format!("-d 192.168.1.5/32 -p tcp -m tcp --dport 8443 {TAG} -j DNAT --to-destination 10.20.0.10:443")
                .as_str(),
            format!("-p tcp -m tcp --dport 8080 {TAG} -j DNAT --to-destination 10.20.0.10:80").as_str(),
        ]
    );
    assert!(dnat_rules(&p).iter().all(|r| r.table == "nat" && r.family == Family::Ipv4));
    // The FORWARD accept is about the pod, not the host address.
    assert!(p.rules.contains(&r4(
        "filter",
        CHAIN_FORWARD,
        &format!("-d 10.20.0.10/32 -o {BR} -p tcp -m tcp --dport 443 -m conntrack --ctstate DNAT {TAG} -j ACCEPT")
    )));
    assert_eq!(p.host_ports, vec![hp(8080, Protocol::Tcp, None), hp(8443, Protocol::Tcp, Some("192.168.1.5"))]);
    assert_eq!(p.rules.len(), shared_v4().len() + 4);
}

#[test]
fn masquerade_false_removes_only_the_outbound_masquerade() {
    let rules = json!([{ "hostPort": 30080, "destPort": 8080 }]);
    let on = plan_v4(&conf(json!({ "portForwarding": { "rules": rules } })));
    let off = plan_v4(&conf(json!({ "masquerade": false, "portForwarding": { "rules": rules } })));
    let removed: Vec<&Rule> = on.rules.difference(&off.rules).collect();
    assert_eq!(removed, vec![&masquerade_v4()]);
    assert!(off.rules.is_subset(&on.rules));
    // The hairpin and localhost masquerades stay.
    assert_eq!(off.rules.iter().filter(|r| r.spec.ends_with("-j MASQUERADE")).count(), 2);
}

#[test]
fn static_rule_for_another_pod_is_not_planned_here() {
    let c = rules_conf(json!([
        { "name": "other", "hostPort": 30080, "destIP": "10.20.0.11", "destPort": 8080 },
        { "name": "mine", "hostPort": 30081, "destIP": "10.20.0.10", "destPort": 8081 }
    ]));
    let p = plan_v4(&c);
    assert_eq!(p.forwards.len(), 1);
    assert_eq!(p.forwards[0].host.port, 30081);
    assert_eq!(p.host_ports, vec![hp(30081, Protocol::Tcp, None)]);
    assert!(!p.rules.iter().any(|r| r.spec.contains("10.20.0.11") || r.spec.contains("30080")));
    // The other pod's own ADD plans it.
    let other = plan(&c, &id_of("OTHER", "net1"), &att(&c, &["10.20.0.11/24"])).unwrap();
    assert_eq!(other.host_ports, vec![hp(30080, Protocol::Tcp, None)]);
    assert!(other.rules.contains(&r4(
        "nat",
        CHAIN_DNAT,
        "-p tcp -m tcp --dport 30080 -m comment --comment bridge-nat:dind:OTHER:net1 -j DNAT --to-destination 10.20.0.11:8080"
    )));
    // With no forward of its own an attachment still gets the shared rules.
    let c = rules_conf(json!([{ "hostPort": 30080, "destIP": "10.20.0.11", "destPort": 8080 }]));
    let p = plan_v4(&c);
    assert_eq!(p.rules, shared_v4());
    assert!(p.forwards.is_empty() && p.host_ports.is_empty());
}

#[test]
fn rule_without_dest_ip_applies_to_the_attachments_own_address() {
    let c = rules_conf(json!([{ "hostPort": 30080, "destPort": 80 }]));
    for addr in ["10.20.0.10", "10.20.0.23"] {
        let p = plan(&c, &id(), &att(&c, &[&format!("{addr}/24")])).unwrap();
        let dnat = dnat_rules(&p);
        assert_eq!(dnat.len(), 1);
        assert!(dnat[0].spec.ends_with(&format!("-j DNAT --to-destination {addr}:80")), "{}", dnat[0].spec);
        assert!(p.rules.iter().any(|r| r.chain == CHAIN_FORWARD && r.spec.starts_with(&format!("-d {addr}/32 "))));
    }
}

#[test]
fn ipv6_attachment() {
    let c = rules_conf(json!([{ "hostPort": 30080, "destPort": 8080 }]));
    let p = plan(&c, &id(), &att(&c, &["fd00::10/64"])).unwrap();
    let mut expected = shared_v6();
    expected.extend([
        r6("nat", CHAIN_DNAT, &format!("-p tcp -m tcp --dport 30080 {TAG} -j DNAT --to-destination [fd00::10]:8080")),
        r6(
            "filter",
            CHAIN_FORWARD,
            &format!("-d fd00::10/128 -o {BR} -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT {TAG} -j ACCEPT"),
        ),
    ]);
    assert_eq!(p.rules, expected);
    assert!(p.rules.iter().all(|r| r.family == Family::Ipv6));
    assert!(!p.rules.iter().any(|r| r.spec.contains("127.0.0.0/8")));
    assert_eq!(p.sysctls, vec![sysctl("/proc/sys/net/ipv6/conf/all/forwarding")]);
    assert_eq!(families_of(p.rules.iter()), vec![Family::Ipv6]);
    // A static rule naming the v6 address works the same.
    let c = rules_conf(json!([{ "hostPort": 30080, "destIP": "fd00::10", "destPort": 8080 }]));
    assert_eq!(plan(&c, &id(), &att(&c, &["fd00::10/64"])).unwrap().rules, expected);
}

#[test]
fn dual_stack_attachment() {
    let c = rules_conf(json!([{ "hostPort": 30080, "destPort": 8080 }]));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"])).unwrap();
    assert_eq!(families_of(p.rules.iter()), vec![Family::Ipv4, Family::Ipv6]);
    assert_eq!(p.forwards.len(), 2);
    assert_eq!(p.host_ports, vec![hp(30080, Protocol::Tcp, None)]);
    let targets: Vec<&str> = dnat_rules(&p).iter().map(|r| r.spec.rsplit(' ').next().unwrap()).collect();
    assert_eq!(targets, vec!["10.20.0.10:8080", "[fd00::10]:8080"]);
    assert_eq!(
        p.sysctls,
        vec![
            sysctl("/proc/sys/net/ipv4/conf/dind-br0/route_localnet"),
            sysctl("/proc/sys/net/ipv4/ip_forward"),
            sysctl("/proc/sys/net/ipv6/conf/all/forwarding"),
        ]
    );
    assert_eq!(p.rules.len(), 11 + 10);
    // Only the v4 side has the localhost rule.
    let localhost: Vec<&Rule> = p.rules.iter().filter(|r| r.spec.contains("127.0.0.0/8")).collect();
    assert_eq!(localhost.len(), 1);
    assert_eq!(localhost[0].family, Family::Ipv4);
}

#[test]
fn bridge_from_config_names_rules_and_sysctl() {
    let c = conf(json!({ "bridge": "br9", "portForwarding": { "rules": [{ "hostPort": 1, "destPort": 2 }] } }));
    let p = plan_v4(&c);
    assert_eq!(p.bridge, "br9");
    assert!(p.sysctls.contains(&sysctl("/proc/sys/net/ipv4/conf/br9/route_localnet")));
    assert!(p.rules.contains(&r4(
        "nat",
        CHAIN_POSTROUTING,
        "-s 10.20.0.0/24 ! -o br9 -m comment --comment bridge-nat:dind -j MASQUERADE"
    )));
    assert!(!p.rules.iter().any(|r| r.spec.contains(BR)));
}

#[test]
fn sysctls_for_ipv4() {
    let p = plan_v4(&conf(json!({})));
    assert_eq!(
        p.sysctls,
        vec![sysctl("/proc/sys/net/ipv4/conf/dind-br0/route_localnet"), sysctl("/proc/sys/net/ipv4/ip_forward")]
    );
    assert!(p.forwards.is_empty());
    assert_eq!(p.rules, shared_v4());
}

#[test]
fn v4_host_ip_mapping_is_not_planned_on_a_v6_address() {
    let mappings = json!([{ "hostPort": 8443, "containerPort": 443, "hostIP": "192.168.1.5" }]);
    let c = mappings_conf(mappings);
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"])).unwrap();
    assert_eq!(p.forwards.len(), 1);
    assert_eq!(p.forwards[0].pod_ip, "10.20.0.10".parse::<IpAddr>().unwrap());
    assert!(dnat_rules(&p).iter().all(|r| r.family == Family::Ipv4));
    assert!(!p.rules.iter().any(|r| r.family == Family::Ipv6 && r.spec.contains("443")));
    // v6-only: nothing forwarded at all.
    let p = plan(&c, &id(), &att(&c, &["fd00::10/64"])).unwrap();
    assert!(p.forwards.is_empty());
    assert!(p.host_ports.is_empty());
    assert_eq!(p.rules, shared_v6());
    // And a v6 hostIP is planned only on the v6 address, with /128.
    let c = mappings_conf(json!([{ "hostPort": 8443, "containerPort": 443, "hostIP": "fd00:1::5" }]));
    let p = plan(&c, &id(), &att(&c, &["10.20.0.10/24", "fd00::10/64"])).unwrap();
    let dnat = dnat_rules(&p);
    assert_eq!(dnat.len(), 1);
    assert_eq!(
        dnat[0],
        &r6(
            "nat",
            CHAIN_DNAT,
            &format!("-d fd00:1::5/128 -p tcp -m tcp --dport 8443 {TAG} -j DNAT --to-destination [fd00::10]:443")
        )
    );
}

#[test]
fn interface_names_are_made_comment_safe() {
    let c = rules_conf(json!([{ "hostPort": 1, "destPort": 2 }]));
    let p = plan(&c, &id_of("CID", "net@1"), &att(&c, &["10.20.0.10/24"])).unwrap();
    assert!(dnat_rules(&p)[0].spec.contains("--comment bridge-nat:dind:CID:net_1 "), "{}", dnat_rules(&p)[0].spec);
}
