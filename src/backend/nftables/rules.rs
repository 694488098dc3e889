//! The table's static rules: they never change with attachments, only the sets they look up do.
//! Each is checked against what `nft --debug=netlink` prints for the same rule in nft syntax.
//!
//! Within a rule the cheap tests come first (conntrack state or status, the address family), then
//! the set and FIB lookups: the filter and mangle chains see every packet the node routes, most of
//! them not bridge-nat's, and such a packet should leave a rule at its first cheap test.

use super::expr::*;
use super::layout::RuleSpec;

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
        RuleSpec::new("nat-pre", "local", vec![daddr_is_local(), verdict(Verdict::Jump("to-pod".into()))]),
        RuleSpec::new("nat-out", "local", vec![daddr_is_local(), verdict(Verdict::Jump("to-pod".into()))]),
        RuleSpec::new(
            "nat-post",
            "hairpin4",
            vec![
                v4.clone(),
                dnat_status.clone(),
                one(address(false, true, reg(0))),
                oifname(reg(1)),
                lookup("own4", reg(0), None),
                one(Expr::Masquerade),
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
        RuleSpec::new(
            "nat-post",
            "own4",
            vec![
                v4.clone(),
                one(address(false, true, reg(0))),
                oifname(reg(1)),
                lookup("own4", reg(0), None),
                verdict(Verdict::Return),
            ],
        ),
        RuleSpec::new(
            "nat-post",
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
            "nat-post",
            "hairpin6",
            vec![
                v6.clone(),
                dnat_status.clone(),
                one(address(true, true, reg(0))),
                oifname(reg(4)),
                lookup("own6", reg(0), None),
                one(Expr::Masquerade),
            ],
        ),
        RuleSpec::new(
            "nat-post",
            "own6",
            vec![
                v6.clone(),
                one(address(true, true, reg(0))),
                oifname(reg(4)),
                lookup("own6", reg(0), None),
                verdict(Verdict::Return),
            ],
        ),
        RuleSpec::new(
            "nat-post",
            "masq6",
            vec![
                v6.clone(),
                one(address(true, true, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(4))),
                lookup("masq6", reg(0), None),
                one(Expr::Masquerade),
            ],
        ),
        RuleSpec::new(
            "filter-fwd",
            "from-bridge",
            vec![
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                lookup("bridges", reg(0), None),
                verdict(Verdict::Accept),
            ],
        ),
        RuleSpec::new(
            "filter-fwd",
            "to-bridge-established",
            vec![
                ct_has(CtKey::State, CT_STATE_ESTABLISHED_RELATED),
                oifname(reg(0)),
                lookup("bridges", reg(0), None),
                verdict(Verdict::Accept),
            ],
        ),
        RuleSpec::new(
            "filter-fwd",
            "forward4",
            vec![
                dnat_status.clone(),
                v4.clone(),
                oifname(reg(0)),
                lookup("bridges", reg(0), None),
                one(address(false, false, reg(0))),
                proto_port(reg(1)),
                lookup("fwd4", reg(0), None),
                verdict(Verdict::Accept),
            ],
        ),
        RuleSpec::new(
            "filter-fwd",
            "forward6",
            vec![
                dnat_status,
                v6.clone(),
                oifname(reg(0)),
                lookup("bridges", reg(0), None),
                one(address(true, false, reg(0))),
                proto_port(reg(4)),
                lookup("fwd6", reg(0), None),
                verdict(Verdict::Accept),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "restore",
            vec![ct_has(CtKey::State, CT_STATE_ESTABLISHED_RELATED), verdict(Verdict::Jump("restore".into()))],
        ),
        RuleSpec::new(
            "mangle-pre",
            "mark4-addr",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v4.clone(),
                daddr_is_local(),
                one(address(false, false, reg(0))),
                proto_port(reg(1)),
                lookup("mark4-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "mark4-any",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v4.clone(),
                daddr_is_local(),
                proto_port(reg(0)),
                lookup("mark4-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "arrive4-addr",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v4.clone(),
                daddr_is_local(),
                one(address(false, false, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(1))),
                proto_port(reg(5)),
                lookup("arrive4-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "arrive4-any",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v4,
                daddr_is_local(),
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                proto_port(reg(4)),
                lookup("arrive4-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "mark6-addr",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v6.clone(),
                daddr_is_local(),
                one(address(true, false, reg(0))),
                proto_port(reg(4)),
                lookup("mark6-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "mark6-any",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v6.clone(),
                daddr_is_local(),
                proto_port(reg(0)),
                lookup("mark6-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "arrive6-addr",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v6.clone(),
                daddr_is_local(),
                one(address(true, false, reg(0))),
                one(Expr::MetaLoad(MetaKey::IifName, reg(4))),
                proto_port(reg(8)),
                lookup("arrive6-addr", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-pre",
            "arrive6-any",
            vec![
                ct_has(CtKey::State, CT_STATE_NEW),
                v6,
                daddr_is_local(),
                one(Expr::MetaLoad(MetaKey::IifName, reg(0))),
                proto_port(reg(4)),
                lookup("arrive6-any", reg(0), Some(REG_VERDICT)),
            ],
        ),
        RuleSpec::new(
            "mangle-post",
            "save",
            vec![ct_has(CtKey::State, CT_STATE_NEW), verdict(Verdict::Jump("save".into()))],
        ),
    ]
}
