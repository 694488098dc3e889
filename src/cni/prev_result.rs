//! What the plugins before us set up, read from prevResult (0.3.x, 0.4.0 and 1.x shapes alike).
//! The raw JSON is kept by the caller and printed back unchanged; this only extracts facts.

use super::go_json;
use crate::error::{code, Error, Result};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use std::net::IpAddr;

struct RawResult {
    interfaces: Vec<RawInterface>,
    ips: Vec<RawIp>,
}

#[derive(Debug, Deserialize)]
struct RawInterface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    sandbox: String,
    #[serde(default)]
    mac: String,
}

#[derive(Debug, Deserialize)]
struct RawIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    interface: Option<usize>,
}

/// One address of the attachment, with the subnet it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddress {
    pub ip: IpAddr,
    pub subnet: IpNetwork,
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Host-side bridge the pod hangs off.
    pub bridge: String,
    pub addresses: Vec<PodAddress>,
    /// The MAC of the pod's own interface, when the plugin before us reported one.
    pub mac: Option<[u8; 6]>,
}

impl Attachment {
    pub fn owns(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.ip == ip)
    }

    pub fn subnet_containing(&self, ip: IpAddr) -> Option<IpNetwork> {
        self.addresses.iter().map(|a| a.subnet).find(|s| s.contains(ip))
    }
}

fn bad(msg: String) -> Error {
    Error::new(code::INVALID_CONFIG, format!("prevResult: {msg}"))
}

/// Extract the attachment from prevResult. `bridge_override` is the config's `bridge` field.
pub fn parse(prev: &serde_json::Value, bridge_override: Option<&str>) -> Result<Attachment> {
    let raw = decode(prev)?;
    // The bridge plugin lists the bridge first, then the host veth, then the container side.
    let bridge = match bridge_override {
        Some(b) => b.to_string(),
        None => raw
            .interfaces
            .iter()
            .find(|i| i.sandbox.is_empty() && !i.name.is_empty())
            .map(|i| i.name.clone())
            .ok_or_else(|| {
                bad("no host-side interface to find the bridge by; set \"bridge\" in the config or put bridge-nat after the bridge plugin".into())
            })?,
    };
    let mut addresses = Vec::new();
    for (i, ip) in raw.ips.iter().enumerate() {
        // Addresses on host-side interfaces (if any plugin reported them) are not the pod's.
        if let Some(idx) = ip.interface {
            let iface = raw
                .interfaces
                .get(idx)
                .ok_or_else(|| bad(format!("ips[{i}].interface: index {idx} has no interface")))?;
            if iface.sandbox.is_empty() {
                continue;
            }
        }
        let net: IpNetwork = Some(&ip.address)
            .filter(|a| a.contains('/'))
            .and_then(|a| a.parse().ok())
            .ok_or(())
            .map_err(|_| bad(format!("ips[{i}].address: {:?} is not an address with prefix", ip.address)))?;
        let gateway = match ip.gateway.as_deref().filter(|g| !g.is_empty()) {
            Some(g) => Some(g.parse().map_err(|_| bad(format!("ips[{i}].gateway: {g:?} is not an IP address")))?),
            None => None,
        };
        let subnet = IpNetwork::new(net.network(), net.prefix()).expect("prefix came from a valid network");
        addresses.push(PodAddress { ip: net.ip(), subnet, gateway });
    }
    if addresses.is_empty() {
        return Err(bad(
            "no pod address; bridge-nat must come after an IPAM-using plugin such as bridge with host-local".into(),
        ));
    }
    let mac = pod_mac(&raw);
    Ok(Attachment { bridge, addresses, mac })
}

/// The runtime hands prevResult on as the previous plugin wrote it; read it as that plugin's
/// runtime (Go) would: keys in any case, unknown keys ignored, `null` as nothing.
fn decode(prev: &serde_json::Value) -> Result<RawResult> {
    if !prev.is_object() {
        return Err(bad(format!("cannot decode: expected an object, got {}", go_json::kind_of(prev))));
    }
    fn list<T: serde::de::DeserializeOwned>(prev: &serde_json::Value, key: &str, fields: &[&str]) -> Result<Vec<T>> {
        let items = go_json::elements(prev, key).map_err(|e| bad(format!("cannot decode: {e}")))?;
        let item = |(i, v): (usize, &serde_json::Value)| {
            go_json::decode(v, fields).map_err(|e| bad(format!("{key}[{i}]: {e}")))
        };
        items.iter().enumerate().map(item).collect()
    }
    Ok(RawResult {
        interfaces: list(prev, "interfaces", &["name", "sandbox", "mac"])?,
        ips: list(prev, "ips", &["address", "gateway", "interface"])?,
    })
}

