//! The nf_tables socket: batches of table, chain, rule and element messages (one kernel transaction
//! each: all of it applies or none), and the look-ups CHECK needs.

use super::elements::Element;
use super::{expr, layout};
use crate::error::{code, Result};
use crate::netlink::nfnetlink::{
    self as nl, errno_error, find_attr, str_of, Attrs, Reply, Socket, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use crate::plan::Family;
use layout::{Mark, FAMILY_INET, TABLE};
use std::collections::BTreeMap;

/// How nft names the family of iptables' tables.
pub fn family_name(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

const SUBSYS: u16 = 10 << 8;
const NEWTABLE: u16 = 0;
const GETTABLE: u16 = 1;
const DELTABLE: u16 = 2;
const NEWCHAIN: u16 = 3;
const GETCHAIN: u16 = 4;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const GETRULE: u16 = 7;
const DELRULE: u16 = 8;
const NEWSET: u16 = 9;
const NEWSETELEM: u16 = 12;
const GETSETELEM: u16 = 13;
const DELSETELEM: u16 = 14;
const BATCH_BEGIN: u16 = 16;
const BATCH_END: u16 = 17;

/// The messages of one transaction, each with what it does, for error messages.
#[derive(Default)]
pub struct Tx {
    msgs: Vec<(u16, u16, Vec<u8>, String)>,
}

impl Tx {
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    fn push(&mut self, kind: u16, flags: u16, attrs: Attrs, what: String) {
        self.msgs.push((kind, flags, attrs.buf, what));
    }

    /// The whole table with its sets, chains and static rules, empty of elements.
    pub fn create_table(&mut self) {
        let mut a = Attrs::new();
        a.str(1, TABLE);
        self.push(NEWTABLE, NLM_F_CREATE, a, format!("create table inet {TABLE}"));
        for (i, s) in layout::SETS.iter().enumerate() {
            let mut a = Attrs::new();
            s.encode(i as u32 + 1, &mut a);
            self.push(NEWSET, NLM_F_CREATE, a, format!("create set {}", s.name));
        }
        self.add_chains(layout::CHAINS, super::rules::static_rules());
    }

    fn add_chains(&mut self, chains: &[layout::ChainSpec], rules: Vec<layout::RuleSpec>) {
        for c in chains {
            let mut a = Attrs::new();
            layout::encode_chain(c.name, c.hook, &mut a);
            self.push(NEWCHAIN, NLM_F_CREATE, a, format!("create chain {}", c.name));
        }
        for r in rules {
            self.add_rule(&r);
        }
    }

    fn add_rule(&mut self, r: &layout::RuleSpec) {
        let mut a = Attrs::new();
        r.encode(&mut a);
        self.push(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a, format!("add rule {} in chain {}", r.comment, r.chain));
    }

    /// What routing by mark adds to the table (layout::ROUTING_CHAINS): its chains and rules, and
    /// the jump to pick-mark at the head of local-in.
    pub fn add_routing(&mut self) {
        self.add_chains(layout::ROUTING_CHAINS, super::rules::routing_rules());
        let jump = super::rules::routing_jump();
        let mut a = Attrs::new();
        jump.encode(&mut a);
        // Without NLM_F_APPEND the rule goes first: the mark before the DNAT.
        self.push(NEWRULE, NLM_F_CREATE, a, format!("insert rule {} in chain {}", jump.comment, jump.chain));
    }

    /// Take routing by mark out of the table: the jumps to pick-mark `live` shows, then each
    /// routing chain, flushed first (a chain holding rules cannot be deleted).
    pub fn delete_routing(&mut self, live: &[LiveRule]) {
        let jump = super::rules::routing_jump();
        for r in live.iter().filter(|r| r.chain == jump.chain && r.comment == jump.comment) {
            self.delete_rule(r);
        }
        for c in layout::ROUTING_CHAINS {
            let mut a = Attrs::new();
            a.str(1, TABLE).str(2, c.name);
            self.push(DELRULE, 0, a, format!("flush chain {}", c.name));
            let mut a = Attrs::new();
            a.str(1, TABLE).str(3, c.name);
            self.push(DELCHAIN, 0, a, format!("delete chain {}", c.name));
        }
    }

    fn delete_rule(&mut self, r: &LiveRule) {
        let mut a = Attrs::new();
        a.str(1, TABLE).str(2, &r.chain).bytes(3, &r.handle.to_be_bytes());
        self.push(DELRULE, 0, a, format!("delete rule {} in chain {}", r.comment, r.chain));
    }

    pub fn delete_table(&mut self) {
        let mut a = Attrs::new();
        a.str(1, TABLE);
        self.push(DELTABLE, 0, a, format!("delete table inet {TABLE}"));
    }

    pub fn add_mark(&mut self, mark: &Mark) {
        let mut a = Attrs::new();
        layout::encode_chain(&mark.chain(), None, &mut a);
        self.push(NEWCHAIN, NLM_F_CREATE, a, format!("create chain {}", mark.chain()));
        for r in mark.rules() {
            self.add_rule(&r);
        }
    }

    /// Remove a mark's rules (found by handle) and then its chain.
    pub fn delete_mark(&mut self, mark: &Mark, live: &[LiveRule]) {
        let name = mark.chain();
        for r in live.iter().filter(|r| r.comment == name) {
            self.delete_rule(r);
        }
        let mut a = Attrs::new();
        a.str(1, TABLE).str(3, &name);
        self.push(DELCHAIN, 0, a, format!("delete chain {name}"));
    }

    /// One message per set; elements already there are not an error (no NLM_F_EXCL).
    pub fn add_elements<'a>(&mut self, elems: impl IntoIterator<Item = &'a Element>) {
        self.elements(NEWSETELEM, NLM_F_CREATE, "add", elems);
    }

    pub fn delete_elements<'a>(&mut self, elems: impl IntoIterator<Item = &'a Element>) {
        self.elements(DELSETELEM, 0, "delete", elems);
    }

    fn elements<'a>(&mut self, kind: u16, flags: u16, verb: &str, elems: impl IntoIterator<Item = &'a Element>) {
        let mut by_set: BTreeMap<&str, Vec<&Element>> = BTreeMap::new();
        for e in elems {
            by_set.entry(&e.set).or_default().push(e);
        }
        for (set, list) in by_set {
            let mut a = Attrs::new();
            a.str(1, TABLE).str(2, set).nest(3, |a| {
                for e in &list {
                    e.encode(kind == NEWSETELEM, a);
                }
            });
            let names: Vec<String> = list.iter().map(|e| e.to_string()).collect();
            self.push(kind, flags, a, format!("{verb} element {}", names.join(", ")));
        }
    }
}

