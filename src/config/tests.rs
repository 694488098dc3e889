//! decode() + validate(): the example from ../shared/config.md, every rejection, and properties.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::HashSet;

// ---------------------------------------------------------------- helpers

fn load(v: &Value) -> Result<NetConf> {
    decode(&serde_json::to_vec(v).expect("serialize"))?.validate()
}

#[track_caller]
fn ok(v: &Value) -> NetConf {
    load(v).unwrap_or_else(|e| panic!("config should validate, got code {}: {}", e.code, e.msg))
}

/// Asserts the rejection's code and that its message holds every needle (field path and value).
#[track_caller]
fn rejected(v: &Value, code: u32, needles: &[&str]) -> Error {
    let e = match load(v) {
        Ok(c) => panic!("config should be rejected with code {code} ({needles:?}), got {c:?}"),
        Err(e) => e,
    };
    assert_eq!(e.code, code, "wrong code for {:?}", e.msg);
    for n in needles {
        assert!(e.msg.contains(n), "message {:?} does not name {:?}", e.msg, n);
    }
    e
}

/// The `bridge-nat` entry of the example conflist in config.md, with name and cniVersion added.
fn example() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "dind",
        "type": "bridge-nat",
        "capabilities": { "portMappings": true },
        "routing": {
            "enabled": true, "tableId": 100, "tableName": "dind_net1", "fwmark": "0x64", "rulePriority": 100,
            "outbound": { "interface": "eth5", "gateway": "", "useDefaultRoute": false }
        },
        "portForwarding": { "rules": [
            { "name": "docker-tls", "hostPort": 2376, "destIP": "10.20.0.10", "destPort": 2376, "protocol": "tcp" },
            { "name": "web-app", "hostPort": 30080, "destIP": "10.20.0.10", "destPort": 8080, "protocol": "tcp",
              "routing": { "fwmark": "0x65", "tableId": 101, "tableName": "dind_eth0",
                           "outbound": { "interface": "eth0", "gateway": "", "useDefaultRoute": false } } }
        ] }
    })
}

fn minimal() -> Value {
    json!({ "cniVersion": "1.0.0", "name": "dind", "type": "bridge-nat" })
}

/// Set the value at a JSON pointer, creating the last key (or appending at index len).
fn set(v: &mut Value, ptr: &str, new: Value) {
    let (parent, key) = ptr.rsplit_once('/').expect("pointer starts with /");
    let p = if parent.is_empty() { v } else { v.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent}")) };
    match p {
        Value::Object(m) => {
            m.insert(key.to_string(), new);
        }
        Value::Array(a) => {
            let i: usize = key.parse().expect("array index");
            if i == a.len() {
                a.push(new);
            } else {
                a[i] = new;
            }
        }
        other => panic!("{parent} is {other}, not a container"),
    }
}

fn remove(v: &mut Value, ptr: &str) {
    let (parent, key) = ptr.rsplit_once('/').expect("pointer starts with /");
    let p = if parent.is_empty() { v } else { v.pointer_mut(parent).expect("parent") };
    p.as_object_mut().expect("object").remove(key);
}

/// The example with one value replaced.
fn example_with(ptr: &str, new: Value) -> Value {
    let mut v = example();
    set(&mut v, ptr, new);
    v
}

fn with_mappings(base: Value, mappings: Value) -> Value {
    let mut v = base;
    set(&mut v, "/runtimeConfig", json!({ "portMappings": mappings }));
    v
}

fn rule(host: i64, dest: i64, proto: &str) -> Value {
    json!({ "name": format!("r{host}"), "hostPort": host, "destPort": dest, "protocol": proto })
}

fn rule_routing(mark: &str, table: i64, name: Option<&str>, ifname: &str) -> Value {
    let mut r = json!({ "fwmark": mark, "tableId": table, "outbound": { "interface": ifname } });
    if let Some(n) = name {
        r["tableName"] = json!(n);
    }
    r
}

// ---------------------------------------------------------------- accepted configs

#[test]
fn example_from_config_md_parses_to_expected_values() {
    let c = ok(&example());
    assert_eq!(c.cni_version, "1.0.0");
    assert_eq!(c.name, "dind");
    assert_eq!(c.bridge, None);
    assert!(c.masquerade, "masquerade defaults to true");
    assert_eq!(
        c.routing,
        Some(GlobalRouting {
            fallback: Vec::new(),
            health: crate::config::HealthConfig::default(),
            table_id: 100,
            table_name: Some("dind_net1".into()),
            fwmark: Some(0x64),
            rule_priority: 100,
            outbound: Outbound { interface: "eth5".into(), gateway: None, gateway6: None, use_default_route: false },
        })
    );
    let ip: IpAddr = "10.20.0.10".parse().unwrap();
    assert_eq!(
        c.rules,
        vec![
            PortRule {
                name: "docker-tls".into(),
                host_port: 2376,
                dest_ip: Some(ip),
                pod: None,
                dest_port: 2376,
                protocol: Protocol::Tcp,
                routing: None,
            },
            PortRule {
                name: "web-app".into(),
                host_port: 30080,
                dest_ip: Some(ip),
                pod: None,
                dest_port: 8080,
                protocol: Protocol::Tcp,
                routing: Some(RouteSpec {
                    fwmark: 0x65,
                    table_id: 101,
                    table_name: Some("dind_eth0".into()),
                    outbound: Outbound {
                        interface: "eth0".into(),
                        gateway: None,
                        gateway6: None,
                        use_default_route: false,
                    },
                }),
            },
        ]
    );
    assert!(c.port_mappings.is_empty());
    assert_eq!(c.settings, Settings::default());
    assert!(c.prev_result.is_none());
    assert!(c.valid_attachments.is_none());
}

#[test]
fn minimal_config_takes_the_defaults() {
    let c = ok(&minimal());
    assert!(c.masquerade);
    assert!(c.routing.is_none());
    assert!(c.rules.is_empty());
    assert!(c.port_mappings.is_empty());
    let s = &c.settings;
    assert_eq!(s.log_file, PathBuf::from(DEFAULT_LOG_FILE));
    assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(s.lock_timeout, Duration::from_millis(DEFAULT_LOCK_TIMEOUT_MS));
    assert_eq!(s.log_level, log::LevelFilter::Info);
    assert_eq!(s.iptables, "iptables");
    assert_eq!(s.mark_mask, DEFAULT_MARK_MASK);
}

