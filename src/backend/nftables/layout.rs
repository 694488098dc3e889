//! The one nftables table, `inet bridge-nat`: its sets and maps, chains and static rules. The rules
//! never change with attachments; attachments only add and remove set elements (see elements.rs),
//! so both the cost of a call and the per-packet lookup stay constant as attachments grow.
//!
//! In nft syntax (`nft list table inet bridge-nat` prints it):
//!   to-pod:      dnat ip to ip daddr . meta l4proto . th dport map @dnat4-addr   (and -any, and ip6)
//!   nat-pre:     fib daddr type local jump local-in                (never traffic the node forwards)
//!   local-in:    [jump pick-mark], jump to-pod
//!   nat-out:     fib daddr type local jump to-pod
//!   nat-post:    iifname @bridges goto from-bridge; localhost masquerade; iifname "" oifname
//!                @bridges goto from-bridge (what br_netfilter bridges, a hairpin among it)
//!   from-bridge: ip saddr . oifname @own4 goto own-bridge (stays on its bridge: masquerade only if
//!                DNAT'd there, the hairpin), ip saddr . iifname @masq4 masquerade;
//!                for IPv6 first ip6 saddr . iifname @masq6 snat ip6 to oifname map @snat6-src (the
//!                uplink's stable address, see snat6.rs; a failed lookup falls through), then masquerade
//! While some attachment routes by mark (and only then, so that a network without routing adds no
//! hook that sees every packet):
//!   pick-mark:   vmap @mark4-addr / @mark4-any, then iifname . port: vmap @arrive4-addr /
//!                @arrive4-any (the arrival uplink wins); the same for IPv6 with @mark6-* and @arrive6-*
//!   mangle-pre:  established or related: jump restore
//! Per routing mark M with mask K: chain mark-M-K sets the packet's and the connection's mark, and
//! one rule in restore copies it back to the packet (masked, as CONNMARK --nfmask/--ctmask does).
//! Marks are picked in a nat chain, which sees only a connection's first packet; the routing
//! decision follows every prerouting hook, so the mark set there routes that packet.

use super::expr::*;
use crate::netlink::nfnetlink::Attrs;

pub const TABLE: &str = "bridge-nat";
pub const FAMILY_INET: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Ipv4,
    Ipv6,
    Proto,
    Port,
    Ifname,
}

impl FieldType {
    /// nft's datatype ids, so `nft list` prints the elements in their own syntax.
    fn type_id(self) -> u32 {
        match self {
            FieldType::Ipv4 => 7,
            FieldType::Ipv6 => 8,
            FieldType::Proto => 12,
            FieldType::Port => 13,
            FieldType::Ifname => 41,
        }
    }

