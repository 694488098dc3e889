//! The accepts beside a dropping iptables FORWARD: exact rule texts, and the restore lines that
//! install, remove and converge them against what the node holds.

use super::*;
use crate::backend::iptables::parse_save;
use crate::config::AttachmentId;
use crate::plan::tests::{att, conf, id};
use serde_json::json;

const V4: Family = Family::Ipv4;
const V6: Family = Family::Ipv6;
const JUMP: &str = "-m comment --comment bridge-nat -j BRIDGE-NAT-NFT-FWD";

fn accepts(network: &str, addrs: &[&str]) -> Vec<Rule> {
    let c = conf(json!({}));
    let id = AttachmentId { network: network.into(), ..id() };
    render(&crate::plan::plan(&c, &id, &att(&c, addrs), None).expect("plan"))
}

fn from_bridge(f: Family, network: &str) -> Rule {
    Rule::new(f, "filter", CHAIN, format!("-i dind-br0 -m comment --comment bridge-nat:{network} -j ACCEPT"))
}

fn to_bridge(f: Family, network: &str) -> Rule {
    Rule::new(
        f,
        "filter",
        CHAIN,
        format!("-o dind-br0 -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment bridge-nat:{network} -j ACCEPT"),
    )
}

fn jump_rule(f: Family) -> Rule {
    Rule::new(f, "filter", "FORWARD", JUMP)
}

fn refs(rules: &[Rule]) -> Vec<&Rule> {
    rules.iter().collect()
}

/// The node as iptables-save prints it with `rules` in place (jumps and the chain declared).
fn node(rules: &[Rule]) -> Current {
    let mut text = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    if rules.iter().any(|r| r.chain == CHAIN) {
        text += &format!(":{CHAIN} - [0:0]\n");
    }
    for r in rules {
        // As iptables-save quotes a comment holding ':'.
        let spec = r.spec.replace("--comment bridge-nat:dind", "--comment \"bridge-nat:dind\"");
        text += &format!("-A {} {spec}\n", r.chain);
    }
    text += "COMMIT\n";
    parse_save(V4, &text)
}

fn lines(tx: &Transaction, f: Family) -> Vec<String> {
    tx.tables.get(&(f, "filter".to_string())).cloned().unwrap_or_default()
}

#[test]
fn a_network_needs_two_accepts_and_the_jump_per_family() {
    assert_eq!(
        accepts("dind", &["10.20.0.10/24"]),
        vec![from_bridge(V4, "dind"), to_bridge(V4, "dind"), jump_rule(V4)]
    );
    let dual = accepts("dind", &["10.20.0.10/24", "fd00:20::10/64"]);
    assert_eq!(dual.len(), 6);
    assert!(dual.contains(&to_bridge(V6, "dind")) && dual.contains(&jump_rule(V6)));
    // Every attachment of the network renders the same rules, so they are held as shared objects.
    assert_eq!(accepts("dind", &["10.20.0.11/24"]), accepts("dind", &["10.20.0.10/24"]));
}

#[test]
fn networks_share_the_jump_and_nothing_else() {
    let (a, b) = (accepts("a", &["10.20.0.10/24"]), accepts("b", &["10.20.0.10/24"]));
    let keys = |rules: &[Rule]| rules.iter().map(key).collect::<BTreeSet<_>>();
    let shared: Vec<String> = keys(&a).intersection(&keys(&b)).cloned().collect();
    assert_eq!(shared, vec![key(&jump_rule(V4))]);
}

#[test]
fn the_first_attachment_installs_where_forward_drops_and_creates_the_chain_once() {
    let rules = accepts("dind", &["10.20.0.10/24", "fd00:20::10/64"]);
    let tx = install_tx(&refs(&rules), &[V4], |_| false);
    assert_eq!(
        lines(&tx, V4),
        vec![
            format!(":{CHAIN} - [0:0]"),
            format!("-I FORWARD 1 {JUMP}"),
            format!("-A {CHAIN} {}", from_bridge(V4, "dind").spec),
            format!("-A {CHAIN} {}", to_bridge(V4, "dind").spec),
        ]
    );
    assert!(lines(&tx, V6).is_empty(), "ip6 FORWARD accepts: nothing to do");
    // Another network's chain is there already: declaring it again would flush it.
    let tx = install_tx(&refs(&rules), &[V4], |_| true);
    assert_eq!(lines(&tx, V4).len(), 2);
    assert!(lines(&tx, V4).iter().all(|l| l.starts_with(&format!("-A {CHAIN} "))));
    assert!(install_tx(&refs(&rules), &[], |_| false).is_empty(), "no FORWARD drops");
    assert!(install_tx(&[&jump_rule(V4)], &[V4], |_| false).is_empty(), "a jump to no accepts");
}

