//! What the runtime adds to bridge-nat's entry: `runtimeConfig.portMappings` (ADD, CHECK) and
//! `cni.dev/valid-attachments` (GC). Runtimes write these, not the operator, and not all alike:
//! containerd's go-cni capitalises the keys (`HostPort`, `HostIP: ""`), CRI-O, Podman and Multus
//! use the spec's camelCase. They are read as Go's encoding/json reads them (see cni/go_json.rs);
//! the operator's own fields stay strict.

use super::raw::{RawAttachment, RawPortMapping};
use crate::cni::go_json;
use crate::error::{code, Error, Result};
use serde_json::Value;

const PORT_MAPPING: &[&str] = &["hostPort", "containerPort", "protocol", "hostIP"];
const ATTACHMENT: &[&str] = &["containerID", "ifname"];

fn undecodable(field: &str, msg: String) -> Error {
    Error::new(code::DECODE, format!("network config: field {}", go_json::at_field(field, &msg)))
}

/// `runtimeConfig.portMappings`, in the order given. No `runtimeConfig`, or one without
/// `portMappings`, is no mapping (containerd sends none for a pod without `hostPort`).
pub(super) fn port_mappings(runtime_config: Option<&Value>) -> Result<Vec<RawPortMapping>> {
    let Some(rc) = runtime_config.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    if !rc.is_object() {
        return Err(undecodable("runtimeConfig", format!("expected an object, got {}", go_json::kind_of(rc))));
    }
    let items = go_json::elements(rc, "portMappings").map_err(|e| undecodable("runtimeConfig", e))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            go_json::decode(m, PORT_MAPPING).map_err(|e| undecodable(&format!("runtimeConfig.portMappings[{i}]"), e))
        })
        .collect()
}

/// `cni.dev/valid-attachments`: None when the runtime sent no list (then GC keeps everything).
pub(super) fn valid_attachments(list: Option<&Value>) -> Result<Option<Vec<RawAttachment>>> {
    const FIELD: &str = "cni.dev/valid-attachments";
    let Some(list) = list.filter(|v| !v.is_null()) else { return Ok(None) };
    let Some(items) = list.as_array() else {
        return Err(undecodable(FIELD, format!("expected an array, got {}", go_json::kind_of(list))));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let at = format!("{FIELD}[{i}]");
            let att: RawAttachment = go_json::decode(a, ATTACHMENT).map_err(|e| undecodable(&at, e))?;
            if att.container_id.is_empty() {
                return Err(undecodable(&at, "containerID is required".into()));
            }
            Ok(att)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containerd_port_mappings_decode_like_the_spec_ones() {
        let go_cni = json!({"portMappings": [
            {"HostPort": 30080, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""},
            {"HostPort": 30081, "ContainerPort": 53, "Protocol": "udp", "HostIP": "192.0.2.1"}
        ]});
        let spec = json!({"portMappings": [
            {"hostPort": 30080, "containerPort": 8080, "protocol": "tcp"},
            {"hostPort": 30081, "containerPort": 53, "protocol": "udp", "hostIP": "192.0.2.1"}
        ]});
        let a = port_mappings(Some(&go_cni)).unwrap();
        let b = port_mappings(Some(&spec)).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(a[0].host_port, 30080);
        assert_eq!(a[0].host_ip, "");
        assert_eq!(a[1].host_ip, "192.0.2.1");
    }

    #[test]
    fn other_capabilities_and_unknown_keys_are_ignored() {
        let rc = json!({"bandwidth": {"IngressRate": 1}, "ips": ["10.20.0.9"], "mac": "", "cgroupPath": "/x",
                        "PortMappings": [{"hostPort": 1, "containerPort": 2, "Extra": 3}]});
        assert_eq!(port_mappings(Some(&rc)).unwrap().len(), 1);
        assert!(port_mappings(Some(&json!({}))).unwrap().is_empty());
        assert!(port_mappings(Some(&Value::Null)).unwrap().is_empty());
        assert!(port_mappings(None).unwrap().is_empty());
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = port_mappings(Some(&json!({"portMappings": [{"HostPort": "x"}]}))).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert!(
            e.msg.starts_with("network config: field runtimeConfig.portMappings[0].hostPort: invalid type"),
            "{}",
            e.msg
        );
        let e = port_mappings(Some(&json!({"portMappings": 5}))).unwrap_err();
        assert!(e.msg.contains("runtimeConfig.portMappings: expected an array"), "{}", e.msg);
        assert!(port_mappings(Some(&json!([]))).unwrap_err().msg.contains("runtimeConfig: expected an object"));
    }

    #[test]
    fn valid_attachments_fold_keys_and_need_a_container_id() {
        let v = json!([{"ContainerID": "abc", "IfName": "net1"}, {"containerID": "def", "ifname": "eth0"}]);
        let list = valid_attachments(Some(&v)).unwrap().unwrap();
        assert_eq!((list[0].container_id.as_str(), list[0].ifname.as_str()), ("abc", "net1"));
        assert_eq!(list[1].container_id, "def");
        assert!(valid_attachments(None).unwrap().is_none());
        assert!(valid_attachments(Some(&json!([{"ifname": "x"}])))
            .unwrap_err()
            .msg
            .contains("containerID is required"));
    }
}