/// The container-side interface is the one with a sandbox; the one the pod's addresses name wins
/// when a plugin reported several. A MAC we cannot read is treated as none: it only decides whether
/// the node's neighbour entry is replaced or deleted, which is no reason to refuse the pod.
fn pod_mac(raw: &RawResult) -> Option<[u8; 6]> {
    let named = raw.ips.iter().filter_map(|ip| ip.interface).find_map(|i| raw.interfaces.get(i).map(|x| (i, x)));
    let pod = named
        .filter(|(_, x)| !x.sandbox.is_empty())
        .or_else(|| raw.interfaces.iter().enumerate().find(|(_, x)| !x.sandbox.is_empty()));
    pod.and_then(|(_, x)| parse_mac(&x.mac))
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in out.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bridge_result_031() -> serde_json::Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "dind-br0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "net1", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod"}
            ],
            "ips": [{"version": "4", "interface": 2, "address": "10.20.0.10/24", "gateway": "10.20.0.1"}],
            "dns": {}
        })
    }

    #[test]
    fn finds_bridge_address_subnet_and_gateway() {
        let a = parse(&bridge_result_031(), None).unwrap();
        assert_eq!(a.bridge, "dind-br0");
        assert_eq!(a.addresses.len(), 1);
        assert_eq!(a.addresses[0].ip, "10.20.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(a.addresses[0].subnet, "10.20.0.0/24".parse::<IpNetwork>().unwrap());
        assert_eq!(a.addresses[0].gateway, Some("10.20.0.1".parse().unwrap()));
    }

    #[test]
    fn pod_mac_is_the_sandbox_interfaces() {
        let a = parse(&bridge_result_031(), None).unwrap();
        assert_eq!(a.mac, Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02]));
        let mut r = bridge_result_031();
        r["interfaces"][2].as_object_mut().unwrap().remove("mac");
        assert_eq!(parse(&r, None).unwrap().mac, None);
        r["interfaces"][2]["mac"] = json!("aa:bb:cc");
        assert_eq!(parse(&r, None).unwrap().mac, None);
        assert_eq!(parse_mac("AA-bb-cc-dd-ee-0f"), Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]));
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
    }

    #[test]
    fn config_bridge_overrides_and_v6_is_kept() {
        let mut r = bridge_result_031();
        r["ips"].as_array_mut().unwrap().push(json!({"interface": 2, "address": "fd00::10/64"}));
        let a = parse(&r, Some("br9")).unwrap();
        assert_eq!(a.bridge, "br9");
        assert_eq!(a.addresses[1].subnet.to_string(), "fd00::/64");
        assert_eq!(a.addresses.iter().filter(|x| x.ip.is_ipv4()).count(), 1);
    }

    #[test]
    fn host_side_addresses_are_not_the_pods() {
        let mut r = bridge_result_031();
        r["ips"].as_array_mut().unwrap().push(json!({"interface": 0, "address": "10.20.0.1/24"}));
        assert_eq!(parse(&r, None).unwrap().addresses.len(), 1);
    }

    #[test]
    fn no_addresses_is_a_clear_error() {
        let e = parse(&json!({"cniVersion": "1.0.0", "interfaces": [{"name": "br"}], "ips": []}), None).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("no pod address"), "{}", e.msg);
    }

    #[test]
    fn keys_in_another_case_read_as_go_reads_them() {
        let r = json!({"CNIVersion": "1.0.0", "Interfaces": [{"Name": "dind-br0", "MAC": "aa:bb:cc:dd:ee:ff"},
            {"name": "eth0", "Sandbox": "/var/run/netns/x", "Mac": "02:00:00:00:00:01"}],
            "IPs": [{"Address": "10.20.0.5/24", "Gateway": "10.20.0.1", "Interface": 1}], "DNS": {}});
        let att = parse(&r, None).unwrap();
        assert_eq!(att.bridge, "dind-br0");
        assert_eq!(att.addresses[0].ip.to_string(), "10.20.0.5");
        assert_eq!(att.mac, Some([2, 0, 0, 0, 0, 1]));
        let e = parse(&json!({"ips": [{"address": 5}]}), None).unwrap_err();
        assert!(e.msg.starts_with("prevResult: ips[0]: address: invalid type"), "{}", e.msg);
    }

    use proptest::prelude::*;

    fn json_tree() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<i64>().prop_map(|n| json!(n)),
            "[0-9a-f:./]{0,20}".prop_map(|s| json!(s)),
            Just(json!("10.20.0.10/24")),
            Just(json!("fd00::10/64")),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("interfaces".to_string()),
                            Just("ips".to_string()),
                            Just("address".to_string()),
                            Just("gateway".to_string()),
                            Just("interface".to_string()),
                            Just("sandbox".to_string()),
                            Just("name".to_string()),
                            "[a-z]{1,6}"
                        ],
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_is_parsed_or_refused_without_panic(v in json_tree(), bridge in proptest::option::of("[a-z0-9]{1,15}")) {
            match parse(&v, bridge.as_deref()) {
                Ok(a) => {
                    prop_assert!(!a.addresses.is_empty());
                    for addr in &a.addresses {
                        prop_assert!(addr.subnet.contains(addr.ip));
                    }
                }
                Err(e) => prop_assert_eq!(e.code, 7),
            }
        }
    }

    #[test]
    fn bad_interface_index_and_address_are_named() {
        let mut r = bridge_result_031();
        r["ips"][0]["interface"] = json!(7);
        assert!(parse(&r, None).unwrap_err().msg.contains("ips[0].interface"));
        let mut r = bridge_result_031();
        r["ips"][0]["address"] = json!("10.20.0.10");
        assert!(parse(&r, None).unwrap_err().msg.contains("ips[0].address"));
    }
}
