//! What CHECK finds wrong with the table: the rules this layout needs (the routing ones while
//! marks exist), and one attachment's elements with their data.

use super::elements::{self, Element};
use super::layout::{Mark, TABLE};
use super::socket::Nft;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Absent,
    Current,
    /// Made by an earlier bridge-nat: only a rebuild from the records brings it to this one.
    Earlier,
}

/// Whether the table is there, and in this bridge-nat's layout: one lookup (of the chain only
/// this layout has) on the common path, a second to tell an absent table from an earlier one.
pub fn layout(nft: &mut Nft) -> Result<Layout> {
    if nft.chain_exists(super::layout::FROM_BRIDGE)? {
        return Ok(Layout::Current);
    }
    Ok(if nft.table_exists()? { Layout::Earlier } else { Layout::Absent })
}

/// What CHECK finds wrong with the table for one attachment's elements and marks.
pub fn check(nft: &mut Nft, elements: &[&Element], marks: &[Mark]) -> Result<Vec<String>> {
    match layout(nft)? {
        Layout::Absent => return Ok(vec![format!("nftables table inet {TABLE} is missing")]),
        Layout::Earlier => {
            return Ok(vec![format!(
                "nftables table inet {TABLE} has an earlier bridge-nat's layout (`bridge-nat reconcile` rebuilds it)"
            )])
        }
        Layout::Current => {}
    }
    let mut problems = Vec::new();
    let live = nft.rules()?;
    let mut expected: Vec<(String, String)> =
        super::rules::static_rules().into_iter().map(|r| (r.chain, r.comment)).collect();
    if !marks.is_empty() {
        expected.extend(super::rules::routing_rules().into_iter().map(|r| (r.chain, r.comment)));
        let jump = super::rules::routing_jump();
        expected.push((jump.chain, jump.comment));
    }
    for m in marks {
        expected.extend(m.rules().into_iter().map(|r| (r.chain, r.comment)));
    }
    for (chain, comment) in expected {
        if !live.iter().any(|r| r.chain == chain && r.comment == comment) {
            problems.push(format!("missing nftables rule {comment} in chain {chain}"));
        }
    }
    for e in elements {
        match nft.element(e)? {
            None => problems.push(format!("missing nftables element {e}")),
            Some(data) => {
                let want = match &e.data[..] {
                    [elements::Value::Jump(chain)] => chain.clone().into_bytes(),
                    _ => e.data_bytes(),
                };
                if data != want {
                    problems.push(format!("nftables element {e} has other data"));
                }
            }
        }
    }
    Ok(problems)
}