/// A rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRule {
    pub chain: String,
    pub comment: String,
    pub handle: u64,
}

pub struct Nft {
    sock: Socket,
    buf: Vec<u8>,
    seq: u32,
}

impl Nft {
    pub fn open() -> Result<Nft> {
        Ok(Nft { sock: Socket::open("nftables")?, buf: vec![0; 256 * 1024], seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Send the transaction as one batch; the kernel applies all of it or none. Only failures are
    /// answered (no NLM_F_ACK), and the kernel has answered by the time the send returns.
    pub fn commit(&mut self, tx: Tx) -> Result<()> {
        if tx.is_empty() {
            return Ok(());
        }
        let first = self.next_seq();
        let mut out = nl::message(BATCH_BEGIN, NLM_F_REQUEST, first, 0, 10, &[]);
        let mut what = BTreeMap::new();
        for (kind, flags, attrs, desc) in tx.msgs {
            let seq = self.next_seq();
            out.extend(nl::message(SUBSYS | kind, NLM_F_REQUEST | flags, seq, FAMILY_INET, 0, &attrs));
            what.insert(seq, desc);
        }
        let end = self.next_seq();
        out.extend(nl::message(BATCH_END, NLM_F_REQUEST, end, 0, 10, &[]));
        self.sock.send(&out)?;
        let mut errors = Vec::new();
        while self.sock.receive(true, &mut self.buf, |reply| {
            if let Reply::Ack { seq, errno } = reply {
                if errno != 0 && (first..=end).contains(&seq) {
                    errors.push((seq, errno));
                }
            }
            true
        })? {}
        match errors.first() {
            None => Ok(()),
            Some(&(seq, errno)) => {
                let desc = what.get(&seq).cloned().unwrap_or_else(|| "nftables batch".into());
                Err(errno_error(code::FIREWALL, format!("nftables: {desc}"), errno))
            }
        }
    }

    /// Send one request and hand each message of the answer to `f`, until its ack or DONE.
    fn request(&mut self, kind: u16, flags: u16, attrs: &Attrs, f: impl FnMut(&[u8])) -> Result<()> {
        self.request_in(FAMILY_INET, kind, flags, attrs, f)
    }

    fn request_in(&mut self, family: u8, kind: u16, flags: u16, attrs: &Attrs, mut f: impl FnMut(&[u8])) -> Result<()> {
        let seq = self.next_seq();
        self.sock.send(&nl::message(SUBSYS | kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, family, 0, &attrs.buf))?;
        let mut outcome: Option<i32> = None;
        while outcome.is_none() {
            self.sock.receive(false, &mut self.buf, |reply| match reply {
                Reply::Message { seq: s, attrs, .. } if s == seq => {
                    f(attrs);
                    true
                }
                Reply::Done { seq: s } if s == seq => {
                    outcome = Some(0);
                    false
                }
                Reply::Ack { seq: s, errno } if s == seq => {
                    outcome = Some(errno);
                    false
                }
                _ => true,
            })?;
        }
        match outcome {
            Some(0) | None => Ok(()),
            Some(errno) => Err(errno_error(code::FIREWALL, "nftables request", errno)),
        }
    }

    /// Whether the table holds `chain` (false also when there is no table).
    pub fn chain_exists(&mut self, chain: &str) -> Result<bool> {
        let mut a = Attrs::new();
        a.str(1, TABLE).str(3, chain);
        match self.request(GETCHAIN, 0, &a, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.details == "ENOENT" => Ok(false),
            Err(e) => Err(e.context(format!("look up chain {chain} of table inet {TABLE}"))),
        }
    }

    pub fn table_exists(&mut self) -> Result<bool> {
        let mut a = Attrs::new();
        a.str(1, TABLE);
        match self.request(GETTABLE, 0, &a, |_| {}) {
            Ok(()) => Ok(true),
            Err(e) if e.details == "ENOENT" => Ok(false),
            Err(e) => Err(e.context(format!("look up table inet {TABLE}"))),
        }
    }

    /// The families whose iptables FORWARD chain (table `filter`) drops by policy, as Docker sets
    /// it. Two lookups by name, not a dump: a node with kube-proxy holds thousands of chains.
    pub fn forward_drops(&mut self) -> Result<Vec<Family>> {
        let mut out = Vec::new();
        for f in [Family::Ipv4, Family::Ipv6] {
            if self.iptables_chain(f, "FORWARD")? == Some(true) {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Whether iptables' filter table holds `chain` in family `f` (one lookup by name).
    pub fn iptables_chain_exists(&mut self, f: Family, chain: &str) -> Result<bool> {
        Ok(self.iptables_chain(f, chain)?.is_some())
    }

    /// None when iptables' filter table (as iptables-nft keeps it) lacks `chain`, else whether its
    /// policy is drop.
    fn iptables_chain(&mut self, f: Family, chain: &str) -> Result<Option<bool>> {
        let family = match f {
            Family::Ipv4 => expr::NFPROTO_IPV4,
            Family::Ipv6 => expr::NFPROTO_IPV6,
        };
        let mut a = Attrs::new();
        a.str(1, "filter").str(3, chain);
        let mut drops = false;
        match self.request_in(family, GETCHAIN, 0, &a, |attrs| {
            drops = find_attr(attrs, 5).and_then(nl::be32_of) == Some(0);
        }) {
            Ok(()) => Ok(Some(drops)),
            Err(e) if e.details == "ENOENT" => Ok(None),
            Err(e) => Err(e.context(format!("look up the {chain} chain of {} filter", family_name(f)))),
        }
    }

    /// Every rule in the table, in order, with its comment and handle.
    pub fn rules(&mut self) -> Result<Vec<LiveRule>> {
        let mut a = Attrs::new();
        a.str(1, TABLE);
        let mut out = Vec::new();
        self.request(GETRULE, NLM_F_DUMP, &a, |attrs| {
            if find_attr(attrs, 1).map(str_of).as_deref() != Some(TABLE) {
                return;
            }
            let chain = find_attr(attrs, 2).map(str_of).unwrap_or_default();
            let handle = find_attr(attrs, 3)
                .and_then(|b| b.get(..8))
                .map_or(0, |b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
            let comment = find_attr(attrs, 7).and_then(layout::comment_of_udata).unwrap_or_default();
            out.push(LiveRule { chain, comment, handle });
        })
        .map_err(|e| e.context(format!("list rules of table inet {TABLE}")))?;
        Ok(out)
    }

    /// The element as the kernel holds it: None when absent, else its data (empty for sets, the
    /// jump target's name for verdict maps).
    pub fn element(&mut self, e: &Element) -> Result<Option<Vec<u8>>> {
        let mut a = Attrs::new();
        a.str(1, TABLE).str(2, &e.set).nest(3, |a| e.encode(false, a));
        let mut data = None;
        let found = self.request(GETSETELEM, 0, &a, |attrs| {
            let first = find_attr(attrs, 3).and_then(|list| find_attr(list, 1));
            let d = first.and_then(|elem| find_attr(elem, 2));
            data = Some(match d {
                Some(d) => match find_attr(d, expr::NFTA_DATA_VALUE) {
                    Some(v) => v.to_vec(),
                    None => find_attr(d, expr::NFTA_DATA_VERDICT)
                        .and_then(|v| find_attr(v, 2))
                        .map(|c| str_of(c).into_bytes())
                        .unwrap_or_default(),
                },
                None => Vec::new(),
            });
        });
        match found {
            Ok(()) => Ok(Some(data.unwrap_or_default())),
            Err(e) if e.details == "ENOENT" => Ok(None),
            Err(err) => Err(err.context(format!("look up element {e}"))),
        }
    }
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;
