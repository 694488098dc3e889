//! IPv6 source NAT to uplinks' stable addresses (commands/snat6.rs) in the table: map
//! `snat6-src`, uplink → address, looked up by rule "snat6" of nat-post before the masquerade.
//! Keyed by uplink alone (the subnets are `@masq6`'s), so every network leaving by an uplink shares
//! its element. A rebuilt table starts without elements; reconcile puts them back.

use super::elements::{Element, Value};
use super::socket::{Nft, Tx};
use super::NftablesBackend;
use crate::error::Result;
use crate::plan::snat6::Snat6;
use std::collections::BTreeMap;
use std::net::Ipv6Addr;

const MAP: &str = "snat6-src";

fn element(uplink: &str, address: Option<Ipv6Addr>) -> Element {
    Element {
        set: MAP.into(),
        key: vec![Value::Ifname(uplink.into())],
        data: address.map(|a| vec![Value::Ip(a.into())]).unwrap_or_default(),
    }
}

/// The uplink's element as the kernel holds it.
fn read(nft: &mut Nft, uplink: &str) -> Result<Option<Ipv6Addr>> {
    Ok(nft.element(&element(uplink, None))?.and_then(|d| <[u8; 16]>::try_from(d.as_slice()).ok()).map(Ipv6Addr::from))
}

/// One element per uplink, whichever networks leave by it: held under the uplink's name.
pub fn key(s: &Snat6) -> String {
    format!("snat6:nft:{}", s.uplink)
}

pub fn current(b: &mut NftablesBackend, wanted: &[Snat6]) -> Result<Vec<Option<Ipv6Addr>>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let nft = b.nft()?;
    if !nft.table_exists()? {
        return Ok(vec![None; wanted.len()]);
    }
    wanted.iter().map(|s| read(nft, &s.uplink)).collect()
}

pub fn change(b: &mut NftablesBackend, set: &[(Snat6, Ipv6Addr)], clear: &[Snat6]) -> Result<()> {
    if set.is_empty() && clear.is_empty() {
        return Ok(());
    }
    let nft = b.nft()?;
    if !nft.table_exists()? {
        // Nothing to clear; nothing can be set before an attachment has created the table.
        return match set.first() {
            None => Ok(()),
            Some((s, _)) => Err(crate::error::Error::new(
                crate::error::code::FIREWALL,
                format!("table inet {} is missing, so {s} cannot be set", super::TABLE),
            )),
        };
    }
    let mut tx = Tx::default();
    let wanted: BTreeMap<&str, Ipv6Addr> = set.iter().map(|(s, a)| (s.uplink.as_str(), *a)).collect();
    for (uplink, address) in &wanted {
        match read(nft, uplink)? {
            Some(a) if a == *address => continue,
            Some(_) => tx.delete_elements([&element(uplink, None)]),
            None => {}
        }
        tx.add_elements([&element(uplink, Some(*address))]);
    }
    for s in clear.iter().filter(|s| !wanted.contains_key(s.uplink.as_str())) {
        if read(nft, &s.uplink)?.is_some() {
            tx.delete_elements([&element(&s.uplink, None)]);
        }
    }
    if tx.is_empty() {
        return Ok(());
    }
    nft.commit(tx)
}
