//! Which notifications can concern a record: the uplinks and bridges the records name (their links,
//! addresses and routes), the routing tables they hold, ip rules, and the netfilter tables the
//! backends write to. Everything else (a new pod's veth, its link-local address, elements a CNI
//! call adds) is noise that must not start a pass.

use super::notice::Notice;
use crate::state::Record;
use std::collections::{BTreeMap, BTreeSet};

/// What a notice asks the agent to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Concern {
    /// Rules, tables, next hops and uplink settings: checked for the union of the records.
    Routing,
    /// The firewall: checked attachment by attachment, as CHECK does.
    Firewall,
}

/// Netfilter tables our backends write to: our own, and iptables' (iptables-nft) for the
/// iptables backend and for the nftables backend's accepts in a dropping FORWARD.
const NETFILTER_TABLES: &[&str] = &["bridge-nat", "filter", "nat", "mangle"];
const MAIN_TABLE: u32 = 254;

#[derive(Debug, Default)]
pub struct Interest {
    names: BTreeSet<String>,
    tables: BTreeSet<u32>,
    /// ifindex → name of the links named, as last seen (resolved when built, then followed).
    indexes: BTreeMap<u32, String>,
    /// The up/running/lower-up flags last seen per ifindex.
    states: BTreeMap<u32, u32>,
}

impl Interest {
    /// Re-read what the records name, keeping what was learnt of the links that remain.
    pub fn rebuild(&mut self, records: &[&Record]) {
        let mut next = Interest::from_records(records);
        for (index, name) in &next.indexes {
            if self.indexes.get(index) == Some(name) {
                if let Some(state) = self.states.get(index) {
                    next.states.insert(*index, *state);
                }
            }
        }
        *self = next;
    }

    pub fn from_records(records: &[&Record]) -> Interest {
        let mut names = BTreeSet::new();
        let mut tables = BTreeSet::new();
        for r in records {
            names.insert(r.bridge.clone());
            for t in &r.tables {
                tables.insert(t.id);
                names.insert(t.bridge.clone());
                names.insert(t.outbound.interface.clone());
            }
            // net/ipv4/conf/<interface>/src_valid_mark and the like.
            names.extend(r.sysctls.iter().filter_map(|s| sysctl_interface(&s.path)));
        }
        names.retain(|n| !n.is_empty());
        let indexes = names
            .iter()
            .filter_map(|n| nix::net::if_::if_nametoindex(n.as_str()).ok().map(|i| (i, n.clone())))
            .collect();
        Interest { names, tables, indexes, states: BTreeMap::new() }
    }

    /// Whether the records might name what this notice is about without the interest knowing it
    /// yet (a link or table it has never heard of): then the records are worth a fresh look.
    pub fn may_be_stale_for(&self, n: &Notice) -> bool {
        match n {
            Notice::Link { name, .. } => !self.names.contains(name),
            Notice::Route { table, .. } => *table != MAIN_TABLE && !self.tables.contains(table),
            _ => false,
        }
    }

    /// What the notice concerns, if anything; follows links appearing, changing and going.
    pub fn concern(&mut self, n: &Notice) -> Option<Concern> {
        match n {
            Notice::Link { index, name, state, gone } => self.link(*index, name, *state, *gone),
            Notice::Address { index } => self.indexes.contains_key(index).then_some(Concern::Routing),
            Notice::Route { table, oif } => {
                let via_ours = oif.is_some_and(|i| self.indexes.contains_key(&i));
                let unknown_main = oif.is_none() && *table == MAIN_TABLE;
                (self.tables.contains(table) || via_ours || unknown_main).then_some(Concern::Routing)
            }
            Notice::Rule => Some(Concern::Routing),
            Notice::Netfilter { table } => NETFILTER_TABLES.contains(&table.as_str()).then_some(Concern::Firewall),
            Notice::Lost => Some(Concern::Firewall),
        }
    }

    fn link(&mut self, index: u32, name: &str, state: u32, gone: bool) -> Option<Concern> {
        let known = self.indexes.get(&index).cloned();
        if !self.names.contains(name) {
            // A link of ours renamed away counts; anyone else's link does not.
            return known.map(|_| {
                self.indexes.remove(&index);
                self.states.remove(&index);
                Concern::Routing
            });
        }
        if gone {
            self.indexes.remove(&index);
            self.states.remove(&index);
            return Some(Concern::Routing);
        }
        let same = known.as_deref() == Some(name) && self.states.get(&index) == Some(&state);
        self.indexes.insert(index, name.to_string());
        self.states.insert(index, state);
        // A bridge gaining a port re-announces itself with nothing changed that routing reads.
        (!same).then_some(Concern::Routing)
    }
}

fn sysctl_interface(path: &str) -> Option<String> {
    let mut parts = path.split('/');
    parts.find(|p| *p == "conf")?;
    parts.next().filter(|i| !matches!(*i, "all" | "default")).map(str::to_string)
}

#[cfg(test)]
mod tests;