#[test]
fn backend_is_auto_unless_one_is_named() {
    assert_eq!(ok(&minimal()).settings.backend, BackendChoice::Auto);
    for (given, want) in [
        ("", BackendChoice::Auto),
        ("auto", BackendChoice::Auto),
        ("iptables", BackendChoice::Only(Backend::Iptables)),
        ("nftables", BackendChoice::Only(Backend::Nftables)),
    ] {
        assert_eq!(ok(&example_with("/backend", json!(given))).settings.backend, want, "{given:?}");
    }
    rejected(&example_with("/backend", json!("nft")), 7, &["backend", "\"nft\"", "auto, iptables or nftables"]);
}

#[test]
fn rule_priority_defaults_to_100() {
    let mut v = example();
    remove(&mut v, "/routing/rulePriority");
    assert_eq!(ok(&v).routing.unwrap().rule_priority, DEFAULT_RULE_PRIORITY);
    assert_eq!(DEFAULT_RULE_PRIORITY, 100);
    let c = ok(&example_with("/routing/rulePriority", json!(32755)));
    assert_eq!(c.routing.unwrap().rule_priority, 32755);
}

#[test]
fn routing_enabled_false_means_no_global_routing() {
    let c = ok(&example_with("/routing/enabled", json!(false)));
    assert!(c.routing.is_none());
    // A disabled block is not validated either.
    let mut v = example_with("/routing/enabled", json!(false));
    set(&mut v, "/routing/tableId", json!(0));
    assert!(ok(&v).routing.is_none());
}

#[test]
fn routing_block_without_enabled_is_on() {
    let mut v = example();
    remove(&mut v, "/routing/enabled");
    assert_eq!(ok(&v).routing.unwrap().table_id, 100);
}

#[test]
fn empty_gateway_is_none_and_an_address_is_kept() {
    assert_eq!(ok(&example()).routing.unwrap().outbound.gateway, None);
    let c = ok(&example_with("/routing/outbound/gateway", json!("192.168.5.1")));
    assert_eq!(c.routing.unwrap().outbound.gateway, Some("192.168.5.1".parse().unwrap()));
    // IPv6 in `gateway` (accepted, and unusable, before gateway6 existed) is IPv6's next hop.
    let c = ok(&example_with("/portForwarding/rules/1/routing/outbound/gateway", json!("fe80::1")));
    let o = &c.rules[1].routing.as_ref().unwrap().outbound;
    assert_eq!((o.gateway, o.gateway6), (None, Some("fe80::1".parse().unwrap())));
    let c = ok(&example_with("/routing/outbound/gateway6", json!("fe80::1")));
    assert_eq!(c.routing.unwrap().outbound.gateway6, Some("fe80::1".parse().unwrap()));
}

#[test]
fn use_default_route_is_read() {
    let c = ok(&example_with("/routing/outbound/useDefaultRoute", json!(true)));
    assert!(c.routing.unwrap().outbound.use_default_route);
}

#[test]
fn fwmark_as_number_decimal_string_and_hex_string() {
    for mark in [json!(100), json!("100"), json!("0x64"), json!("0X64"), json!(" 0x64 ")] {
        let c = ok(&example_with("/routing/fwmark", mark.clone()));
        assert_eq!(c.routing.unwrap().fwmark, Some(0x64), "fwmark {mark}");
    }
    let c = ok(&example_with("/portForwarding/rules/1/routing/fwmark", json!(101)));
    assert_eq!(c.rules[1].routing.as_ref().unwrap().fwmark, 0x65);
}

#[test]
fn global_fwmark_is_optional() {
    let mut v = example();
    remove(&mut v, "/routing/fwmark");
    assert_eq!(ok(&v).routing.unwrap().fwmark, None);
}

#[test]
fn table_name_is_optional_and_empty_means_none() {
    let mut v = example();
    remove(&mut v, "/routing/tableName");
    assert_eq!(ok(&v).routing.unwrap().table_name, None);
    let c = ok(&example_with("/routing/tableName", json!("")));
    assert_eq!(c.routing.unwrap().table_name, None);
}

#[test]
fn mark_mask_widens_and_narrows_the_allowed_marks() {
    let mut v = example_with("/markMask", json!("0xff00"));
    set(&mut v, "/routing/fwmark", json!("0x100"));
    set(&mut v, "/portForwarding/rules/1/routing/fwmark", json!("0x4000"));
    let c = ok(&v);
    assert_eq!(c.settings.mark_mask, 0xff00);
    assert_eq!(c.routing.unwrap().fwmark, Some(0x100));
    assert_eq!(c.rules[1].routing.as_ref().unwrap().fwmark, 0x4000);
    // 0x64 is outside 0xff00.
    rejected(&example_with("/markMask", json!("0xff00")), 7, &["routing.fwmark", "0x64", "markMask", "0xff00"]);
    assert_eq!(ok(&example_with("/markMask", json!(255))).settings.mark_mask, 0xff);
}

#[test]
fn protocol_defaults_to_tcp_and_ignores_case() {
    let mut v = minimal();
    set(
        &mut v,
        "/portForwarding",
        json!({ "rules": [
            { "hostPort": 1, "destPort": 1 },
            { "hostPort": 2, "destPort": 2, "protocol": "UDP" },
            { "hostPort": 3, "destPort": 3, "protocol": "Sctp" },
            { "hostPort": 4, "destPort": 4, "protocol": "" }
        ] }),
    );
    let protos: Vec<Protocol> = ok(&v).rules.iter().map(|r| r.protocol).collect();
    assert_eq!(protos, vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Tcp]);
}

#[test]
fn rule_without_dest_ip_has_none() {
    let mut v = example();
    remove(&mut v, "/portForwarding/rules/0/destIP");
    assert_eq!(ok(&v).rules[0].dest_ip, None);
    assert_eq!(ok(&example_with("/portForwarding/rules/0/destIP", json!(""))).rules[0].dest_ip, None);
}

#[test]
fn rule_pod_is_namespace_and_name_with_an_optional_prefix_glob() {
    let pod = |s: &str| ok(&example_with("/portForwarding/rules/0/pod", json!(s))).rules[0].pod.clone().unwrap();
    let p = pod("default/web-*");
    assert_eq!((p.namespace.as_str(), p.name.as_str(), p.prefix), ("default", "web-", true));
    assert_eq!(p.to_string(), "default/web-*");
    let exact = pod("kube-system/dns.a-1");
    assert!(!exact.prefix);
    assert!(pod("ns/*").matches(&crate::cni::Pod { namespace: "ns".into(), name: "anything".into() }));
    assert!(p.matches(&crate::cni::Pod { namespace: "default".into(), name: "web-7d9f".into() }));
    assert!(!p.matches(&crate::cni::Pod { namespace: "other".into(), name: "web-7d9f".into() }));
    assert!(!exact.matches(&crate::cni::Pod { namespace: "kube-system".into(), name: "dns.a-12".into() }));
    assert_eq!(ok(&example()).rules[0].pod, None);
}

