//! nf_tables rule expressions, encoded as the kernel reads them (`nft --debug=netlink` prints the
//! same expressions back, which is how the layout was checked).

use crate::netlink::nfnetlink::Attrs;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// 32-bit registers; concatenated keys occupy consecutive ones.
pub const REG_VERDICT: u32 = 0;
pub fn reg(n: u32) -> u32 {
    8 + n
}

#[derive(Debug, Clone, Copy)]
pub enum MetaKey {
    Mark = 3,
    IifName = 6,
    OifName = 7,
    NfProto = 15,
    L4Proto = 16,
}

#[derive(Debug, Clone, Copy)]
pub enum CtKey {
    State = 0,
    Status = 2,
    Mark = 3,
}

#[derive(Debug, Clone, Copy)]
pub enum Base {
    Network = 1,
    Transport = 2,
}

#[derive(Debug, Clone)]
pub enum Verdict {
    Jump(String),
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
        }
    }

    pub fn encode(&self, a: &mut Attrs) {
        a.nest(NFTA_DATA_VERDICT, |a| {
            a.be32(NFTA_VERDICT_CODE, self.code() as u32);
            let (Verdict::Jump(chain) | Verdict::Goto(chain)) = self;
            a.str(NFTA_VERDICT_CHAIN, chain);
        });
    }
}

#[derive(Debug, Clone)]
pub enum Expr {
    MetaLoad(MetaKey, u32),
    MetaSet(MetaKey, u32),
    CtLoad(CtKey, u32),
    CtSet(CtKey, u32),
    Payload {
        base: Base,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// reg = (reg & mask) ^ xor
    Bitwise {
        reg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Cmp {
        reg: u32,
        eq: bool,
        data: Vec<u8>,
    },
    Lookup {
        set: String,
        sreg: u32,
        dreg: Option<u32>,
    },
    /// fib daddr type → reg
    FibDaddrType(u32),
    /// dnat to the address in `addr` and the port in `port`
    Dnat {
        v6: bool,
        addr: u32,
        port: u32,
    },
    /// snat to the address in `addr`
    Snat {
        v6: bool,
        addr: u32,
    },
    Masquerade,
    Verdict(Verdict),
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::MetaLoad(..) | Expr::MetaSet(..) => "meta",
            Expr::CtLoad(..) | Expr::CtSet(..) => "ct",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Cmp { .. } => "cmp",
            Expr::Lookup { .. } => "lookup",
            Expr::FibDaddrType(_) => "fib",
            Expr::Dnat { .. } | Expr::Snat { .. } => "nat",
            Expr::Masquerade => "masq",
            Expr::Verdict(_) => "immediate",
        }
    }

    fn encode_data(&self, a: &mut Attrs) {
        match self {
            // NFTA_META_DREG 1, KEY 2, SREG 3
            Expr::MetaLoad(k, r) => a.be32(2, *k as u32).be32(1, *r),
            Expr::MetaSet(k, r) => a.be32(2, *k as u32).be32(3, *r),
            // NFTA_CT_DREG 1, KEY 2, SREG 4
            Expr::CtLoad(k, r) => a.be32(2, *k as u32).be32(1, *r),
            Expr::CtSet(k, r) => a.be32(2, *k as u32).be32(4, *r),
            // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4
            Expr::Payload { base, offset, len, dreg } => {
                a.be32(1, *dreg).be32(2, *base as u32).be32(3, *offset).be32(4, *len)
            }
            // NFTA_BITWISE_SREG 1, DREG 2, LEN 3, MASK 4, XOR 5
            Expr::Bitwise { reg, mask, xor } => a
                .be32(1, *reg)
                .be32(2, *reg)
                .be32(3, mask.len() as u32)
                .nest(4, |a| {
                    a.bytes(NFTA_DATA_VALUE, mask);
                })
                .nest(5, |a| {
                    a.bytes(NFTA_DATA_VALUE, xor);
                }),
            // NFTA_CMP_SREG 1, OP 2 (EQ 0, NEQ 1), DATA 3
            Expr::Cmp { reg, eq, data } => a.be32(1, *reg).be32(2, u32::from(!*eq)).nest(3, |a| {
                a.bytes(NFTA_DATA_VALUE, data);
            }),
            // NFTA_LOOKUP_SET 1, SREG 2, DREG 3
            Expr::Lookup { set, sreg, dreg } => {
                a.str(1, set).be32(2, *sreg);
                if let Some(d) = dreg {
                    a.be32(3, *d);
                }
                a
            }
            // NFTA_FIB_DREG 1, RESULT 2 (ADDRTYPE 3), FLAGS 3 (DADDR 2)
            Expr::FibDaddrType(r) => a.be32(1, *r).be32(2, 3).be32(3, 2),
            // NFTA_NAT_TYPE 1 (DNAT 1), FAMILY 2, REG_ADDR_MIN 3, MAX 4, REG_PROTO_MIN 5, MAX 6, FLAGS 7
            Expr::Dnat { v6, addr, port } => a
                .be32(1, 1)
                .be32(2, if *v6 { 10 } else { 2 })
                .be32(3, *addr)
                .be32(4, *addr)
                .be32(5, *port)
                .be32(6, *port)
                .be32(7, 0x3),
            // NFT_NAT_SNAT 0; the kernel maps the address alone when only REG_ADDR_* is given.
            Expr::Snat { v6, addr } => a.be32(1, 0).be32(2, if *v6 { 10 } else { 2 }).be32(3, *addr).be32(4, *addr),
            Expr::Masquerade => a,
            // NFTA_IMMEDIATE_DREG 1, DATA 2
            Expr::Verdict(v) => a.be32(1, REG_VERDICT).nest(2, |a| v.encode(a)),
        };
    }