#[test]
fn the_last_attachment_removes_only_what_is_there() {
    let a = accepts("dind", &["10.20.0.10/24"]);
    let b = [from_bridge(V4, "other"), to_bridge(V4, "other")];
    let both: Vec<Rule> = a.iter().chain(&b).cloned().collect();
    // The network goes, another stays: its two accepts only.
    let tx = remove_tx(&node(&both), &refs(&b));
    assert_eq!(
        lines(&tx, V4),
        vec![
            format!("-D {CHAIN} {}", from_bridge(V4, "other").spec),
            format!("-D {CHAIN} {}", to_bridge(V4, "other").spec)
        ]
    );
    // The last network: jump, then the chain.
    let tx = remove_tx(&node(&a), &refs(&a));
    assert_eq!(lines(&tx, V4), vec![format!("-D FORWARD {JUMP}"), format!(":{CHAIN} - [0:0]"), format!("-X {CHAIN}")]);
    // Never installed (FORWARD accepted when the network came): nothing to delete.
    assert!(remove_tx(&node(&[]), &refs(&a)).is_empty());
    assert!(remove_tx(&node(&a), &refs(&b)).is_empty());
}

#[test]
fn converge_adds_where_forward_drops_keeps_what_is_there_and_drops_what_no_record_needs() {
    let a = accepts("dind", &["10.20.0.10/24"]);
    let wanted: BTreeSet<&Rule> = a.iter().collect();
    // The policy became DROP after the network's first attachment.
    let tx = converge_tx(&node(&[]), &wanted, &[V4]);
    assert_eq!(lines(&tx, V4).len(), 4, "{tx:?}");
    assert!(lines(&tx, V4).contains(&format!("-I FORWARD 1 {JUMP}")));
    assert!(converge_tx(&node(&a), &wanted, &[V4]).is_empty(), "all there");
    // The policy went back to ACCEPT: the accepts stay while a record needs them.
    assert!(converge_tx(&node(&a), &wanted, &[]).is_empty());
    assert!(converge_tx(&node(&[]), &wanted, &[]).is_empty(), "nothing needed without a drop");
    // One accept deleted by hand comes back, alone.
    let tx = converge_tx(&node(&[from_bridge(V4, "dind"), jump_rule(V4)]), &wanted, &[V4]);
    assert_eq!(lines(&tx, V4), vec![format!("-A {CHAIN} {}", to_bridge(V4, "dind").spec)]);
    // No record needs them: the chain goes.
    let tx = converge_tx(&node(&a), &BTreeSet::new(), &[V4]);
    assert_eq!(lines(&tx, V4).last(), Some(&format!("-X {CHAIN}")));
}

#[test]
fn check_names_each_missing_accept() {
    let a = accepts("dind", &["10.20.0.10/24"]);
    assert!(missing(&node(&a), &refs(&a)).is_empty());
    let problems = missing(&node(&[from_bridge(V4, "dind"), jump_rule(V4)]), &refs(&a));
    assert_eq!(problems, vec![format!("missing firewall rule: {}", to_bridge(V4, "dind"))]);
}

#[test]
fn the_chain_is_split_off_what_the_iptables_backend_converges() {
    let a = accepts("dind", &["10.20.0.10/24"]);
    let mut cur = node(&a);
    let own = Rule::new(V4, "filter", "FORWARD", "-m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD");
    cur.rules.push(own.clone());
    cur.chains.insert((V4, "filter".into(), "BRIDGE-NAT-FORWARD".into()));
    let taken = cur.take_chain(CHAIN);
    assert_eq!(taken.rules, a);
    assert_eq!(cur.rules, vec![own]);
    assert!(cur.chains.iter().all(|(_, _, c)| c != CHAIN) && taken.chains.len() == 1);
}