#[test]
fn rule_pod_is_rejected_naming_the_field_and_value() {
    for bad in
        ["web", "/web", "default/", "Default/web", "default/web*x", "default/*web", "default/a/b", "ns/Web", "ns/-a"]
    {
        rejected(
            &example_with("/portForwarding/rules/1/pod", json!(bad)),
            code::INVALID_CONFIG,
            &["portForwarding.rules[1]", "pod: ", &format!("{bad:?}")],
        );
    }
    rejected(&example_with("/portForwarding/rules/0/pod", json!(7)), code::DECODE, &["portForwarding.rules[0].pod"]);
}

#[test]
fn port_mappings_are_read_and_wildcard_host_ips_dropped() {
    let v = with_mappings(
        minimal(),
        json!([
            { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" },
            { "hostPort": 8443, "containerPort": 443, "protocol": "tcp", "hostIP": "192.168.1.5" },
            { "hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "0.0.0.0" },
            { "hostPort": 5354, "containerPort": 53, "protocol": "udp", "hostIP": "::" },
            { "hostPort": 9000, "containerPort": 9000, "hostIP": "" }
        ]),
    );
    let m = ok(&v).port_mappings;
    assert_eq!(m[0], PortMapping { host_port: 8080, container_port: 80, protocol: Protocol::Tcp, host_ip: None });
    assert_eq!(m[1].host_ip, Some("192.168.1.5".parse().unwrap()));
    assert_eq!(m[2].host_ip, None);
    assert_eq!(m[2].protocol, Protocol::Udp);
    assert_eq!(m[3].host_ip, None);
    assert_eq!(m[4].protocol, Protocol::Tcp);
    assert_eq!(m[4].host_ip, None);
}

#[test]
fn unknown_extra_fields_are_ignored() {
    let mut v = example();
    set(&mut v, "/somethingNew", json!({ "deep": [1, 2, 3] }));
    set(&mut v, "/ipam", json!({ "type": "host-local" }));
    set(&mut v, "/routing/futureKnob", json!(true));
    set(&mut v, "/routing/outbound/metric", json!(5));
    set(&mut v, "/portForwarding/rules/0/comment", json!("hello"));
    set(&mut v, "/portForwarding/rules/1/routing/weight", json!(3));
    set(&mut v, "/portForwarding/extra", json!(null));
    set(&mut v, "/runtimeConfig", json!({ "bandwidth": { "ingressRate": 1 }, "portMappings": [] }));
    set(&mut v, "/args", json!({ "cni": { "labels": [] } }));
    let c = ok(&v);
    assert_eq!(c.rules.len(), 2);
    assert_eq!(c.routing.unwrap().table_id, 100);
}

#[test]
fn valid_attachments_carry_the_network_name() {
    let mut v = minimal();
    set(&mut v, "/cniVersion", json!("1.1.0"));
    v.as_object_mut().unwrap().insert(
        "cni.dev/valid-attachments".into(),
        json!([
            { "containerID": "c1", "ifname": "net1" },
            { "containerID": "c2", "ifname": "eth0", "extra": 1 }
        ]),
    );
    let c = ok(&v);
    assert_eq!(
        c.valid_attachments,
        Some(vec![
            AttachmentId { network: "dind".into(), container_id: "c1".into(), ifname: "net1".into() },
            AttachmentId { network: "dind".into(), container_id: "c2".into(), ifname: "eth0".into() },
        ])
    );
    let mut v = minimal();
    v.as_object_mut().unwrap().insert("cni.dev/valid-attachments".into(), json!([]));
    assert_eq!(ok(&v).valid_attachments, Some(vec![]));
}

#[test]
fn prev_result_and_bridge_are_kept() {
    let mut v = minimal();
    set(&mut v, "/prevResult", json!({ "cniVersion": "1.0.0", "ips": [] }));
    set(&mut v, "/bridge", json!("dind-br0"));
    let c = ok(&v);
    assert_eq!(c.prev_result, Some(json!({ "cniVersion": "1.0.0", "ips": [] })));
    assert_eq!(c.bridge.as_deref(), Some("dind-br0"));
}

#[test]
fn settings_are_read() {
    let mut v = minimal();
    set(&mut v, "/logFile", json!("/tmp/bn.log"));
    set(&mut v, "/logLevel", json!("debug"));
    set(&mut v, "/stateDir", json!("/run/bn"));
    set(&mut v, "/lockTimeoutMs", json!(300_000));
    set(&mut v, "/iptables", json!("/usr/sbin/iptables-legacy"));
    let s = ok(&v).settings;
    assert_eq!(s.log_file, PathBuf::from("/tmp/bn.log"));
    assert_eq!(s.log_level, log::LevelFilter::Debug);
    assert_eq!(s.state_dir, PathBuf::from("/run/bn"));
    assert_eq!(s.lock_timeout, Duration::from_millis(300_000));
    assert_eq!(s.iptables, "/usr/sbin/iptables-legacy");
    for ipt in ["iptables", "iptables-nft", "iptables-legacy", "/sbin/iptables-nft"] {
        assert_eq!(ok(&example_with("/iptables", json!(ipt))).settings.iptables, ipt);
    }
    // Empty strings mean "default".
    let mut v = minimal();
    for f in ["/logFile", "/logLevel", "/stateDir", "/iptables"] {
        set(&mut v, f, json!(""));
    }
    assert_eq!(ok(&v).settings, Settings::default());
}

#[test]
fn draft_exposes_version_name_and_settings_before_validation() {
    let mut v = example_with("/routing/tableId", json!(0));
    set(&mut v, "/stateDir", json!("/run/bn"));
    let d = decode(&serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(d.cni_version(), "1.0.0");
    assert_eq!(d.network_name(), "dind");
    assert_eq!(d.settings().unwrap().state_dir, PathBuf::from("/run/bn"));
    assert_eq!(d.validate().unwrap_err().code, code::INVALID_CONFIG);
}

#[test]
fn for_cleanup_checks_the_name() {
    assert!(NetConf::for_cleanup("dind".into(), Settings::default()).is_ok());
    assert_eq!(NetConf::for_cleanup("a/b".into(), Settings::default()).unwrap_err().code, 7);
}

#[test]
fn same_port_with_different_protocols_is_allowed() {
    let mut v = minimal();
    set(
        &mut v,
        "/portForwarding",
        json!({ "rules": [rule(53, 53, "tcp"), rule(53, 53, "udp"), rule(53, 53, "sctp")] }),
    );
    let v = with_mappings(
        v,
        json!([{ "hostPort": 80, "containerPort": 80, "protocol": "tcp" },
                                     { "hostPort": 80, "containerPort": 80, "protocol": "udp" }]),
    );
    let c = ok(&v);
    assert_eq!(c.rules.len(), 3);
    assert_eq!(c.port_mappings.len(), 2);
}

#[test]
fn mappings_on_different_host_ips_share_a_port() {
    let v = with_mappings(
        minimal(),
        json!([
            { "hostPort": 8080, "containerPort": 80, "hostIP": "192.168.1.5" },
            { "hostPort": 8080, "containerPort": 80, "hostIP": "192.168.1.6" },
            { "hostPort": 8080, "containerPort": 80, "hostIP": "fd00::5" }
        ]),
    );
    assert_eq!(ok(&v).port_mappings.len(), 3);
}

// ---------------------------------------------------------------- rejections: code 7

#[test]
fn host_port_out_of_range() {
    for (port, s) in [(0, "hostPort: 0 "), (65536, "hostPort: 65536 "), (-1, "hostPort: -1 ")] {
        rejected(
            &example_with("/portForwarding/rules/0/hostPort", json!(port)),
            7,
            &["portForwarding.rules[0]", s, "1-65535"],
        );
    }
    let v = with_mappings(minimal(), json!([{ "hostPort": 0, "containerPort": 80 }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "hostPort: 0 "]);
    let v = with_mappings(minimal(), json!([{ "hostPort": 65536, "containerPort": 80 }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "hostPort: 65536 "]);
}

#[test]
fn dest_port_out_of_range() {
    rejected(
        &example_with("/portForwarding/rules/1/destPort", json!(0)),
        7,
        &["portForwarding.rules[1]", "destPort: 0 "],
    );
    rejected(
        &example_with("/portForwarding/rules/1/destPort", json!(70000)),
        7,
        &["portForwarding.rules[1]", "destPort: 70000 "],
    );
}

#[test]
fn container_port_out_of_range() {
    for port in [0, 65536] {
        let v = with_mappings(
            minimal(),
            json!([{ "hostPort": 80, "containerPort": 80 }, { "hostPort": 81, "containerPort": port }]),
        );
        rejected(&v, 7, &["runtimeConfig.portMappings[1]", &format!("containerPort: {port} ")]);
    }
}

#[test]
fn unknown_protocol() {
    rejected(
        &example_with("/portForwarding/rules/0/protocol", json!("icmp")),
        7,
        &["portForwarding.rules[0]", "protocol", "\"icmp\""],
    );
    let v = with_mappings(minimal(), json!([{ "hostPort": 80, "containerPort": 80, "protocol": "icmp" }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "protocol", "\"icmp\""]);
}

#[test]
fn fwmark_zero() {
    rejected(&example_with("/routing/fwmark", json!(0)), 7, &["routing.fwmark", "0"]);
    rejected(&example_with("/routing/fwmark", json!("0x0")), 7, &["routing.fwmark", "must not be 0"]);
    rejected(
        &example_with("/portForwarding/rules/1/routing/fwmark", json!("0")),
        7,
        &["portForwarding.rules[1]", "routing.fwmark", "must not be 0"],
    );
}

#[test]
fn fwmark_unparsable() {
    for bad in ["0xzz", "", "0x", "ten", "0x100000000", "4294967296"] {
        rejected(&example_with("/routing/fwmark", json!(bad)), 7, &["routing.fwmark", &format!("{bad:?}")]);
    }
    rejected(&example_with("/routing/fwmark", json!(-1)), 7, &["routing.fwmark", "-1"]);
    rejected(&example_with("/routing/fwmark", json!(4_294_967_296i64)), 7, &["routing.fwmark", "4294967296"]);
    rejected(
        &example_with("/portForwarding/rules/1/routing/fwmark", json!("0xzz")),
        7,
        &["portForwarding.rules[1]", "routing.fwmark", "0xzz"],
    );
}

#[test]
fn fwmark_outside_mark_mask() {
    rejected(&example_with("/routing/fwmark", json!("0x4000")), 7, &["routing.fwmark", "0x4000", "markMask", "0x1fff"]);
    // portmap's 0x2000 is outside the default mask too.
    rejected(
        &example_with("/portForwarding/rules/1/routing/fwmark", json!(0x2000)),
        7,
        &["portForwarding.rules[1]", "routing.fwmark", "0x2000", "0x1fff"],
    );
    rejected(&example_with("/routing/fwmark", json!("0x10000")), 7, &["routing.fwmark", "0x10000"]);
}

#[test]
fn fwmark_required_in_rule_routing() {
    let mut v = example();
    remove(&mut v, "/portForwarding/rules/1/routing/fwmark");
    rejected(&v, 7, &["portForwarding.rules[1]", "routing.fwmark", "required"]);
}

#[test]
fn mark_mask_zero_or_unparsable() {
    rejected(&example_with("/markMask", json!(0)), 7, &["markMask", "0"]);
    rejected(&example_with("/markMask", json!("0x0")), 7, &["markMask", "must not be 0"]);
    rejected(&example_with("/markMask", json!("0xqq")), 7, &["markMask", "0xqq"]);
    rejected(&example_with("/markMask", json!(-5)), 7, &["markMask", "-5"]);
}

#[test]
fn table_id_out_of_range_or_missing() {
    for id in [0, 253, 255, -1, 1000] {
        rejected(&example_with("/routing/tableId", json!(id)), 7, &["routing.tableId", &format!("{id} "), "1-252"]);
        rejected(
            &example_with("/portForwarding/rules/1/routing/tableId", json!(id)),
            7,
            &["portForwarding.rules[1]", "routing.tableId", &format!("{id} ")],
        );
    }
    let mut v = example();
    remove(&mut v, "/routing/tableId");
    rejected(&v, 7, &["routing.tableId", "required"]);
    let mut v = example();
    remove(&mut v, "/portForwarding/rules/1/routing/tableId");
    rejected(&v, 7, &["portForwarding.rules[1]", "routing.tableId", "required"]);
    // The edges are allowed.
    ok(&example_with("/routing/tableId", json!(1)));
    ok(&example_with("/routing/tableId", json!(252)));
}

#[test]
fn duplicate_table_id_global_vs_rule() {
    rejected(
        &example_with("/portForwarding/rules/1/routing/tableId", json!(100)),
        7,
        &["portForwarding.rules[1].routing.tableId", "100", "already used by routing"],
    );
}

#[test]
fn duplicate_table_id_rule_vs_rule() {
    let mut v = example();
    set(&mut v, "/portForwarding/rules/2", rule(30081, 80, "tcp"));
    set(&mut v, "/portForwarding/rules/2/routing", rule_routing("0x66", 101, None, "eth1"));
    rejected(&v, 7, &["portForwarding.rules[2].routing.tableId", "101", "portForwarding.rules[1].routing"]);
}

#[test]
fn duplicate_marks() {
    // Rule vs global.
    rejected(
        &example_with("/portForwarding/rules/1/routing/fwmark", json!(100)),
        7,
        &["portForwarding.rules[1].routing.fwmark", "0x64", "already used by routing"],
    );
    // Rule vs rule, written differently.
    let mut v = example();
    set(&mut v, "/portForwarding/rules/2", rule(30081, 80, "tcp"));
    set(&mut v, "/portForwarding/rules/2/routing", rule_routing("101", 102, None, "eth1"));
    rejected(&v, 7, &["portForwarding.rules[2].routing.fwmark", "0x65", "portForwarding.rules[1].routing"]);
}

#[test]
fn reserved_or_malformed_table_names() {
    for name in ["main", "local", "default", "unspec", "1abc", "has space", "_x", "a/b", "tab\tle"] {
        rejected(&example_with("/routing/tableName", json!(name)), 7, &["routing.tableName", &format!("{name:?}")]);
    }
    rejected(
        &example_with("/portForwarding/rules/1/routing/tableName", json!("main")),
        7,
        &["portForwarding.rules[1]", "routing.tableName", "\"main\""],
    );
    let long = "a".repeat(65);
    rejected(&example_with("/routing/tableName", json!(long)), 7, &["routing.tableName", &long]);
    ok(&example_with("/routing/tableName", json!("a".repeat(64))));
    ok(&example_with("/routing/tableName", json!("Dind-net.1_x")));
}

#[test]
fn one_table_name_for_two_ids() {
    rejected(
        &example_with("/portForwarding/rules/1/routing/tableName", json!("dind_net1")),
        7,
        &["portForwarding.rules[1].routing.tableName", "\"dind_net1\"", "already names table 100"],
    );
    let mut v = example();
    set(&mut v, "/portForwarding/rules/2", rule(30081, 80, "tcp"));
    set(&mut v, "/portForwarding/rules/2/routing", rule_routing("0x66", 102, Some("dind_eth0"), "eth1"));
    rejected(&v, 7, &["portForwarding.rules[2].routing.tableName", "\"dind_eth0\"", "101"]);
}

#[test]
fn bad_outbound_interface() {
    let sixteen = "abcdefghijklmnop";
    assert_eq!(sixteen.len(), 16);
    for name in ["", sixteen, "a/b", "a b", "a:b", ".."] {
        rejected(
            &example_with("/routing/outbound/interface", json!(name)),
            7,
            &["routing.outbound.interface", &format!("{name:?}")],
        );
    }
    rejected(
        &example_with("/portForwarding/rules/1/routing/outbound/interface", json!("a/b")),
        7,
        &["portForwarding.rules[1]", "routing.outbound.interface", "\"a/b\""],
    );
    ok(&example_with("/routing/outbound/interface", json!("abcdefghijklmno")));
}

#[test]
fn missing_outbound() {
    let mut v = example();
    remove(&mut v, "/routing/outbound");
    rejected(&v, 7, &["routing.outbound", "required"]);
    let mut v = example();
    remove(&mut v, "/portForwarding/rules/1/routing/outbound");
    rejected(&v, 7, &["portForwarding.rules[1]", "routing.outbound", "required"]);
}

#[test]
fn gateway6_must_be_ipv6_and_not_given_twice() {
    rejected(
        &example_with("/routing/outbound/gateway6", json!("192.168.5.1")),
        7,
        &["routing.outbound.gateway6", "192.168.5.1", "not an IPv6 address"],
    );
    let mut both = example_with("/routing/outbound/gateway6", json!("fe80::1"));
    both["routing"]["outbound"]["gateway"] = json!("fe80::2");
    rejected(&both, 7, &["routing.outbound.gateway", "fe80::2", "gateway6 is given too"]);
    rejected(
        &example_with("/portForwarding/rules/1/routing/outbound/gateway6", json!("fe80::zz")),
        7,
        &["portForwarding.rules[1]", "routing.outbound.gateway6", "fe80::zz"],
    );
}

#[test]
fn bad_gateway() {
    rejected(
        &example_with("/routing/outbound/gateway", json!("not-an-ip")),
        7,
        &["routing.outbound.gateway", "\"not-an-ip\""],
    );
    rejected(
        &example_with("/portForwarding/rules/1/routing/outbound/gateway", json!("10.0.0.300")),
        7,
        &["portForwarding.rules[1]", "routing.outbound.gateway", "10.0.0.300"],
    );
}

#[test]
fn bad_dest_ip() {
    rejected(
        &example_with("/portForwarding/rules/0/destIP", json!("x")),
        7,
        &["portForwarding.rules[0]", "destIP", "\"x\""],
    );
    rejected(
        &example_with("/portForwarding/rules/1/destIP", json!("10.20.0.10/24")),
        7,
        &["portForwarding.rules[1]", "destIP", "10.20.0.10/24"],
    );
}

#[test]
fn bad_host_ip() {
    let v = with_mappings(minimal(), json!([{ "hostPort": 80, "containerPort": 80, "hostIP": "localhost" }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "hostIP", "\"localhost\""]);
}

#[test]
fn rule_priority_out_of_range() {
    for p in [0, 40000, -3, 32756] {
        rejected(&example_with("/routing/rulePriority", json!(p)), 7, &["routing.rulePriority", &format!("{p} ")]);
    }
}

#[test]
fn duplicate_host_port_among_rules() {
    let mut v = example_with("/portForwarding/rules/1/hostPort", json!(2376));
    rejected(&v, 7, &["portForwarding.rules[1]", "2376/tcp", "portForwarding.rules[0]", "docker-tls"]);
    // Case-insensitive protocol and the tcp default are the same protocol.
    set(&mut v, "/portForwarding/rules/1/protocol", json!("TCP"));
    rejected(&v, 7, &["2376/tcp"]);
    set(&mut v, "/portForwarding/rules/1/protocol", json!(""));
    rejected(&v, 7, &["2376/tcp"]);
}

#[test]
fn rule_vs_runtime_port_mapping() {
    let v = with_mappings(example(), json!([{ "hostPort": 30080, "containerPort": 80, "protocol": "tcp" }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "30080/tcp", "portForwarding.rules[1]", "web-app"]);
    // A static rule holds every address, so a specific hostIP still clashes with it.
    let v = with_mappings(example(), json!([{ "hostPort": 2376, "containerPort": 80, "hostIP": "192.168.1.5" }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "2376/tcp", "portForwarding.rules[0]"]);
}

#[test]
fn two_runtime_mappings_on_one_port() {
    let v = with_mappings(
        minimal(),
        json!([{ "hostPort": 8080, "containerPort": 80 }, { "hostPort": 8080, "containerPort": 81 }]),
    );
    rejected(&v, 7, &["runtimeConfig.portMappings[1]", "8080/tcp", "runtimeConfig.portMappings[0]"]);
}

#[test]
fn host_ip_vs_wildcard_conflicts() {
    for (a, b) in [
        (json!("192.168.1.5"), json!("")),
        (json!(""), json!("192.168.1.5")),
        (json!("0.0.0.0"), json!("192.168.1.5")),
        (json!("192.168.1.5"), json!("::")),
        (json!("192.168.1.5"), json!("192.168.1.5")),
    ] {
        let v = with_mappings(
            minimal(),
            json!([{ "hostPort": 8080, "containerPort": 80, "hostIP": a },
                   { "hostPort": 8080, "containerPort": 80, "hostIP": b }]),
        );
        rejected(&v, 7, &["runtimeConfig.portMappings[1]", "8080/tcp", "runtimeConfig.portMappings[0]"]);
    }
}

#[test]
fn network_name_with_shell_metacharacters() {
    for name in ["a;b", "$(x)", "", "-a", ".hidden", "a b", "a/b", "../x", "a`b`"] {
        let v = {
            let mut v = example();
            set(&mut v, "/name", json!(name));
            v
        };
        rejected(&v, 7, &["name", &format!("{name:?}")]);
    }
    for name in ["dind", "Dind_2.net-x", "0net"] {
        let mut v = example();
        set(&mut v, "/name", json!(name));
        assert_eq!(ok(&v).name, name);
    }
}

#[test]
fn missing_network_name() {
    let mut v = example();
    remove(&mut v, "/name");
    rejected(&v, 7, &["name", "\"\""]);
}

#[test]
fn bad_bridge_name() {
    let mut v = minimal();
    set(&mut v, "/bridge", json!("br/0"));
    rejected(&v, 7, &["bridge", "\"br/0\""]);
}

#[test]
fn relative_paths() {
    rejected(&example_with("/stateDir", json!("var/lib/x")), 7, &["stateDir", "\"var/lib/x\"", "absolute"]);
    rejected(&example_with("/stateDir", json!("./state")), 7, &["stateDir", "\"./state\""]);
    rejected(&example_with("/logFile", json!("bn.log")), 7, &["logFile", "\"bn.log\""]);
}

#[test]
fn unknown_log_level() {
    rejected(&example_with("/logLevel", json!("loud")), 7, &["logLevel", "\"loud\""]);
}

#[test]
fn iptables_variants() {
    for ipt in ["nft", "../iptables", "bin/iptables", "iptables-foo", "/usr/sbin/nft", "ip6tables"] {
        rejected(&example_with("/iptables", json!(ipt)), 7, &["iptables", &format!("{ipt:?}")]);
    }
}

#[test]
fn lock_timeout_out_of_range() {
    rejected(&example_with("/lockTimeoutMs", json!(0)), 7, &["lockTimeoutMs", "0 "]);
    rejected(&example_with("/lockTimeoutMs", json!(300_001)), 7, &["lockTimeoutMs", "300001"]);
    assert_eq!(ok(&example_with("/lockTimeoutMs", json!(1))).settings.lock_timeout, Duration::from_millis(1));
}

// ---------------------------------------------------------------- rejections: code 6

#[test]
fn wrong_json_types_name_the_field_path() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/portForwarding/rules/0/hostPort", json!("80"), "portForwarding.rules[0].hostPort"),
        ("/portForwarding/rules/1/destPort", json!(80.5), "portForwarding.rules[1].destPort"),
        ("/portForwarding/rules/0/protocol", json!(6), "portForwarding.rules[0].protocol"),
        ("/portForwarding/rules/0/destIP", json!(["10.20.0.10"]), "portForwarding.rules[0].destIP"),
        ("/portForwarding/rules/1/routing/tableId", json!("101"), "portForwarding.rules[1].routing.tableId"),
        ("/portForwarding/rules/1/routing/fwmark", json!(true), "portForwarding.rules[1].routing.fwmark"),
        ("/portForwarding/rules", json!({}), "portForwarding.rules"),
        ("/routing/tableId", json!("100"), "routing.tableId"),
        ("/routing/enabled", json!("yes"), "routing.enabled"),
        ("/routing/fwmark", json!(1.5), "routing.fwmark"),
        ("/routing/outbound/useDefaultRoute", json!("false"), "routing.outbound.useDefaultRoute"),
        ("/routing/outbound/interface", json!(5), "routing.outbound.interface"),
        ("/masquerade", json!("yes"), "masquerade"),
        ("/lockTimeoutMs", json!(-1), "lockTimeoutMs"),
        ("/lockTimeoutMs", json!("1000"), "lockTimeoutMs"),
        ("/name", json!(5), "name"),
        ("/cniVersion", json!(1.0), "cniVersion"),
        ("/markMask", json!([1]), "markMask"),
    ];
    for (ptr, val, path) in cases {
        let e = rejected(&example_with(ptr, val.clone()), 6, &[path]);
        assert!(e.msg.starts_with("network config: field "), "{}", e.msg);
        if let Value::String(s) = &val {
            assert!(e.msg.contains(&format!("{s:?}")), "{} does not name the value {s:?}", e.msg);
        }
    }
    let v = with_mappings(minimal(), json!([{ "hostPort": 80, "containerPort": "80" }]));
    rejected(&v, 6, &["runtimeConfig.portMappings[0].containerPort", "\"80\""]);
    let v = with_mappings(minimal(), json!([{ "hostPort": 80, "containerPort": 80, "hostIP": 1 }]));
    rejected(&v, 6, &["runtimeConfig.portMappings[0].hostIP"]);
}

#[test]
fn missing_required_numbers_are_decode_errors() {
    let mut v = example();
    remove(&mut v, "/portForwarding/rules/1/hostPort");
    rejected(&v, 6, &["portForwarding.rules[1]", "hostPort"]);
    // Go's zero value, refused by name as portmap refuses it.
    let v = with_mappings(minimal(), json!([{ "hostPort": 80 }]));
    rejected(&v, 7, &["runtimeConfig.portMappings[0]", "containerPort: 0 is outside 1-65535"]);
    let mut v = minimal();
    v.as_object_mut().unwrap().insert("cni.dev/valid-attachments".into(), json!([{ "ifname": "eth0" }]));
    rejected(&v, 6, &["containerID"]);
}

#[test]
fn not_json_or_not_an_object() {
    for bytes in [&b""[..], b"{", b"not json", b"[]", b"42", b"null", b"{\"name\": \"dind\",}", b"\xff\xfe"] {
        let e = decode(bytes).err().unwrap_or_else(|| panic!("{bytes:?} decoded"));
        assert_eq!(e.code, 6, "{bytes:?}: {}", e.msg);
    }
}

#[test]
fn a_json_array_is_not_a_config() {
    let array = br#"["1.0.0","dind","bridge-nat",null,{"portMappings":[]},null,null,null,{"rules":[]},
                    null,null,null,null,null,null,null]"#;
    let e = decode(array).err().expect("an array is not a network config");
    assert_eq!(e.code, 6);
}

// ---------------------------------------------------------------- properties

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "cniVersion",
            "name",
            "type",
            "prevResult",
            "runtimeConfig",
            "portMappings",
            "bridge",
            "masquerade",
            "routing",
            "enabled",
            "tableId",
            "tableName",
            "fwmark",
            "rulePriority",
            "outbound",
            "interface",
            "gateway",
            "useDefaultRoute",
            "portForwarding",
            "rules",
            "hostPort",
            "destIP",
            "destPort",
            "containerPort",
            "protocol",
            "hostIP",
            "logFile",
            "logLevel",
            "stateDir",
            "lockTimeoutMs",
            "iptables",
            "markMask",
            "cni.dev/valid-attachments",
            "containerID",
            "ifname",
        ])
        .prop_map(String::from),
        "[a-zA-Z]{0,6}",
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-70_000i64..70_000).prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        "[ -~]{0,16}".prop_map(Value::String),
        prop::sample::select(vec![
            "0x64",
            "0",
            "0xzz",
            "0x",
            "tcp",
            "udp",
            "sctp",
            "icmp",
            "10.20.0.10",
            "::",
            "0.0.0.0",
            "main",
            "eth0",
            "",
            "/abs",
            "rel",
            "debug",
            "iptables-nft",
            "1.0.0",
            "dind",
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..7).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer in a value, the root included.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(c, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn example_with_mappings() -> Value {
    let mut v = with_mappings(
        example(),
        json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "udp", "hostIP": "192.168.1.5" }]),
    );
    set(&mut v, "/markMask", json!("0xffff"));
    set(&mut v, "/stateDir", json!("/run/bn"));
    set(&mut v, "/lockTimeoutMs", json!(1000));
    set(&mut v, "/logLevel", json!("info"));
    set(&mut v, "/iptables", json!("iptables-nft"));
    v.as_object_mut()
        .unwrap()
        .insert("cni.dev/valid-attachments".into(), json!([{ "containerID": "c", "ifname": "e" }]));
    v
}

#[track_caller]
fn decode_then_validate_is_total(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    if let Err(e) = decode(bytes).and_then(NetConfDraft::validate) {
        prop_assert!(e.code == 6 || e.code == 7, "code {} for {:?}", e.code, e.msg);
        prop_assert!(!e.msg.is_empty());
    }
    Ok(())
}

fn valid_mark(mark: u32, mask: u32) -> bool {
    mark != 0 && mark & !mask == 0
}

/// A mark as the user might write it, and the value it stands for (None: not a 32-bit number).
fn arb_mark() -> impl Strategy<Value = (Value, Option<u32>)> {
    prop_oneof![
        (-2i64..0x6000).prop_map(|n| (json!(n), u32::try_from(n).ok())),
        (0u32..0x6000).prop_map(|n| (json!(format!("{n:#x}")), Some(n))),
        (0u32..0x6000).prop_map(|n| (json!(n.to_string()), Some(n))),
        any::<u32>().prop_map(|n| (json!(n), Some(n))),
        Just((json!("0xzz"), None)),
        Just((json!(1u64 << 33), None)),
    ]
}

#[derive(Debug, Clone)]
struct GenRule {
    host_port: i64,
    dest_port: i64,
    protocol: &'static str,
    routing: Option<((Value, Option<u32>), i64)>,
}

fn arb_rule() -> impl Strategy<Value = GenRule> {
    (
        prop_oneof![4 => 1i64..40, 1 => -1i64..70_000],
        prop_oneof![4 => 1i64..100, 1 => -1i64..70_000],
        prop::sample::select(vec!["tcp", "udp", "sctp", "", "icmp"]),
        prop::option::of((arb_mark(), prop_oneof![4 => 95i64..110, 1 => -1i64..260])),
    )
        .prop_map(|(host_port, dest_port, protocol, routing)| GenRule { host_port, dest_port, protocol, routing })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_then_validate_is_total(&bytes)?;
    }

    #[test]
    fn json_ish_text_never_panics(text in r#"[{}\[\]":,0-9a-zA-Z. \-/$;]{0,96}"#) {
        decode_then_validate_is_total(text.as_bytes())?;
    }

    #[test]
    fn truncated_or_corrupted_example_never_panics(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let full = serde_json::to_vec(&example_with_mappings()).unwrap();
        decode_then_validate_is_total(&full[..cut.index(full.len() + 1)])?;
        let mut corrupted = full.clone();
        corrupted[flip.index(full.len())] = byte;
        decode_then_validate_is_total(&corrupted)?;
    }

    #[test]
    fn arbitrary_value_trees_never_panic(v in arb_json()) {
        decode_then_validate_is_total(&serde_json::to_vec(&v).unwrap())?;
    }

    #[test]
    fn example_with_any_value_replaced_never_panics(at in any::<prop::sample::Index>(), new in arb_json(), key in field_name()) {
        let base = example_with_mappings();
        let mut ptrs = Vec::new();
        pointers(&base, String::new(), &mut ptrs);
        let ptr = at.get(&ptrs).clone();
        // Replace the value there.
        let mut replaced = base.clone();
        if ptr.is_empty() { replaced = new.clone(); } else { *replaced.pointer_mut(&ptr).unwrap() = new.clone(); }
        decode_then_validate_is_total(&serde_json::to_vec(&replaced).unwrap())?;
        // Or add a key next to it.
        let mut added = base;
        if let Some(Value::Object(m)) = added.pointer_mut(&ptr) {
            m.insert(key, new);
        }
        decode_then_validate_is_total(&serde_json::to_vec(&added).unwrap())?;
    }

    #[test]
    fn generated_configs_validate_with_sound_values_or_fail_cleanly(
        global in prop::option::of((arb_mark(), prop_oneof![4 => 95i64..110, 1 => -1i64..260], any::<bool>())),
        rules in prop::collection::vec(arb_rule(), 0..6),
        mask in prop::sample::select(vec![None, Some(0x1fffu32), Some(0xff), Some(0xffff), Some(0xffff_0000)]),
    ) {
        let mut v = minimal();
        if let Some(m) = mask {
            set(&mut v, "/markMask", json!(format!("{m:#x}")));
        }
        if let Some(((mark, _), table, enabled)) = &global {
            set(&mut v, "/routing", json!({ "enabled": enabled, "tableId": table, "fwmark": mark,
                                             "outbound": { "interface": "eth5" } }));
        }
        let raw_rules: Vec<Value> = rules.iter().enumerate().map(|(i, r)| {
            let mut j = json!({ "name": format!("r{i}"), "hostPort": r.host_port, "destPort": r.dest_port,
                                "protocol": r.protocol });
            if let Some(((mark, _), table)) = &r.routing {
                j["routing"] = json!({ "fwmark": mark, "tableId": table, "outbound": { "interface": "eth0" } });
            }
            j
        }).collect();
        set(&mut v, "/portForwarding", json!({ "rules": raw_rules }));

        // An independent oracle for the generated domain.
        let mask_v = mask.unwrap_or(DEFAULT_MARK_MASK);
        let port_ok = |p: i64| (1..=65535).contains(&p);
        let table_ok = |t: i64| (1..=252).contains(&t);
        let mut expect_ok = true;
        let mut marks = Vec::new();
        let mut tables = Vec::new();
        if let Some(((_, mark), table, true)) = &global {
            expect_ok &= mark.is_some_and(|m| valid_mark(m, mask_v)) && table_ok(*table);
            marks.extend(*mark);
            tables.push(*table);
        }
        let mut claims = Vec::new();
        for r in &rules {
            expect_ok &= port_ok(r.host_port) && port_ok(r.dest_port) && r.protocol != "icmp";
            let proto = if r.protocol.is_empty() { "tcp" } else { r.protocol };
            claims.push((r.host_port, proto));
            if let Some(((_, mark), table)) = &r.routing {
                expect_ok &= mark.is_some_and(|m| valid_mark(m, mask_v)) && table_ok(*table);
                marks.extend(*mark);
                tables.push(*table);
            }
        }
        let distinct = |n: usize, set: usize| n == set;
        expect_ok &= distinct(marks.len(), marks.iter().collect::<HashSet<_>>().len());
        expect_ok &= distinct(tables.len(), tables.iter().collect::<HashSet<_>>().len());
        expect_ok &= distinct(claims.len(), claims.iter().collect::<HashSet<_>>().len());

        match load(&v) {
            Ok(c) => {
                prop_assert!(expect_ok, "validated although the oracle rejects: {v}");
                let mask_got = c.settings.mark_mask;
                prop_assert_eq!(mask_got, mask_v);
                let mut all_marks = Vec::new();
                let mut all_tables = Vec::new();
                if let Some(g) = &c.routing {
                    all_marks.extend(g.fwmark);
                    all_tables.push(g.table_id);
                }
                let mut ports = HashSet::new();
                for r in &c.rules {
                    prop_assert!(r.host_port != 0 && r.dest_port != 0);
                    prop_assert!(ports.insert((r.host_port, r.protocol)), "host port {} twice", r.host_port);
                    if let Some(rs) = &r.routing {
                        all_marks.push(rs.fwmark);
                        all_tables.push(rs.table_id);
                    }
                }
                for m in &all_marks {
                    prop_assert!(valid_mark(*m, mask_got), "mark {m:#x} with mask {mask_got:#x}");
                }
                prop_assert_eq!(all_marks.len(), all_marks.iter().collect::<HashSet<_>>().len());
                for t in &all_tables {
                    prop_assert!((1..=252).contains(t), "table {t}");
                }
                prop_assert_eq!(all_tables.len(), all_tables.iter().collect::<HashSet<_>>().len());
            }
            Err(e) => {
                prop_assert!(e.code == 6 || e.code == 7, "code {}: {}", e.code, e.msg);
                prop_assert!(!expect_ok, "rejected although the oracle accepts: {} for {v}", e.msg);
            }
        }
    }
}

#[test]
fn reply_via_defaults_to_arrival_and_takes_rule() {
    assert_eq!(ok(&example()).reply_via, ReplyVia::Arrival);
    assert_eq!(ok(&example_with("/routing/replyVia", json!("rule"))).reply_via, ReplyVia::Rule);
    assert_eq!(ok(&example_with("/routing/replyVia", json!("arrival"))).reply_via, ReplyVia::Arrival);
    let e = rejected(&example_with("/routing/replyVia", json!("uplink")), 7, &["routing.replyVia", "\"uplink\""]);
    assert!(e.msg.contains("arrival"), "{}", e.msg);
}

#[test]
fn a_routing_block_with_only_reply_via_enables_no_global_routing() {
    let mut v = minimal();
    v["routing"] = json!({ "replyVia": "rule" });
    let c = ok(&v);
    assert_eq!(c.routing, None);
    assert_eq!(c.reply_via, ReplyVia::Rule);
}
