//! The configuration exactly as decoded from stdin: structure and types only, no meaning yet.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawConf {
    #[serde(default)]
    pub(super) cni_version: String,
    #[serde(default)]
    pub(super) name: String,
    #[serde(rename = "type", default)]
    pub(super) plugin_type: String,
    pub(super) prev_result: Option<serde_json::Value>,
    /// The runtime's, decoded as Go would (`runtime.rs`); kept raw so that DEL can ignore it.
    pub(super) runtime_config: Option<serde_json::Value>,
    pub(super) bridge: Option<String>,
    pub(super) masquerade: Option<bool>,
    pub(super) routing: Option<RawRouting>,
    #[serde(default)]
    pub(super) port_forwarding: RawPortForwarding,
    pub(super) log_file: Option<String>,
    pub(super) log_level: Option<String>,
    pub(super) state_dir: Option<String>,
    pub(super) lock_timeout_ms: Option<u64>,
    pub(super) iptables: Option<String>,
    pub(super) backend: Option<String>,
    pub(super) mark_mask: Option<RawMark>,
    /// The runtime's too (GC), decoded as Go would.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub(super) valid_attachments: Option<serde_json::Value>,
}

/// One of `runtimeConfig.portMappings`, under the spec's names (`runtime.rs` folds other cases).
/// Go's zero values for what is missing: a port of 0 is then refused by validation, by name.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawPortMapping {
    #[serde(default)]
    pub(super) host_port: i64,
    #[serde(default)]
    pub(super) container_port: i64,
    #[serde(default)]
    pub(super) protocol: String,
    #[serde(default, rename = "hostIP")]
    pub(super) host_ip: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawPortForwarding {
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRule {
    #[serde(default)]
    pub(super) name: String,
    pub(super) host_port: i64,
    #[serde(default, rename = "destIP")]
    pub(super) dest_ip: String,
    pub(super) pod: Option<String>,
    pub(super) dest_port: i64,
    #[serde(default)]
    pub(super) protocol: String,
    pub(super) routing: Option<RawRuleRouting>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRouting {
    pub(super) enabled: Option<bool>,
    pub(super) table_id: Option<i64>,
    pub(super) table_name: Option<String>,
    pub(super) fwmark: Option<RawMark>,
    pub(super) rule_priority: Option<i64>,
    pub(super) outbound: Option<RawOutbound>,
    pub(super) reply_via: Option<String>,
    pub(super) health: Option<RawHealth>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawRuleRouting {
    pub(super) fwmark: Option<RawMark>,
    pub(super) table_id: Option<i64>,
    pub(super) table_name: Option<String>,
    pub(super) outbound: Option<RawOutbound>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawOutbound {
    #[serde(default)]
    pub(super) interface: String,
    #[serde(default)]
    pub(super) gateway: String,
    #[serde(default)]
    pub(super) gateway6: String,
    #[serde(default)]
    pub(super) use_default_route: bool,
    /// Only in the global block: uplinks the pods' own traffic fails over to, in order.
    pub(super) fallback: Option<Vec<String>>,
}

/// `routing.health`: how the agent probes an outbound list with a fallback.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawHealth {
    #[serde(default)]
    pub(super) targets: Vec<String>,
    #[serde(default)]
    pub(super) targets6: Vec<String>,
    pub(super) interval_ms: Option<i64>,
    pub(super) timeout_ms: Option<i64>,
    pub(super) fail_after: Option<i64>,
    pub(super) recover_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawMark {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawAttachment {
    #[serde(rename = "containerID", default)]
    pub(super) container_id: String,
    #[serde(default)]
    pub(super) ifname: String,
}