    pub fn len(self) -> u32 {
        match self {
            FieldType::Ipv4 => 4,
            FieldType::Ipv6 => 16,
            FieldType::Proto => 1,
            FieldType::Port => 2,
            FieldType::Ifname => 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    None,
    /// address . port
    Nat(FieldType),
    /// An address alone: what a source NAT translates to.
    Addr(FieldType),
    Verdict,
}

#[derive(Debug, Clone, Copy)]
pub struct SetSpec {
    pub name: &'static str,
    pub key: &'static [FieldType],
    pub data: DataType,
    pub interval: bool,
}

use FieldType::*;

pub const SETS: &[SetSpec] = &[
    SetSpec { name: "dnat4-addr", key: &[Ipv4, Proto, Port], data: DataType::Nat(Ipv4), interval: false },
    SetSpec { name: "dnat4-any", key: &[Proto, Port], data: DataType::Nat(Ipv4), interval: false },
    SetSpec { name: "dnat6-addr", key: &[Ipv6, Proto, Port], data: DataType::Nat(Ipv6), interval: false },
    SetSpec { name: "dnat6-any", key: &[Proto, Port], data: DataType::Nat(Ipv6), interval: false },
    SetSpec { name: "bridges", key: &[Ifname], data: DataType::None, interval: false },
    SetSpec { name: "own4", key: &[Ipv4, Ifname], data: DataType::None, interval: true },
    SetSpec { name: "own6", key: &[Ipv6, Ifname], data: DataType::None, interval: true },
    SetSpec { name: "masq4", key: &[Ipv4, Ifname], data: DataType::None, interval: true },
    SetSpec { name: "masq6", key: &[Ipv6, Ifname], data: DataType::None, interval: true },
    SetSpec { name: "mark4-addr", key: &[Ipv4, Proto, Port], data: DataType::Verdict, interval: false },
    SetSpec { name: "mark4-any", key: &[Proto, Port], data: DataType::Verdict, interval: false },
    // Arrival uplink . host port → jump to the uplink's mark chain (`replyVia: "arrival"`).
    SetSpec { name: "arrive4-addr", key: &[Ipv4, Ifname, Proto, Port], data: DataType::Verdict, interval: false },
    SetSpec { name: "arrive4-any", key: &[Ifname, Proto, Port], data: DataType::Verdict, interval: false },
    // IPv6 is routed by the same marks: the same maps for its forwards.
    SetSpec { name: "mark6-addr", key: &[Ipv6, Proto, Port], data: DataType::Verdict, interval: false },
    SetSpec { name: "mark6-any", key: &[Proto, Port], data: DataType::Verdict, interval: false },
    SetSpec { name: "arrive6-addr", key: &[Ipv6, Ifname, Proto, Port], data: DataType::Verdict, interval: false },
    SetSpec { name: "arrive6-any", key: &[Ifname, Proto, Port], data: DataType::Verdict, interval: false },
    // Uplink → its stable IPv6 address, for the pods' IPv6 egress (snat6.rs).
    SetSpec { name: "snat6-src", key: &[Ifname], data: DataType::Addr(Ipv6), interval: false },
];

pub fn set_spec(name: &str) -> Option<&'static SetSpec> {
    SETS.iter().find(|s| s.name == name)
}

/// Concatenated fields each take a multiple of 4 bytes.
pub fn key_len(fields: &[FieldType]) -> u32 {
    if fields.len() == 1 {
        return fields[0].len();
    }
    fields.iter().map(|f| (f.len() + 3) & !3).sum()
}

fn concat_type(fields: &[FieldType]) -> u32 {
    fields.iter().fold(0, |t, f| (t << 6) | f.type_id())
}

const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_CONCAT: u32 = 0x80;

impl SetSpec {
    /// NFTA_SET_* attributes of NEWSET.
    pub fn encode(&self, id: u32, a: &mut Attrs) {
        let mut flags = 0;
        if self.interval {
            flags |= NFT_SET_INTERVAL | NFT_SET_CONCAT;
        }
        if self.data != DataType::None {
            flags |= NFT_SET_MAP;
        }
        a.str(1, TABLE).str(2, self.name).be32(3, flags).be32(4, concat_type(self.key)).be32(5, key_len(self.key));
        match self.data {
            DataType::None => {}
            DataType::Nat(addr) => {
                a.be32(6, concat_type(&[addr, Port])).be32(7, key_len(&[addr, Port]));
            }
            DataType::Addr(addr) => {
                a.be32(6, addr.type_id()).be32(7, addr.len());
            }
            DataType::Verdict => {
                a.be32(6, NFT_DATA_VERDICT);
            }
        }
        // Field lengths are only given (and only allowed) for concatenated intervals.
        if self.interval && self.key.len() > 1 {
            // NFTA_SET_DESC { NFTA_SET_DESC_CONCAT { elem { NFTA_SET_FIELD_LEN } ... } }
            a.nest(9, |a| {
                a.nest(2, |a| {
                    for f in self.key {
                        a.nest(1, |a| {
                            a.be32(1, f.len());
                        });
                    }
                });
            });
        }
        a.be32(10, id);
        if self.key == [Ifname] {
            // nft's set userdata: the key is host byte order (a string), so `nft list` shows names.
            a.bytes(13, &[0, 4, 1, 0, 0, 0]);
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Hook {
    pub kind: &'static str,
    pub hooknum: u32,
    pub priority: i32,
}

pub struct ChainSpec {
    pub name: &'static str,
    pub hook: Option<Hook>,
}

const PREROUTING: u32 = 0;
const OUTPUT: u32 = 3;
const POSTROUTING: u32 = 4;

/// The regular chain a new connection to a local address jumps to from outside the node: its
/// routing mark (while marks exist), then its DNAT.
pub const LOCAL_IN: &str = "local-in";
/// Postrouting of traffic from a bridge; its presence tells the layout is this one.
pub const FROM_BRIDGE: &str = "from-bridge";
/// Where postrouting goes for traffic that stays on its own bridge: masqueraded only if DNAT'd.
pub const OWN_BRIDGE: &str = "own-bridge";

pub const CHAINS: &[ChainSpec] = &[
    ChainSpec { name: "to-pod", hook: None },
    ChainSpec { name: "restore", hook: None },
    ChainSpec { name: LOCAL_IN, hook: None },
    ChainSpec { name: OWN_BRIDGE, hook: None },
    ChainSpec { name: FROM_BRIDGE, hook: None },
    ChainSpec { name: "nat-pre", hook: Some(Hook { kind: "nat", hooknum: PREROUTING, priority: -100 }) },
    ChainSpec { name: "nat-out", hook: Some(Hook { kind: "nat", hooknum: OUTPUT, priority: -100 }) },
    ChainSpec { name: "nat-post", hook: Some(Hook { kind: "nat", hooknum: POSTROUTING, priority: 100 }) },
];

/// The regular chain that picks a new connection's routing mark.
pub const PICK_MARK: &str = "pick-mark";

/// The chains that exist only while some attachment routes by mark.
pub const ROUTING_CHAINS: &[ChainSpec] = &[
    ChainSpec { name: PICK_MARK, hook: None },
    ChainSpec { name: "mangle-pre", hook: Some(Hook { kind: "filter", hooknum: PREROUTING, priority: -150 }) },
];

/// NFTA_CHAIN_* attributes of NEWCHAIN.
pub fn encode_chain(name: &str, hook: Option<Hook>, a: &mut Attrs) {
    a.str(1, TABLE).str(3, name);
    if let Some(h) = hook {
        a.nest(4, |a| {
            a.be32(1, h.hooknum).be32(2, h.priority as u32);
        });
        a.str(7, h.kind);
    }
}

/// A rule and the comment that names it; CHECK finds rules by chain and comment.
pub struct RuleSpec {
    pub chain: String,
    pub comment: String,
    pub exprs: Vec<Expr>,
}

impl RuleSpec {
    pub fn new(chain: &str, comment: &str, parts: Vec<Vec<Expr>>) -> RuleSpec {
        RuleSpec { chain: chain.into(), comment: comment.into(), exprs: parts.concat() }
    }

    /// NFTA_RULE_* attributes of NEWRULE; the comment is nft's userdata TLV, so `nft list` shows it.
    pub fn encode(&self, a: &mut Attrs) {
        a.str(1, TABLE).str(2, &self.chain);
        a.nest(4, |a| {
            for e in &self.exprs {
                e.encode(a);
            }
        });
        a.bytes(7, &comment_udata(&self.comment));
    }
}

pub fn comment_udata(text: &str) -> Vec<u8> {
    let mut v = vec![0u8, (text.len() + 1) as u8];
    v.extend(text.as_bytes());
    v.push(0);
    v
}

pub fn comment_of_udata(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (ty, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if ty == 0 {
            return Some(crate::netlink::nfnetlink::str_of(value));
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A routing mark as the table knows it: one chain that sets it, one restore and one save rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl Mark {
    pub fn chain(&self) -> String {
        format!("mark-{:#x}-{:#x}", self.value, self.mask)
    }

    pub fn rules(&self) -> Vec<RuleSpec> {
        let c = self.chain();
        vec![
            // The connection's mark is set with the packet's, so no hook after routing is needed
            // to save it (the only place a mark of ours is set is this chain).
            RuleSpec::new(&c, &c, vec![set_mark(true, self.mask, self.value), set_mark(false, self.mask, self.value)]),
            RuleSpec::new(
                "restore",
                &c,
                vec![mark_is(false, self.mask, self.value), set_mark(true, self.mask, self.value)],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_keys_pad_each_field() {
        assert_eq!(key_len(&[Ipv4, Proto, Port]), 12);
        assert_eq!(key_len(&[Ipv6, Proto, Port]), 24);
        assert_eq!(key_len(&[Ifname]), 16);
        assert_eq!(concat_type(&[Proto, Port]), (12 << 6) | 13);
    }

    #[test]
    fn every_lookup_names_a_declared_set_and_every_rule_a_declared_chain() {
        for r in super::super::rules::static_rules() {
            assert!(CHAINS.iter().any(|c| c.name == r.chain), "chain {}", r.chain);
            for e in &r.exprs {
                if let Expr::Lookup { set, .. } = e {
                    assert!(set_spec(set).is_some(), "set {set}");
                }
            }
        }
    }

    #[test]
    fn comments_round_trip_through_udata() {
        assert_eq!(comment_of_udata(&comment_udata("dnat4-any")).as_deref(), Some("dnat4-any"));
        assert_eq!(comment_of_udata(&[1, 2, 0, 0, 0, 3, b'a', b'b', 0]).as_deref(), Some("ab"));
        assert_eq!(comment_of_udata(&[0, 9, b'a']), None);
    }

    #[test]
    fn mark_chain_names_carry_value_and_mask() {
        let m = Mark { value: 0x10, mask: 0x1fff };
        assert_eq!(m.chain(), "mark-0x10-0x1fff");
        assert_eq!(m.rules().len(), 2);
    }
}
