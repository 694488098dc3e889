//! The record of what one attachment installed: DEL, CHECK, GC and reconcile work from it alone.

use crate::backend::Objects;
use crate::config::{AttachmentId, Backend};
use crate::plan::snat6::Snat6;
use crate::plan::{Forward, HostPort, Sysctl};
use crate::routing::egress::Egress;
use crate::routing::{IpRule, Route, TableSpec};
use serde::{Deserialize, Serialize};
use std::fs;

pub(super) const RECORD_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Written before the node is changed: if the call dies, the next one reconciles from the kernel.
    Applying,
    Applied,
}

/// What ADD installed for one attachment. DEL, CHECK and GC work from this alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub format: u32,
    pub id: AttachmentId,
    pub status: Status,
    /// Rules vanish on reboot; a record from another boot describes nothing installed.
    pub boot_id: String,
    pub cni_version: String,
    pub bridge: String,
    pub addresses: Vec<String>,
    pub host_ports: Vec<HostPort>,
    /// What the firewall backend installed (iptables rules, or nftables elements).
    #[serde(flatten)]
    pub firewall: Objects,
    pub sysctls: Vec<Sysctl>,
    #[serde(default)]
    pub ip_rules: Vec<IpRule>,
    #[serde(default)]
    pub tables: Vec<TableSpec>,
    /// Routes as installed, next hops resolved at the time: what ADD did, for people reading the
    /// record. DEL flushes whole tables instead, and CHECK resolves next hops again.
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub backend: Backend,
    /// The forwards as planned (host port, pod address and port, mark), for people and `list`.
    /// Records written before this field existed load with none.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// How replies leave the node: "arrival" (by the uplink the connection came in on) or "rule"
    /// (by the forward's mark and table). Absent: by the mark and table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_via: Option<String>,
    /// Indexes of the network's static rules this attachment got a forward from; held in the index
    /// as `rule:<network>:<index>`, so an ADD can say which rules no attachment binds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound_rules: Vec<usize>,
    /// The pods' own traffic with a fallback uplink: the candidates and the health settings, so
    /// that every path resolving the source rule (ADD, CHECK, reconcile, the agent) agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// The pods' IPv6 egress translated to each uplink's stable address (commands/snat6.rs), with
    /// the address set at ADD. Records of earlier versions load with none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat6: Vec<Snat6>,
}
impl Record {
    pub fn new(id: AttachmentId, cni_version: &str) -> Record {
        Record {
            format: RECORD_FORMAT,
            id,
            status: Status::Applying,
            boot_id: current_boot_id(),
            cni_version: cni_version.to_string(),
            bridge: String::new(),
            addresses: Vec::new(),
            host_ports: Vec::new(),
            firewall: Objects::default(),
            sysctls: Vec::new(),
            ip_rules: Vec::new(),
            tables: Vec::new(),
            routes: Vec::new(),
            backend: Backend::Iptables,
            forwards: Vec::new(),
            reply_via: None,
            bound_rules: Vec::new(),
            egress: None,
            snat6: Vec::new(),
        }
    }

    /// True when the rules it lists are believed to be on the node.
    pub fn is_live(&self) -> bool {
        self.boot_id == boot_id()
    }

    /// Its status as `list` and the metrics spell it: `applied`, `applying` (an ADD did not finish,
    /// or is running) or `earlier-boot` (nothing of it is installed).
    pub fn status_name(&self) -> &'static str {
        match (self.is_live(), self.status) {
            (false, _) => "earlier-boot",
            (true, Status::Applied) => "applied",
            (true, Status::Applying) => "applying",
        }
    }

    /// How many forwards it lists (records older than the `forwards` field: one per host port).
    pub fn forward_count(&self) -> usize {
        if self.forwards.is_empty() {
            self.host_ports.len()
        } else {
            self.forwards.len()
        }
    }
}

pub fn current_boot_id() -> String {
    boot_id().to_string()
}

/// Read once per process: it cannot change while the process lives, and `is_live` runs for every
/// record each time the agent's records change (at 900 pods, 1,800 reads of procfs per ADD).
fn boot_id() -> &'static str {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
    })
}
