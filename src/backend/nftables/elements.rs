//! What one attachment puts into the table: set and map elements (pure), and how they are encoded.

use super::layout::{set_spec, Mark};
use crate::config::Protocol;
use crate::netlink::nfnetlink::Attrs;
use crate::plan::{family_of, Family, Plan};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    Ip(IpAddr),
    /// A subnet in an interval set: matches every address in it.
    Net(IpNetwork),
    Proto(Protocol),
    Port(u16),
    Ifname(String),
    Jump(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Ip(ip) => write!(f, "{ip}"),
            Value::Net(n) => write!(f, "{n}"),
            Value::Proto(p) => write!(f, "{}", p.as_str()),
            Value::Port(p) => write!(f, "{p}"),
            Value::Ifname(n) => write!(f, "\"{n}\""),
            Value::Jump(c) => write!(f, "jump {c}"),
        }
    }
}

impl Value {
    /// The bytes of this field as a set key; `end` gives the last address of a subnet.
    fn bytes(&self, end: bool) -> Vec<u8> {
        match self {
            Value::Ip(IpAddr::V4(ip)) => ip.octets().to_vec(),
            Value::Ip(IpAddr::V6(ip)) => ip.octets().to_vec(),
            Value::Net(n) => {
                let ip = if end { n.broadcast() } else { n.network() };
                Value::Ip(ip).bytes(false)
            }
            Value::Proto(p) => vec![match p {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
                Protocol::Sctp => 132,
            }],
            Value::Port(p) => p.to_be_bytes().to_vec(),
            Value::Ifname(n) => {
                let mut b = n.as_bytes().to_vec();
                b.resize(16, 0);
                b
            }
            Value::Jump(_) => Vec::new(),
        }
    }
}

/// One element of one of the table's sets or maps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Element {
    pub set: String,
    pub key: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<Value>,
}

fn join(values: &[Value]) -> String {
    values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" . ")
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {{ {}", self.set, join(&self.key))?;
        if !self.data.is_empty() {
            write!(f, " : {}", join(&self.data))?;
        }
        write!(f, " }}")
    }
}

fn concat(values: &[Value], end: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        out.extend(v.bytes(end));
        if values.len() > 1 {
            out.resize((out.len() + 3) & !3, 0);
        }
    }
    out
}

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_KEY_END: u16 = 10;

impl Element {
    fn new(set: &str, key: Vec<Value>, data: Vec<Value>) -> Element {
        Element { set: set.into(), key, data }
    }

    pub fn key_bytes(&self) -> Vec<u8> {
        concat(&self.key, false)
    }

    pub fn data_bytes(&self) -> Vec<u8> {
        concat(&self.data, false)
    }

    /// One NFTA_LIST_ELEM of a set element list; `with_data` is false for deletions and lookups.
    pub fn encode(&self, with_data: bool, a: &mut Attrs) {
        let interval = set_spec(&self.set).is_some_and(|s| s.interval);
        a.nest(NFTA_LIST_ELEM, |a| {
            a.nest(NFTA_SET_ELEM_KEY, |a| {
                a.bytes(super::expr::NFTA_DATA_VALUE, &self.key_bytes());
            });
            if interval {
                a.nest(NFTA_SET_ELEM_KEY_END, |a| {
                    a.bytes(super::expr::NFTA_DATA_VALUE, &concat(&self.key, true));
                });
            }
            if with_data && !self.data.is_empty() {
                a.nest(NFTA_SET_ELEM_DATA, |a| match &self.data[..] {
                    [Value::Jump(chain)] => super::expr::Verdict::Jump(chain.clone()).encode(a),
                    _ => {
                        a.bytes(super::expr::NFTA_DATA_VALUE, &self.data_bytes());
                    }
                });
            }
        });
    }
}

/// The table contents one attachment needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// Elements only this attachment puts there: its forwards and their marks.
    pub own: BTreeSet<Element>,
    /// Elements every attachment on the same bridge and subnet needs.
    pub shared: BTreeSet<Element>,
    pub marks: BTreeSet<Mark>,
}

fn suffix(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "4",
        Family::Ipv6 => "6",
    }
}