    pub fn encode(&self, a: &mut Attrs) {
        a.nest(NFTA_LIST_ELEM, |a| {
            a.str(NFTA_EXPR_NAME, self.name());
            a.nest(NFTA_EXPR_DATA, |a| self.encode_data(a));
        });
    }
}

// Building blocks shared by the layout's rules.

pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;
const RTN_LOCAL: u32 = 2;
pub const CT_STATE_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
pub const CT_STATUS_DNAT: u32 = 0x20;

fn ne32(v: u32) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

pub fn nfproto_is(family: u8) -> Vec<Expr> {
    vec![Expr::MetaLoad(MetaKey::NfProto, reg(0)), Expr::Cmp { reg: reg(0), eq: true, data: vec![family] }]
}

pub fn daddr_is_local() -> Vec<Expr> {
    vec![Expr::FibDaddrType(reg(0)), Expr::Cmp { reg: reg(0), eq: true, data: ne32(RTN_LOCAL) }]
}

/// `ct state`/`ct status` has any of `bits`.
pub fn ct_has(key: CtKey, bits: u32) -> Vec<Expr> {
    vec![
        Expr::CtLoad(key, reg(0)),
        Expr::Bitwise { reg: reg(0), mask: ne32(bits), xor: ne32(0) },
        Expr::Cmp { reg: reg(0), eq: false, data: ne32(0) },
    ]
}

/// `meta mark & mask == value` or `ct mark & mask == value`.
pub fn mark_is(meta: bool, mask: u32, value: u32) -> Vec<Expr> {
    let load = if meta { Expr::MetaLoad(MetaKey::Mark, reg(0)) } else { Expr::CtLoad(CtKey::Mark, reg(0)) };
    vec![
        load,
        Expr::Bitwise { reg: reg(0), mask: ne32(mask), xor: ne32(0) },
        Expr::Cmp { reg: reg(0), eq: true, data: ne32(value) },
    ]
}

/// `meta mark set meta mark & ~mask | value` (or the ct mark): iptables' `--set-xmark value/mask`.
pub fn set_mark(meta: bool, mask: u32, value: u32) -> Vec<Expr> {
    let (load, store) = if meta {
        (Expr::MetaLoad(MetaKey::Mark, reg(0)), Expr::MetaSet(MetaKey::Mark, reg(0)))
    } else {
        (Expr::CtLoad(CtKey::Mark, reg(0)), Expr::CtSet(CtKey::Mark, reg(0)))
    };
    vec![load, Expr::Bitwise { reg: reg(0), mask: ne32(!mask), xor: ne32(value) }, store]
}

/// Address at `offset` of the network header (saddr/daddr of IPv4 or IPv6) into `dreg`.
pub fn address(v6: bool, source: bool, dreg: u32) -> Expr {
    let (offset, len) = match (v6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    Expr::Payload { base: Base::Network, offset, len, dreg }
}

/// `meta l4proto . th dport` into two registers from `first`.
pub fn proto_port(first: u32) -> Vec<Expr> {
    vec![
        Expr::MetaLoad(MetaKey::L4Proto, first),
        Expr::Payload { base: Base::Transport, offset: 2, len: 2, dreg: first + 1 },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::nfnetlink::{attrs, find_attr, str_of};

    #[test]
    fn expression_is_a_named_list_element() {
        let mut a = Attrs::new();
        Expr::Lookup { set: "dnat4-any".into(), sreg: reg(0), dreg: None }.encode(&mut a);
        let (ty, elem) = attrs(&a.buf).next().unwrap();
        assert_eq!(ty, NFTA_LIST_ELEM);
        assert_eq!(str_of(find_attr(elem, NFTA_EXPR_NAME).unwrap()), "lookup");
        let data = find_attr(elem, NFTA_EXPR_DATA).unwrap();
        assert_eq!(str_of(find_attr(data, 1).unwrap()), "dnat4-any");
        assert_eq!(find_attr(data, 2).unwrap(), &8u32.to_be_bytes());
        assert_eq!(find_attr(data, 3), None);
    }

    #[test]
    fn set_mark_keeps_bits_outside_the_mask() {
        let e = set_mark(true, 0x1fff, 0x10);
        let Expr::Bitwise { mask, xor, .. } = &e[1] else { panic!("bitwise expected") };
        assert_eq!(u32::from_ne_bytes(mask[..].try_into().unwrap()), 0xffff_e000);
        assert_eq!(u32::from_ne_bytes(xor[..].try_into().unwrap()), 0x10);
    }
}
