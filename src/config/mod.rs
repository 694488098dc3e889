//! The plugin's network configuration: decoded from stdin, then validated field by field.
//! Field names follow ../shared/config.md; validation never touches the node.

use crate::error::{code, Error, Result};
use raw::RawConf;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// On tmpfs: what a record describes dies with the boot, and a pod start then costs no disk writes.
pub const DEFAULT_STATE_DIR: &str = "/run/bridge-nat";
pub const DEFAULT_LOG_FILE: &str = "/var/log/bridge-nat.log";
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 20_000;
pub const DEFAULT_RULE_PRIORITY: u32 = 100;
/// Bits no other common component owns: kube-proxy uses 0x4000/0x8000, portmap 0x2000,
/// Calico 0xffff0000.
pub const DEFAULT_MARK_MASK: u32 = 0x1fff;

mod failover;
mod raw;
mod runtime;
mod salvage;
mod unique;
mod unknown;

pub use salvage::salvage;
mod validate;

use validate::{validate, validate_network_name, validate_settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    pub interface: String,
    /// The IPv4 next hop, when not discovered.
    pub gateway: Option<IpAddr>,
    /// The IPv6 next hop, when not discovered; a link-local one goes out of `interface`. Left out
    /// of records when none, so older records load with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<IpAddr>,
    pub use_default_route: bool,
}

/// A routing table with its own default route, selected by a mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub fwmark: u32,
    pub table_id: u32,
    pub table_name: Option<String>,
    pub outbound: Outbound,
}

/// `routing.replyVia`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyVia {
    /// By the uplink the connection arrived on, when that uplink has a table in the network's
    /// routing configuration; otherwise by the forward's own (or the fallback) mark.
    #[default]
    Arrival,
    /// By the forward's own routing block, else the fallback mark: the seed's behaviour.
    Rule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalRouting {
    pub table_id: u32,
    pub table_name: Option<String>,
    pub fwmark: Option<u32>,
    pub rule_priority: u32,
    pub outbound: Outbound,
    /// `outbound.fallback`: where the pods' own traffic goes when the uplinks before are unhealthy.
    pub fallback: Vec<FallbackUplink>,
    /// `routing.health`: how the agent judges the uplinks of `[outbound, ...fallback]`.
    pub health: HealthConfig,
}

/// A fallback uplink with the table that routes the pods' traffic by it: the table a rule's
/// routing block gives that uplink in this network, else `tableId + position` (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackUplink {
    pub table_id: u32,
    pub table_name: Option<String>,
    pub outbound: Outbound,
}

/// `routing.health`, with its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthConfig {
    /// Echo targets of both families (`targets` IPv4, `targets6` IPv6), asked through each uplink
    /// every interval in their own family; one list, so records written before IPv6 was probed
    /// read the same.
    pub targets: Vec<IpAddr>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub fail_after: u32,
    pub recover_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { targets: Vec::new(), interval_ms: 1000, timeout_ms: 800, fail_after: 3, recover_after: 5 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    pub name: String,
    pub host_port: u16,
    pub dest_ip: Option<IpAddr>,
    pub pod: Option<PodSelector>,
    pub dest_port: u16,
    pub protocol: Protocol,
    pub routing: Option<RouteSpec>,
}

/// A rule's `pod`: "NAMESPACE/NAME", where a NAME ending in `*` matches every name it prefixes
/// (a Deployment's pods are named after it, with a suffix that changes on every rollout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSelector {
    pub namespace: String,
    pub name: String,
    pub prefix: bool,
}

impl PodSelector {
    pub fn matches(&self, pod: &crate::cni::Pod) -> bool {
        pod.namespace == self.namespace
            && if self.prefix { pod.name.starts_with(&self.name) } else { pod.name == self.name }
    }
}