pub fn render(plan: &Plan) -> Contents {
    let mut c = Contents::default();
    let bridge = Value::Ifname(plan.bridge.clone());
    for s in &plan.subnets {
        let fam = suffix(s.family);
        c.shared.insert(Element::new("bridges", vec![bridge.clone()], vec![]));
        c.shared.insert(Element::new(&format!("own{fam}"), vec![Value::Net(s.subnet), bridge.clone()], vec![]));
        if s.masquerade {
            c.shared.insert(Element::new(&format!("masq{fam}"), vec![Value::Net(s.subnet), bridge.clone()], vec![]));
        }
    }
    for f in &plan.forwards {
        let fam = suffix(family_of(f.pod_ip));
        let proto = Value::Proto(f.host.protocol);
        let (set, mut key) = match f.host.host_ip {
            Some(ip) => (format!("dnat{fam}-addr"), vec![Value::Ip(ip)]),
            None => (format!("dnat{fam}-any"), vec![]),
        };
        key.extend([proto, Value::Port(f.host.port)]);
        c.own.insert(Element::new(&set, key.clone(), vec![Value::Ip(f.pod_ip), Value::Port(f.pod_port)]));
        if let Some(value) = f.mark {
            let mark = Mark { value, mask: plan.mark_mask };
            c.own.insert(Element::new(&set.replace("dnat", "mark"), key.clone(), vec![Value::Jump(mark.chain())]));
            c.marks.insert(mark);
        }
        for a in &plan.routing.arrival {
            let mark = Mark { value: a.mark, mask: plan.mark_mask };
            // The uplink goes after the host address, before protocol and port.
            let mut k = key.clone();
            k.insert(k.len() - 2, Value::Ifname(a.uplink.clone()));
            c.own.insert(Element::new(&set.replace("dnat", "arrive"), k, vec![Value::Jump(mark.chain())]));
            c.marks.insert(mark);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_concatenate_in_four_byte_fields() {
        let e = Element::new(
            "dnat4-any",
            vec![Value::Proto(Protocol::Tcp), Value::Port(8080)],
            vec![Value::Ip("10.20.0.5".parse().unwrap()), Value::Port(80)],
        );
        assert_eq!(e.key_bytes(), vec![6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(e.data_bytes(), vec![10, 20, 0, 5, 0, 80, 0, 0]);
        assert_eq!(e.to_string(), "dnat4-any { tcp . 8080 : 10.20.0.5 . 80 }");
    }

    #[test]
    fn subnet_keys_span_the_subnet() {
        let e = Element::new(
            "own4",
            vec![Value::Net("10.20.0.0/24".parse().unwrap()), Value::Ifname("br0".into())],
            vec![],
        );
        let mut a = Attrs::new();
        e.encode(false, &mut a);
        let start = concat(&e.key, false);
        let end = concat(&e.key, true);
        assert_eq!(&start[..4], &[10, 20, 0, 0]);
        assert_eq!(&end[..4], &[10, 20, 0, 255]);
        assert_eq!(&start[4..7], b"br0");
        assert_eq!(start.len(), 20);
    }

    fn contents(extra: serde_json::Value, addrs: &[&str]) -> (Contents, Vec<String>, Vec<String>) {
        use crate::plan::tests::{att, conf, id};
        let c = conf(extra);
        let planned = crate::plan::plan(&c, &id(), &att(&c, addrs), None).expect("plan");
        let got = render(&planned);
        let own = got.own.iter().map(|e| e.to_string()).collect();
        let shared = got.shared.iter().map(|e| e.to_string()).collect();
        (got, own, shared)
    }

    #[test]
    fn forwards_become_dnat_elements() {
        let (_, own, shared) = contents(
            serde_json::json!({ "runtimeConfig": { "portMappings": [
                { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" },
                { "hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.168.1.2" }
            ] } }),
            &["10.20.0.5/24"],
        );
        assert_eq!(
            own,
            vec![
                "dnat4-addr { 192.168.1.2 . udp . 5353 : 10.20.0.5 . 53 }",
                "dnat4-any { tcp . 8080 : 10.20.0.5 . 80 }",
            ]
        );
        assert_eq!(
            shared,
            vec![
                "bridges { \"dind-br0\" }",
                "masq4 { 10.20.0.0/24 . \"dind-br0\" }",
                "own4 { 10.20.0.0/24 . \"dind-br0\" }",
            ]
        );
    }

    #[test]
    fn dual_stack_fills_both_families_and_masquerade_off_drops_masq() {
        let (_, own, shared) = contents(
            serde_json::json!({ "masquerade": false, "runtimeConfig": { "portMappings": [
                { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }
            ] } }),
            &["10.20.0.5/24", "fd00:20::5/64"],
        );
        assert!(own.contains(&"dnat6-any { tcp . 8080 : fd00:20::5 . 80 }".to_string()));
        assert!(shared.contains(&"own6 { fd00:20::/64 . \"dind-br0\" }".to_string()));
        assert!(shared.iter().all(|e| !e.starts_with("masq")), "{shared:?}");
    }

    #[test]
    fn routed_forwards_jump_to_their_mark_chain() {
        let (got, own, _) = contents(
            serde_json::json!({ "routing": { "replyVia": "rule" }, "portForwarding": { "rules": [
                { "name": "web", "hostPort": 30080, "destPort": 8080, "protocol": "tcp",
                  "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "eth0" } } },
                { "name": "plain", "hostPort": 2376, "destPort": 2376, "protocol": "tcp" }
            ] } }),
            &["10.20.0.10/24"],
        );
        assert!(own.contains(&"mark4-any { tcp . 30080 : jump mark-0x65-0x1fff }".to_string()), "{own:?}");
        assert!(own.iter().all(|e| !e.contains(". 2376 : jump")), "{own:?}");
        assert_eq!(got.marks.into_iter().collect::<Vec<_>>(), vec![Mark { value: 0x65, mask: 0x1fff }]);
    }

    #[test]
    fn every_forward_jumps_by_its_arrival_uplink_in_its_own_family() {
        let (got, own, _) = contents(
            serde_json::json!({
                "routing": { "tableId": 100, "fwmark": "0x64", "outbound": { "interface": "eth5" } },
                "portForwarding": { "rules": [
                    { "name": "web", "hostPort": 30080, "destPort": 8080,
                      "routing": { "fwmark": "0x65", "tableId": 101, "outbound": { "interface": "eth0" } } },
                    { "name": "plain", "hostPort": 2376, "destPort": 2376 }
                ] },
                "runtimeConfig": { "portMappings": [ { "hostPort": 8443, "containerPort": 80, "hostIP": "192.168.1.2" } ] }
            }),
            &["10.20.0.10/24", "fd00::10/64"],
        );
        let arrive: Vec<&String> = own.iter().filter(|e| e.starts_with("arrive")).collect();
        assert_eq!(
            arrive,
            vec![
                "arrive4-addr { 192.168.1.2 . \"eth0\" . tcp . 8443 : jump mark-0x65-0x1fff }",
                "arrive4-addr { 192.168.1.2 . \"eth5\" . tcp . 8443 : jump mark-0x64-0x1fff }",
                "arrive4-any { \"eth0\" . tcp . 2376 : jump mark-0x65-0x1fff }",
                "arrive4-any { \"eth0\" . tcp . 30080 : jump mark-0x65-0x1fff }",
                "arrive4-any { \"eth5\" . tcp . 2376 : jump mark-0x64-0x1fff }",
                "arrive4-any { \"eth5\" . tcp . 30080 : jump mark-0x64-0x1fff }",
                "arrive6-any { \"eth0\" . tcp . 2376 : jump mark-0x65-0x1fff }",
                "arrive6-any { \"eth0\" . tcp . 30080 : jump mark-0x65-0x1fff }",
                "arrive6-any { \"eth5\" . tcp . 2376 : jump mark-0x64-0x1fff }",
                "arrive6-any { \"eth5\" . tcp . 30080 : jump mark-0x64-0x1fff }",
            ]
        );
        assert_eq!(got.marks.len(), 2);
        // Each forward's own mark too, in its family's map; every map named is declared.
        assert!(own.contains(&"mark6-any { tcp . 30080 : jump mark-0x65-0x1fff }".to_string()), "{own:?}");
        assert!(got.own.iter().all(|e| set_spec(&e.set).is_some()), "{own:?}");
    }

    #[test]
    fn single_field_keys_are_not_padded_beyond_their_type() {
        let e = Element::new("bridges", vec![Value::Ifname("dind-br0".into())], vec![]);
        assert_eq!(e.key_bytes().len(), 16);
    }
}
