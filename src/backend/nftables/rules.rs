//! The table's rules: they never change with attachments, only the sets they look up do (the
//! routing ones come and go with the first and last mark). Each is checked against what
//! `nft --debug=netlink` prints for the same rule in nft syntax.
//!
//! Every packet the node routes costs as little as the table can make it: the nat chains see only
//! a connection's first packet, each family's rules leave at their first test (the address family),
//! and the one hook that sees every packet (mangle-pre, restoring marks) exists only while marks do.

use super::expr::*;
use super::layout::{RuleSpec, FROM_BRIDGE, LOCAL_IN, OWN_BRIDGE, PICK_MARK};

fn one(e: Expr) -> Vec<Expr> {
    vec![e]
}

fn lookup(set: &str, sreg: u32, dreg: Option<u32>) -> Vec<Expr> {
    one(Expr::Lookup { set: set.into(), sreg, dreg })
}

fn verdict(v: Verdict) -> Vec<Expr> {
    one(Expr::Verdict(v))
}

fn oifname(dreg: u32) -> Vec<Expr> {
    one(Expr::MetaLoad(MetaKey::OifName, dreg))
}

/// The static rules, in chain order.
pub fn static_rules() -> Vec<RuleSpec> {
    let (v4, v6) = (nfproto_is(NFPROTO_IPV4), nfproto_is(NFPROTO_IPV6));
    let dnat = |v6: bool, port: u32| one(Expr::Dnat { v6, addr: reg(0), port });
    let dnat_status = ct_has(CtKey::Status, CT_STATUS_DNAT);
    vec![
        RuleSpec::new(
            "to-pod",
            "dnat4-addr",
            vec![
                v4.clone(),
                one(address(false, false, reg(0))),
                proto_port(reg(1)),
                lookup("dnat4-addr", reg(0), Some(reg(0))),
                dnat(false, reg(1)),
            ],
        ),
        RuleSpec::new(
            "to-pod",
            "dnat4-any",
            vec![v4.clone(), proto_port(reg(0)), lookup("dnat4-any", reg(0), Some(reg(0))), dnat(false, reg(1))],
        ),
        RuleSpec::new(
            "to-pod",
            "dnat6-addr",
            vec![
                v6.clone(),
                one(address(true, false, reg(0))),
                proto_port(reg(4)),
                lookup("dnat6-addr", reg(0), Some(reg(0))),
                dnat(true, reg(4)),
            ],
        ),
        RuleSpec::new(
            "to-pod",
            "dnat6-any",
            vec![v6.clone(), proto_port(reg(0)), lookup("dnat6-any", reg(0), Some(reg(0))), dnat(true, reg(4))],
        ),
        // One FIB lookup per new connection: the arrival's mark, then the DNAT. A mark set in
        // this chain routes the packet (routing follows the prerouting hooks), and a nat chain
        // sees only a connection's first packet, which is the only one whose mark is picked.
        RuleSpec::new("nat-pre", "local", vec![daddr_is_local(), verdict(Verdict::Jump(LOCAL_IN.into()))]),
        RuleSpec::new("nat-out", "local", vec![daddr_is_local(), verdict(Verdict::Jump("to-pod".into()))]),
        // Every translation but localhost's is of traffic from a bridge: one hash lookup lets
        // every other new connection through (those DNAT'd from outside above all), without the
        // interval lookups below (whose AVX2 code also saves the FPU state). What br_netfilter
        // bridges (a hairpin DNAT'd back to its own bridge among it) reaches postrouting with no
        // input interface and the bridge as output.
        RuleSpec::new(
            "nat-post",
            "from-bridge",
            vec![
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                lookup("bridges", reg(0), None),
                verdict(Verdict::Goto(FROM_BRIDGE.into())),
            ],
        ),
        RuleSpec::new(
            "nat-post",
            "localhost4",
            vec![
                v4.clone(),
                one(Expr::Payload { base: Base::Network, offset: 12, len: 1, dreg: reg(0) }),
                one(Expr::Cmp { reg: reg(0), eq: true, data: vec![127] }),
                oifname(reg(0)),
                lookup("bridges", reg(0), None),
                dnat_status.clone(),
                one(Expr::Masquerade),
            ],
        ),
        // After localhost's: the node's own connections also come with no input interface.
        RuleSpec::new(
            "nat-post",
            "bridged",
            vec![
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                one(Expr::Cmp { reg: reg(0), eq: true, data: vec![0] }),
                oifname(reg(0)),
                lookup("bridges", reg(0), None),
                verdict(Verdict::Goto(FROM_BRIDGE.into())),
            ],
        ),
        // From a bridge: traffic that stays on its own bridge is not masqueraded, unless it was
        // DNAT'd there (hairpin): one lookup decides both. Then the pods' egress.
        RuleSpec::new(
            FROM_BRIDGE,
            "own4",
            vec![
                v4.clone(),
                one(address(false, true, reg(0))),
                oifname(reg(1)),
                lookup("own4", reg(0), None),
                verdict(Verdict::Goto(OWN_BRIDGE.into())),
            ],
        ),
        RuleSpec::new(
            FROM_BRIDGE,
            "masq4",
            vec![
                v4.clone(),
                one(address(false, true, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(1))),
                lookup("masq4", reg(0), None),
                one(Expr::Masquerade),
            ],
        ),
        RuleSpec::new(
            FROM_BRIDGE,
            "own6",
            vec![
                v6.clone(),
                one(address(true, true, reg(0))),
                oifname(reg(4)),
                lookup("own6", reg(0), None),
                verdict(Verdict::Goto(OWN_BRIDGE.into())),
            ],
        ),
        // Before the masquerade: where the uplink has a stable address (snat6.rs), the pods' IPv6
        // egress is translated to it; a failed lookup falls through to the masquerade.
        RuleSpec::new(
            FROM_BRIDGE,
            "snat6",
            vec![
                v6.clone(),
                one(address(true, true, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(4))),
                lookup("masq6", reg(0), None),
                oifname(reg(0)),
                lookup("snat6-src", reg(0), Some(reg(0))),
                one(Expr::Snat { v6: true, addr: reg(0) }),
            ],
        ),
        RuleSpec::new(
            FROM_BRIDGE,
            "masq6",
            vec![
                v6.clone(),
                one(address(true, true, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(4))),
                lookup("masq6", reg(0), None),
                one(Expr::Masquerade),
            ],
        ),
        RuleSpec::new(OWN_BRIDGE, "hairpin", vec![dnat_status, one(Expr::Masquerade)]),
        RuleSpec::new(LOCAL_IN, "to-pod", vec![verdict(Verdict::Jump("to-pod".into()))]),
    ]
}