impl std::fmt::Display for PodSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}{}", self.namespace, self.name, if self.prefix { "*" } else { "" })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    pub host_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize)]
pub struct AttachmentId {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentId {
    /// How messages name an attachment.
    pub fn describe(&self) -> String {
        format!("network {:?} container {} interface {}", self.network, self.container_id, self.ifname)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub log_file: PathBuf,
    pub log_level: log::LevelFilter,
    pub state_dir: PathBuf,
    pub lock_timeout: Duration,
    /// `iptables`, `iptables-legacy`, `iptables-nft`, or an absolute path to one of them.
    pub iptables: String,
    pub backend: BackendChoice,
    pub mark_mask: u32,
}

/// `"backend"`: which backend new attachments get. An attachment keeps the backend it was added
/// with (its record names it) until a later ADD of it resolves to another one, which moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// `"auto"`, the default: nftables where nf_tables answers (one table lookup per ADD), and
    /// iptables where it does not or where `"iptables"` names iptables-legacy (nftables cannot see
    /// a legacy FORWARD policy, let alone accept the bridge there).
    #[default]
    Auto,
    /// `"iptables"` or `"nftables"`: that backend, whatever the node offers.
    Only(Backend),
}

/// Where an attachment's forwarding rules live; what its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Chains in iptables' nat/filter/mangle tables, applied with one iptables-restore per family.
    /// Also what a record without a `backend` field (written before backends existed) means.
    #[default]
    Iptables,
    /// One native nftables table whose forwards are map elements, changed over netlink.
    Nftables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            log_file: PathBuf::from(DEFAULT_LOG_FILE),
            log_level: log::LevelFilter::Info,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            lock_timeout: Duration::from_millis(DEFAULT_LOCK_TIMEOUT_MS),
            iptables: "iptables".into(),
            backend: BackendChoice::Auto,
            mark_mask: DEFAULT_MARK_MASK,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub bridge: Option<String>,
    pub masquerade: bool,
    /// None when the block is absent or `enabled` is false.
    pub routing: Option<GlobalRouting>,
    /// Which uplink replies to a forwarded connection leave by (`routing.replyVia`).
    pub reply_via: ReplyVia,
    pub rules: Vec<PortRule>,
    pub port_mappings: Vec<PortMapping>,
    pub settings: Settings,
    pub prev_result: Option<serde_json::Value>,
    /// GC only: the attachments the runtime still knows.
    pub valid_attachments: Option<Vec<AttachmentId>>,
}

impl NetConf {
    /// Enough of a config for DEL to work from the record when the rest no longer validates.
    pub fn for_cleanup(name: String, settings: Settings) -> Result<NetConf> {
        validate_network_name(&name)?;
        Ok(NetConf {
            cni_version: String::new(),
            name,
            bridge: None,
            masquerade: true,
            routing: None,
            reply_via: ReplyVia::default(),
            rules: Vec::new(),
            port_mappings: Vec::new(),
            settings,
            prev_result: None,
            valid_attachments: None,
        })
    }
}

/// Decode stdin. Only structure and types are checked here; `validate` checks meaning.
pub fn decode(stdin: &[u8]) -> Result<NetConfDraft> {
    if stdin.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::new(code::DECODE, "network config: stdin must be a JSON object"));
    }
    // Parsed once: the unknown-field check reads the tree, then the typed decode consumes it.
    let tree: serde_json::Value =
        serde_json::from_slice(stdin).map_err(|e| Error::new(code::DECODE, format!("network config: {e}")))?;
    let warnings = unknown::unknown_fields(&tree);
    let raw: RawConf = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Error::new(code::DECODE, format!("network config: field {path}: {inner}"))
    })?;
    Ok(NetConfDraft { raw, warnings })
}

/// Decoded but not yet validated. The version is readable early so errors can carry it.
pub struct NetConfDraft {
    raw: RawConf,
    warnings: Vec<String>,
}

impl NetConfDraft {
    /// Mistakes that do not stop the call (unknown fields), to be logged once logging is set up.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn cni_version(&self) -> &str {
        &self.raw.cni_version
    }

    /// Settings alone (logging, state, lock): DEL uses them even when the rest is invalid.
    pub fn settings(&self) -> Result<Settings> {
        validate_settings(&self.raw)
    }

    pub fn network_name(&self) -> &str {
        &self.raw.name
    }

    pub fn validate(self) -> Result<NetConf> {
        validate(self.raw)
    }

    /// DEL works from the record, so runtime input it cannot use (a `runtimeConfig` or a
    /// `cni.dev/valid-attachments` that does not decode) is dropped with a warning, not refused:
    /// a failing DEL would stop the runtime before `bridge` and `host-local` release the pod.
    pub fn drop_unusable_runtime_input(&mut self) {
        if let Err(e) = runtime::port_mappings(self.raw.runtime_config.as_ref()) {
            log::warn!("ignoring runtimeConfig, which DEL does not need: {e}");
            self.raw.runtime_config = None;
        }
        if let Err(e) = runtime::valid_attachments(self.raw.valid_attachments.as_ref()) {
            log::warn!("ignoring cni.dev/valid-attachments, which DEL does not need: {e}");
            self.raw.valid_attachments = None;
        }
    }
}

#[cfg(test)]
mod tests;
