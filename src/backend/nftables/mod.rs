//! The native nftables backend: one table, `inet bridge-nat`, whose chains and rules never change
//! with attachments; a forward is a map element. A call sends one netlink batch (one kernel
//! transaction, no process spawned) of its own elements plus the shared elements, marks and the
//! table it is the first (ADD) or last (DEL) to hold. Where iptables' FORWARD drops by policy, the
//! network's accepts there too (accepts.rs).

mod accepts;
mod elements;
mod expr;
mod layout;
mod rules;
mod snat6;
mod socket;
mod verify;

pub use accepts::CHAIN as ACCEPT_CHAIN;
pub use elements::Element;
pub use layout::{Mark, TABLE};
pub use socket::Nft;

use super::iptables::{nft_variant, Current, Family, Iptables, Rule};
use super::{Converge, Firewall, Ipv6Addr, Objects, Snat6};
use crate::config::{AttachmentId, Backend};
use crate::error::{Context, Error, Result};
use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use socket::Tx;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use verify::Layout;

/// What one attachment put into the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftRecord {
    pub own: Vec<Element>,
    pub shared: Vec<Element>,
    /// (mark, mask) pairs whose chains this attachment's forwards jump to.
    pub marks: Vec<(u32, u32)>,
}

impl NftRecord {
    fn marks(&self) -> Vec<Mark> {
        self.marks.iter().map(|&(value, mask)| Mark { value, mask }).collect()
    }
}

const TABLE_KEY: &str = "table";
/// Held by every attachment with a mark: the routing chains go with the last of them.
const ROUTING_KEY: &str = "routing";

fn element_key(e: &Element) -> String {
    format!("elem:{e}")
}

fn mark_key(m: &Mark) -> String {
    format!("mark:{}", m.chain())
}

/// What the record holds, less elements of sets this layout no longer has (a record written by an
/// earlier bridge-nat, whose table a rebuild replaces).
fn contents(objects: &Objects) -> NftRecord {
    let mut n = objects.nft.clone().unwrap_or_default();
    n.own.retain(|e| layout::set_spec(&e.set).is_some());
    n.shared.retain(|e| layout::set_spec(&e.set).is_some());
    n
}

pub struct NftablesBackend {
    nft: Option<Nft>,
    /// The accepts go through iptables-nft: its FORWARD is the one whose policy nf_tables reports.
    ipt: Iptables,
    /// The accept chain per family as last read, until this backend changes it: a node-wide
    /// check of many records reads it once.
    accepts_read: BTreeMap<Family, Current>,
}

impl NftablesBackend {
    /// `iptables` and `wait` as configured for the iptables backend (its nf_tables variant is used).
    pub fn new(iptables: &str, wait: Duration) -> NftablesBackend {
        NftablesBackend { nft: None, ipt: Iptables::new(&nft_variant(iptables), wait), accepts_read: BTreeMap::new() }
    }

    /// One socket per call, opened on first use.
    fn nft(&mut self) -> Result<&mut Nft> {
        if self.nft.is_none() {
            self.nft = Some(Nft::open()?);
        }
        Ok(self.nft.as_mut().expect("just opened"))
    }
}

impl Firewall for NftablesBackend {
    fn kind(&self) -> Backend {
        Backend::Nftables
    }

    fn render(&self, plan: &Plan) -> Objects {
        let c = elements::render(plan);
        let nft = NftRecord {
            own: c.own.into_iter().collect(),
            shared: c.shared.into_iter().collect(),
            marks: c.marks.iter().map(|m| (m.value, m.mask)).collect(),
        };
        Objects { rules: accepts::render(plan), nft: Some(nft) }
    }

    fn shared_keys(&self, _id: &AttachmentId, objects: &Objects) -> BTreeSet<String> {
        let n = contents(objects);
        let mut keys: BTreeSet<String> = n.shared.iter().map(element_key).collect();
        keys.extend(n.marks().iter().map(mark_key));
        if !n.marks.is_empty() {
            keys.insert(ROUTING_KEY.to_string());
        }
        keys.insert(TABLE_KEY.to_string());
        keys.extend(objects.rules.iter().map(accepts::key));
        keys
    }

    fn install(&mut self, _id: &AttachmentId, objects: &Objects, first: &BTreeSet<String>) -> Result<()> {
        let n = contents(objects);
        let nft = self.nft()?;
        let exists = match verify::layout(nft)? {
            Layout::Current => true,
            Layout::Absent if first.contains(TABLE_KEY) => false,
            Layout::Absent => {
                return Err(firewall_error(format!("table inet {TABLE} vanished while attachments need it")))
            }
            // The caller rebuilds the table from every record.
            Layout::Earlier => {
                return Err(firewall_error(format!("table inet {TABLE} has an earlier bridge-nat's layout")))
            }
        };
        let mut tx = Tx::default();
        if !exists {
            tx.create_table();
        }
        if !n.marks.is_empty() && (!exists || first.contains(ROUTING_KEY)) {
            tx.add_routing();
        }
        tx.add_elements(n.shared.iter().filter(|e| !exists || first.contains(&element_key(e))));
        for m in n.marks().iter().filter(|m| !exists || first.contains(&mark_key(m))) {
            tx.add_mark(m);
        }
        tx.add_elements(&n.own);
        nft.commit(tx)?;
        let first: Vec<&Rule> = objects.rules.iter().filter(|r| first.contains(&accepts::key(r))).collect();
        self.install_accepts(&first)
    }

