//! The native nftables backend: one table, `inet bridge-nat`, whose chains and rules never change
//! with attachments; a forward is a map element. A call sends one netlink batch (one kernel
//! transaction, no process spawned) of its own elements plus the shared elements, marks and the
//! table it is the first (ADD) or last (DEL) to hold.

mod elements;
mod expr;
mod layout;
mod rules;
mod socket;

pub use elements::Element;
pub use layout::{Mark, TABLE};
pub use socket::Nft;

use super::{Converge, Firewall, Objects};
use crate::config::{AttachmentId, Backend};
use crate::error::{Context, Error, Result};
use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use socket::Tx;
use std::collections::BTreeSet;

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

fn element_key(e: &Element) -> String {
    format!("elem:{e}")
}

fn mark_key(m: &Mark) -> String {
    format!("mark:{}", m.chain())
}

fn contents(objects: &Objects) -> NftRecord {
    objects.nft.clone().unwrap_or_default()
}

#[derive(Default)]
pub struct NftablesBackend {
    nft: Option<Nft>,
}

impl NftablesBackend {
    pub fn new() -> NftablesBackend {
        NftablesBackend::default()
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
        Objects { rules: Vec::new(), nft: Some(nft) }
    }

    fn shared_keys(&self, _id: &AttachmentId, objects: &Objects) -> BTreeSet<String> {
        let n = contents(objects);
        let mut keys: BTreeSet<String> = n.shared.iter().map(element_key).collect();
        keys.extend(n.marks().iter().map(mark_key));
        keys.insert(TABLE_KEY.to_string());
        keys
    }

    fn install(&mut self, _id: &AttachmentId, objects: &Objects, first: &BTreeSet<String>) -> Result<()> {
        let n = contents(objects);
        let nft = self.nft()?;
        let exists = nft.table_exists()?;
        if !exists && !first.contains(TABLE_KEY) {
            return Err(Error::new(
                crate::error::code::FIREWALL,
                format!("table inet {TABLE} vanished while attachments need it"),
            ));
        }
        let mut tx = Tx::default();
        if !exists {
            tx.create_table();
        }
        tx.add_elements(n.shared.iter().filter(|e| !exists || first.contains(&element_key(e))));
        for m in n.marks().iter().filter(|m| !exists || first.contains(&mark_key(m))) {
            tx.add_mark(m);
        }
        tx.add_elements(&n.own);
        nft.commit(tx)
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
            if !gone_marks.is_empty() {
                let live = nft.rules()?;
                for m in &gone_marks {
                    tx.delete_mark(m, &live);
                }
            }
        }
        match nft.commit(tx) {
            Err(e) if table_gone && e.details == "ENOENT" => Ok(()),
            other => other,
        }
    }

    fn verify(&mut self, _id: &AttachmentId, objects: &Objects) -> Result<Vec<String>> {
        let n = contents(objects);
        let elems: Vec<&Element> = n.own.iter().chain(&n.shared).collect();
        socket::check(self.nft()?, &elems, &n.marks())
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
        let nft = self.nft()?;
        let mut repairs = Vec::new();
        if how == Converge::Repair {
            for (id, objects) in all {
                let n = contents(objects);
                let elems: Vec<&Element> = n.own.iter().chain(&n.shared).collect();
                repairs.extend(
                    socket::check(nft, &elems, &n.marks())?.into_iter().map(|p| format!("{}: {p}", id.describe())),
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

    fn usable(&mut self) -> Result<()> {
        self.nft()?.table_exists().map(|_| ())
    }

    fn node_warnings(&mut self) -> Vec<String> {
        let chains = match self.nft().and_then(|nft| nft.dropping_forward_chains()) {
            Ok(chains) => chains,
            Err(e) => return vec![format!("look for forward chains that drop by policy: {e}")],
        };
        if chains.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "forward chain(s) with policy drop: {}; nftables accepts cannot overrule them, so forwarded pod \
             traffic is dropped there (use the iptables backend, or accept the bridge in that firewall)",
            chains.join(", ")
        )]
    }
}

/// Replace the table with exactly what `all` need (no table when none), in one batch.
fn rebuild(nft: &mut Nft, all: &[(&AttachmentId, &Objects)]) -> Result<()> {
    let mut tx = Tx::default();
    if nft.table_exists()? {
        tx.delete_table();
    }
    let (mut own, mut shared, mut marks) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let records: Vec<NftRecord> = all.iter().filter_map(|(_, o)| o.nft.clone()).collect();
    for n in &records {
        own.extend(n.own.iter());
        shared.extend(n.shared.iter());
        marks.extend(n.marks());
    }
    if !records.is_empty() {
        tx.create_table();
        tx.add_elements(shared);
        for m in &marks {
            tx.add_mark(m);
        }
        tx.add_elements(own);
    }
    nft.commit(tx)
}