/// The rules that exist only while some attachment routes by mark (layout::ROUTING_CHAINS), in
/// chain order; `routing_jump` joins them to the table.
pub fn routing_rules() -> Vec<RuleSpec> {
    let (v4, v6) = (nfproto_is(NFPROTO_IPV4), nfproto_is(NFPROTO_IPV6));
    vec![
        // Every packet of a connection after its first: only the restore of its mark.
        RuleSpec::new(
            "mangle-pre",
            "restore",
            vec![ct_has(CtKey::State, CT_STATE_ESTABLISHED_RELATED), verdict(Verdict::Jump("restore".into()))],
        ),
        RuleSpec::new(
            PICK_MARK,
            "mark4-addr",
            vec![
                v4.clone(),
                one(address(false, false, reg(0))),
                proto_port(reg(1)),
                lookup("mark4-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            PICK_MARK,
            "mark4-any",
            vec![v4.clone(), proto_port(reg(0)), lookup("mark4-any", reg(0), Some(REG_VERDICT))],
        ),
        RuleSpec::new(
            PICK_MARK,
            "arrive4-addr",
            vec![
                v4.clone(),
                one(address(false, false, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(1))),
                proto_port(reg(5)),
                lookup("arrive4-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            PICK_MARK,
            "arrive4-any",
            vec![
                v4,
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                proto_port(reg(4)),
                lookup("arrive4-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            PICK_MARK,
            "mark6-addr",
            vec![
                v6.clone(),
                one(address(true, false, reg(0))),
                proto_port(reg(4)),
                lookup("mark6-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            PICK_MARK,
            "mark6-any",
            vec![v6.clone(), proto_port(reg(0)), lookup("mark6-any", reg(0), Some(REG_VERDICT))],
        ),
        RuleSpec::new(
            PICK_MARK,
            "arrive6-addr",
            vec![
                v6.clone(),
                one(address(true, false, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(4))),
                proto_port(reg(8)),
                lookup("arrive6-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            PICK_MARK,
            "arrive6-any",
            vec![
                v6,
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                proto_port(reg(4)),
                lookup("arrive6-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
    ]
}

/// local-in's first rule while marks exist: a new connection's mark before its DNAT.
pub fn routing_jump() -> RuleSpec {
    RuleSpec::new(LOCAL_IN, PICK_MARK, vec![verdict(Verdict::Jump(PICK_MARK.into()))])
}