    fn remove(&mut self, _id: &AttachmentId, objects: &Objects, last: &BTreeSet<String>) -> Result<()> {
        let n = contents(objects);
        let nft = self.nft()?;
        let mut tx = Tx::default();
        let table_gone = last.contains(TABLE_KEY);
        if table_gone {
            tx.delete_table();
        } else {
            tx.delete_elements(&n.own);
            tx.delete_elements(n.shared.iter().filter(|e| last.contains(&element_key(e))));
            let gone_marks: Vec<Mark> = n.marks().into_iter().filter(|m| last.contains(&mark_key(m))).collect();
            let routing_gone = last.contains(ROUTING_KEY);
            if !gone_marks.is_empty() || routing_gone {
                let live = nft.rules()?;
                if routing_gone {
                    tx.delete_routing(&live);
                }
                for m in &gone_marks {
                    tx.delete_mark(m, &live);
                }
            }
        }
        match nft.commit(tx) {
            Err(e) if table_gone && e.details == "ENOENT" => {}
            other => other?,
        }
        let last: Vec<&Rule> = objects.rules.iter().filter(|r| last.contains(&accepts::key(r))).collect();
        self.remove_accepts(&last)
    }

    fn verify(&mut self, _id: &AttachmentId, objects: &Objects) -> Result<Vec<String>> {
        let n = contents(objects);
        let elems: Vec<&Element> = n.own.iter().chain(&n.shared).collect();
        let mut problems = verify::check(self.nft()?, &elems, &n.marks())?;
        problems.extend(self.verify_accepts(&objects.rules)?);
        Ok(problems)
    }

    fn compare(&self, wanted: &Objects, recorded: &Objects) -> Vec<String> {
        let (wanted, recorded) = (contents(wanted), contents(recorded));
        let have: BTreeSet<&Element> = recorded.own.iter().chain(&recorded.shared).collect();
        wanted
            .own
            .iter()
            .chain(&wanted.shared)
            .filter(|e| !have.contains(e))
            .map(|e| format!("config asks for an element that was not installed: {e}"))
            .collect()
    }

    fn converge(&mut self, all: &[(&AttachmentId, &Objects)], how: Converge) -> Result<Vec<String>> {
        let mut repairs = self.converge_table(all, how)?;
        let wanted: BTreeSet<&Rule> = all.iter().flat_map(|(_, o)| o.rules.iter()).collect();
        repairs.extend(self.converge_accepts(&wanted).context(format!("converge chain {ACCEPT_CHAIN}"))?);
        Ok(repairs)
    }

    fn usable(&mut self) -> Result<()> {
        self.nft()?.table_exists().map(|_| ())
    }

    fn snat6_current(&mut self, wanted: &[Snat6]) -> Result<Vec<Option<Ipv6Addr>>> {
        snat6::current(self, wanted)
    }

    fn snat6_change(&mut self, set: &[(Snat6, Ipv6Addr)], clear: &[Snat6]) -> Result<()> {
        snat6::change(self, set, clear)
    }

    fn snat6_key(&self, s: &Snat6) -> String {
        snat6::key(s)
    }

    fn node_warnings(&mut self, objects: &Objects) -> Vec<String> {
        let families = accepts::families(&objects.rules);
        match self.forward_drops_without_accepts(&families) {
            Ok(chains) if chains.is_empty() => Vec::new(),
            Ok(chains) => vec![format!(
                "{} drop(s) by policy and hold(s) no accepts of bridge-nat yet: forwarded pod traffic dies \
                 there until `bridge-nat reconcile` (or the watch agent) adds them",
                chains.join(", ")
            )],
            Err(e) => vec![format!("look up iptables' FORWARD policy: {e}")],
        }
    }
}

impl NftablesBackend {
    /// The table: repaired where it differs from the records, or rebuilt.
    fn converge_table(&mut self, all: &[(&AttachmentId, &Objects)], how: Converge) -> Result<Vec<String>> {
        let nft = self.nft()?;
        let mut repairs = Vec::new();
        if how == Converge::Repair {
            for (id, objects) in all {
                let n = contents(objects);
                let elems: Vec<&Element> = n.own.iter().chain(&n.shared).collect();
                repairs.extend(
                    verify::check(nft, &elems, &n.marks())?.into_iter().map(|p| format!("{}: {p}", id.describe())),
                );
            }
            let stray_table = all.is_empty() && nft.table_exists()?;
            if repairs.is_empty() && !stray_table {
                return Ok(repairs);
            }
            if stray_table {
                repairs.push(format!("table inet {TABLE} is there but no attachment needs it"));
            }
        }
        rebuild(nft, all).context(format!("rebuild table inet {TABLE} from the records"))?;
        if how == Converge::Rebuild {
            repairs.push(format!("rebuilt table inet {TABLE} for {} attachment(s)", all.len()));
        }
        Ok(repairs)
    }
}

fn firewall_error(msg: String) -> Error {
    Error::new(crate::error::code::FIREWALL, msg)
}

/// Replace the table with exactly what `all` need (no table when none), in one batch.
fn rebuild(nft: &mut Nft, all: &[(&AttachmentId, &Objects)]) -> Result<()> {
    let mut tx = Tx::default();
    if nft.table_exists()? {
        tx.delete_table();
    }
    let (mut own, mut shared, mut marks) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let records: Vec<NftRecord> = all.iter().filter(|(_, o)| o.nft.is_some()).map(|(_, o)| contents(o)).collect();
    for n in &records {
        own.extend(n.own.iter());
        shared.extend(n.shared.iter());
        marks.extend(n.marks());
    }
    if !records.is_empty() {
        tx.create_table();
        if !marks.is_empty() {
            tx.add_routing();
        }
        tx.add_elements(shared);
        for m in &marks {
            tx.add_mark(m);
        }
        tx.add_elements(own);
    }
    nft.commit(tx)
}
