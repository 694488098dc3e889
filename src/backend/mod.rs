//! Firewall backends behind one interface. A backend renders a plan into its kernel objects and
//! changes the kernel; it knows nothing of records, the index or the lock, which the pipeline
//! (commands/) owns. Which backend serves an attachment is decided once: from the config on ADD,
//! from the record on every later call. `"backend": "auto"` is resolved here, once per ADD.
//!
//! Shared objects (a chain jump, a network's masquerade, the nftables table) are named by keys the
//! pipeline holds in the index for each attachment; `install` is told which keys this attachment is
//! the first to hold, `remove` which ones it was the last to hold, so calls stay O(1).

pub mod iptables;
pub mod nftables;

use crate::config::{AttachmentId, Backend, BackendChoice, Settings};
use crate::error::Result;
use crate::plan::snat6::Snat6;
use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv6Addr;

/// What a backend installed for one attachment, as recorded (the record's fields `rules` and `nft`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Objects {
    /// iptables: every rule this attachment needs, shared ones included, in iptables-save form.
    /// nftables: the accepts its network needs in iptables' FORWARD where that drops by policy.
    #[serde(default)]
    pub rules: Vec<iptables::Rule>,
    /// nftables: the table contents this attachment needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft: Option<nftables::NftRecord>,
}

/// How hard `converge` works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Converge {
    /// Change the kernel only where it differs from the records (reconcile, the agent).
    Repair,
    /// Rewrite everything the backend owns to exactly the records (GC, a failed fast path).
    Rebuild,
}

pub trait Firewall {
    fn kind(&self) -> Backend;

    /// The kernel objects one attachment needs.
    fn render(&self, plan: &Plan) -> Objects;

    /// Index keys of the objects this attachment shares with others.
    fn shared_keys(&self, id: &AttachmentId, objects: &Objects) -> BTreeSet<String>;

    /// Install the attachment's own objects and the shared ones it is the `first` to hold, in one
    /// transaction. An error means the kernel differs from the records: the caller rebuilds.
    fn install(&mut self, id: &AttachmentId, objects: &Objects, first: &BTreeSet<String>) -> Result<()>;

    /// Remove the attachment's own objects and the shared ones it was the `last` to hold, in one
    /// transaction. An error means the kernel differs from the records: the caller rebuilds.
    fn remove(&mut self, id: &AttachmentId, objects: &Objects, last: &BTreeSet<String>) -> Result<()>;

    /// What of `objects` the kernel lacks (CHECK's problems); changes nothing.
    fn verify(&mut self, id: &AttachmentId, objects: &Objects) -> Result<Vec<String>>;

    /// What `wanted` (the config now) has that `recorded` (what ADD installed) lacks.
    fn compare(&self, wanted: &Objects, recorded: &Objects) -> Vec<String>;

    /// Bring the kernel to exactly the union of `all`, removing what no record needs; one line per
    /// repair made.
    fn converge(&mut self, all: &[(&AttachmentId, &Objects)], how: Converge) -> Result<Vec<String>>;

    /// STATUS: can this backend change the kernel at all?
    fn usable(&mut self) -> Result<()>;

    /// IPv6 source NAT of the pods' egress to an uplink's stable address (commands/snat6.rs): the
    /// address each of `wanted` translates to in the kernel now, None where it does not.
    fn snat6_current(&mut self, wanted: &[Snat6]) -> Result<Vec<Option<Ipv6Addr>>>;

    /// Translate each of `set` to its address from now on, replacing another address; stop
    /// translating `clear` (already gone is fine). One transaction.
    fn snat6_change(&mut self, set: &[(Snat6, Ipv6Addr)], clear: &[Snat6]) -> Result<()>;

    /// The index key attachments hold `s` under: the last holder's DEL clears it.
    fn snat6_key(&self, s: &Snat6) -> String;

    /// Things on the node, outside our objects, that defeat `objects` (logged after ADD and CHECK).
    fn node_warnings(&mut self, _objects: &Objects) -> Vec<String> {
        Vec::new()
    }
}

/// The backend of `kind`, configured by `settings`.
pub fn open(kind: Backend, settings: &Settings) -> Box<dyn Firewall> {
    match kind {
        Backend::Iptables => Box::new(iptables::IptablesBackend::new(&settings.iptables, settings.lock_timeout)),
        Backend::Nftables => Box::new(nftables::NftablesBackend::new(&settings.iptables, settings.lock_timeout)),
    }
}

/// The backend new attachments get under `settings`, `auto` resolved: nftables where nf_tables
/// answers a table lookup (the probe's socket then serves the call), iptables otherwise.
pub fn open_for(settings: &Settings) -> Box<dyn Firewall> {
    match settings.backend {
        BackendChoice::Only(kind) => open(kind, settings),
        BackendChoice::Auto if iptables::is_legacy(&settings.iptables) => open(Backend::Iptables, settings),
        BackendChoice::Auto => {
            let mut nft = nftables::NftablesBackend::new(&settings.iptables, settings.lock_timeout);
            match nft.usable() {
                Ok(()) => Box::new(nft),
                Err(e) => {
                    log::info!("backend auto: nf_tables unusable ({e}); using iptables");
                    open(Backend::Iptables, settings)
                }
            }
        }
    }
}

/// Every backend, for the commands that look after the whole node (GC, reconcile, uninstall).
pub fn every(settings: &Settings) -> Vec<Box<dyn Firewall>> {
    [Backend::Iptables, Backend::Nftables].into_iter().map(|k| open(k, settings)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_backend_is_used_as_is_and_auto_keeps_a_legacy_node_on_iptables() {
        let with = |backend, iptables: &str| Settings { backend, iptables: iptables.into(), ..Settings::default() };
        for kind in [Backend::Iptables, Backend::Nftables] {
            assert_eq!(open_for(&with(BackendChoice::Only(kind), "iptables")).kind(), kind);
        }
        // Decided before any probe: nftables cannot see a legacy FORWARD policy.
        let legacy = with(BackendChoice::Auto, "/usr/sbin/iptables-legacy");
        assert_eq!(open_for(&legacy).kind(), Backend::Iptables);
    }

    #[test]
    fn an_nftables_record_from_before_the_accepts_still_loads() {
        let old = serde_json::json!({ "nft": { "own": [], "shared": [], "marks": [] } });
        let objects: Objects = serde_json::from_value(old).expect("an old nftables record's objects load");
        assert!(objects.rules.is_empty() && objects.nft.is_some());
    }
}
