//! diff(): exact restore lines. parse_save() is tested in save_tests.rs, diff() against a
//! simulator of iptables-restore in sim_tests.rs.

use super::sim_tests::Sim;
use super::*;

// ---------------------------------------------------------------- helpers

pub(super) const DNAT: &str = "BRIDGE-NAT-DNAT";
pub(super) const POSTRT: &str = "BRIDGE-NAT-POSTRT";
pub(super) const FWD: &str = "BRIDGE-NAT-FORWARD";

pub(super) fn r4(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv4, table, chain, spec)
}

pub(super) fn r6(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv6, table, chain, spec)
}

/// The jumps every attachment shares, as plan::plan writes them.
pub(super) fn jumps(f: Family) -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat";
    vec![
        Rule::new(f, "nat", "PREROUTING", format!("-m addrtype --dst-type LOCAL {c} -j {DNAT}")),
        Rule::new(f, "nat", "OUTPUT", format!("-m addrtype --dst-type LOCAL {c} -j {DNAT}")),
        Rule::new(f, "nat", "POSTROUTING", format!("{c} -j {POSTRT}")),
        Rule::new(f, "filter", "FORWARD", format!("{c} -j {FWD}")),
    ]
}

/// Rules shared by the network "dind".
pub(super) fn network_v4() -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat:dind";
    vec![
        r4("filter", FWD, &format!("-i dind-br0 {c} -j ACCEPT")),
        r4("nat", POSTRT, &format!("-s 10.20.0.0/24 ! -o dind-br0 {c} -j MASQUERADE")),
    ]
}

/// One attachment's own rules: a DNAT and its FORWARD accept.
pub(super) fn attachment_v4(cid: &str, ip: &str, host_port: u16) -> Vec<Rule> {
    let c = format!("-m comment --comment bridge-nat:dind:{cid}:net1");
    vec![
        r4("nat", DNAT, &format!("-p tcp -m tcp --dport {host_port} {c} -j DNAT --to-destination {ip}:8080")),
        r4(
            "filter",
            FWD,
            &format!("-d {ip}/32 -o dind-br0 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT {c} -j ACCEPT"),
        ),
    ]
}

pub(super) fn two_attachments() -> BTreeSet<Rule> {
    jumps(Family::Ipv4)
        .into_iter()
        .chain(network_v4())
        .chain(attachment_v4("c1", "10.20.0.10", 30080))
        .chain(attachment_v4("c2", "10.20.0.11", 30081))
        .collect()
}

pub(super) fn lines<'t>(tx: &'t Transaction, f: Family, table: &str) -> Vec<&'t str> {
    tx.tables.get(&(f, table.to_string())).map(|l| l.iter().map(String::as_str).collect()).unwrap_or_default()
}

pub(super) fn all_lines(tx: &Transaction) -> Vec<String> {
    tx.tables.values().flatten().cloned().collect()
}

// ---------------------------------------------------------------- diff

#[test]
fn from_empty_declares_chains_appends_rules_and_inserts_jumps() {
    let desired: BTreeSet<Rule> =
        jumps(Family::Ipv4).into_iter().chain(network_v4()).chain(attachment_v4("c1", "10.20.0.10", 30080)).collect();
    let tx = diff(&Current::default(), &desired);
    assert_eq!(
        lines(&tx, Family::Ipv4, "nat"),
        vec![
            ":BRIDGE-NAT-DNAT - [0:0]",
            ":BRIDGE-NAT-POSTRT - [0:0]",
            "-A BRIDGE-NAT-DNAT -p tcp -m tcp --dport 30080 -m comment --comment bridge-nat:dind:c1:net1 -j DNAT --to-destination 10.20.0.10:8080",
            "-A BRIDGE-NAT-POSTRT -s 10.20.0.0/24 ! -o dind-br0 -m comment --comment bridge-nat:dind -j MASQUERADE",
            "-I OUTPUT 1 -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT",
            "-I POSTROUTING 1 -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT",
            "-I PREROUTING 1 -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT",
        ]
    );
    assert_eq!(
        lines(&tx, Family::Ipv4, "filter"),
        vec![
            ":BRIDGE-NAT-FORWARD - [0:0]",
            "-A BRIDGE-NAT-FORWARD -d 10.20.0.10/32 -o dind-br0 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT -m comment --comment bridge-nat:dind:c1:net1 -j ACCEPT",
            "-A BRIDGE-NAT-FORWARD -i dind-br0 -m comment --comment bridge-nat:dind -j ACCEPT",
            "-I FORWARD 1 -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD",
        ]
    );
    assert_eq!(tx.tables.len(), 2);
    assert!(!tx.is_empty());

    let script = tx.script(Family::Ipv4).expect("v4 script");
    assert!(script.starts_with("*filter\n:BRIDGE-NAT-FORWARD - [0:0]\n"), "{script}");
    assert!(
        script.contains("-I FORWARD 1 -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD\nCOMMIT\n*nat\n"),
        "{script}"
    );
    assert!(script.ends_with(
        "-I PREROUTING 1 -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT\nCOMMIT\n"
    ));
    assert_eq!(script.matches("COMMIT\n").count(), 2);
    assert_eq!(script.lines().count(), 2 + 7 + 2 + 4);
    assert_eq!(tx.script(Family::Ipv6), None);
}

#[test]
fn each_own_chain_is_declared_once_per_family_and_table() {
    let desired: BTreeSet<Rule> = jumps(Family::Ipv4)
        .into_iter()
        .chain(jumps(Family::Ipv6))
        .chain(attachment_v4("c1", "10.20.0.10", 30080))
        .chain(attachment_v4("c2", "10.20.0.11", 30081))
        .chain([r6("nat", DNAT, "-p udp -m udp --dport 53 -j DNAT --to-destination [fd00::10]:53")])
        .collect();
    let tx = diff(&Current::default(), &desired);
    for f in [Family::Ipv4, Family::Ipv6] {
        let nat = lines(&tx, f, "nat");
        assert_eq!(nat.iter().filter(|l| **l == ":BRIDGE-NAT-DNAT - [0:0]").count(), 1);
        assert_eq!(nat.iter().filter(|l| **l == ":BRIDGE-NAT-POSTRT - [0:0]").count(), 1);
        let filter = lines(&tx, f, "filter");
        assert_eq!(filter[0], ":BRIDGE-NAT-FORWARD - [0:0]");
        assert_eq!(filter.iter().filter(|l| l.starts_with(':')).count(), 1);
        assert_eq!(filter.last(), Some(&"-I FORWARD 1 -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD"));
        // Declarations come before any rule.
        let first_rule = nat.iter().position(|l| l.starts_with('-')).unwrap();
        assert!(nat[..first_rule].iter().all(|l| l.starts_with(':')));
        assert!(nat[first_rule..].iter().all(|l| !l.starts_with(':')));
    }
    let v6 = tx.script(Family::Ipv6).expect("v6 script");
    assert!(v6.contains("-A BRIDGE-NAT-DNAT -p udp -m udp --dport 53 -j DNAT --to-destination [fd00::10]:53\n"));
    assert!(!v6.contains("10.20.0"));
    assert!(!tx.script(Family::Ipv4).unwrap().contains("fd00"));
}

#[test]
fn own_chain_jumps_are_appended_not_inserted() {
    let desired: BTreeSet<Rule> =
        [r4("nat", POSTRT, "-j BRIDGE-NAT-MASQ"), r4("nat", "BRIDGE-NAT-MASQ", "-j MASQUERADE")].into();
    let tx = diff(&Current::default(), &desired);
    assert_eq!(
        lines(&tx, Family::Ipv4, "nat"),
        vec![
            ":BRIDGE-NAT-MASQ - [0:0]",
            ":BRIDGE-NAT-POSTRT - [0:0]",
            "-A BRIDGE-NAT-MASQ -j MASQUERADE",
            "-A BRIDGE-NAT-POSTRT -j BRIDGE-NAT-MASQ",
        ]
    );
}

#[test]
fn diff_to_itself_is_empty() {
    let desired = two_attachments();
    let tx = diff(&Current::from_rules(&desired), &desired);
    assert!(tx.is_empty());
    assert!(tx.tables.is_empty());
    assert_eq!(tx.script(Family::Ipv4), None);
    assert_eq!(tx.script(Family::Ipv6), None);
    assert!(diff(&Current::default(), &BTreeSet::new()).is_empty());
}

#[test]
fn from_rules_collects_own_chains_and_jump_targets() {
    let cur = Current::from_rules(&jumps(Family::Ipv6));
    let want: BTreeSet<(Family, String, String)> = [
        (Family::Ipv6, "filter".to_string(), FWD.to_string()),
        (Family::Ipv6, "nat".to_string(), DNAT.to_string()),
        (Family::Ipv6, "nat".to_string(), POSTRT.to_string()),
    ]
    .into();
    assert_eq!(cur.chains, want);
    // Duplicates in the input collapse.
    let doubled: Vec<Rule> = jumps(Family::Ipv6).into_iter().chain(jumps(Family::Ipv6)).collect();
    assert_eq!(Current::from_rules(&doubled).rules.len(), 4);
}

#[test]
fn removing_one_attachment_only_deletes_its_rules() {
    let all = two_attachments();
    let gone = attachment_v4("c2", "10.20.0.11", 30081);
    let desired: BTreeSet<Rule> = all.iter().filter(|r| !gone.contains(r)).cloned().collect();
    let tx = diff(&Current::from_rules(&all), &desired);
    assert_eq!(
        lines(&tx, Family::Ipv4, "nat"),
        vec!["-D BRIDGE-NAT-DNAT -p tcp -m tcp --dport 30081 -m comment --comment bridge-nat:dind:c2:net1 -j DNAT --to-destination 10.20.0.11:8080"]
    );
    assert_eq!(
        lines(&tx, Family::Ipv4, "filter"),
        vec!["-D BRIDGE-NAT-FORWARD -d 10.20.0.11/32 -o dind-br0 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT -m comment --comment bridge-nat:dind:c2:net1 -j ACCEPT"]
    );
    assert!(all_lines(&tx).iter().all(|l| l.starts_with("-D ")));
}

#[test]
fn removing_everything_deletes_jumps_then_flushes_and_removes_chains() {
    let all = two_attachments();
    let tx = diff(&Current::from_rules(&all), &BTreeSet::new());
    assert_eq!(
        lines(&tx, Family::Ipv4, "nat"),
        vec![
            "-D OUTPUT -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT",
            "-D POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT",
            "-D PREROUTING -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT",
            ":BRIDGE-NAT-DNAT - [0:0]",
            ":BRIDGE-NAT-POSTRT - [0:0]",
            "-X BRIDGE-NAT-DNAT",
            "-X BRIDGE-NAT-POSTRT",
        ]
    );
    assert_eq!(
        lines(&tx, Family::Ipv4, "filter"),
        vec![
            "-D FORWARD -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD",
            ":BRIDGE-NAT-FORWARD - [0:0]",
            "-X BRIDGE-NAT-FORWARD",
        ]
    );
    // No -D for a rule inside a chain that goes.
    assert!(!all_lines(&tx).iter().any(|l| l.starts_with("-D BRIDGE-NAT-")));
}

#[test]
fn jumps_are_deleted_before_other_rules() {
    // Current lists the jump last; the delete still comes first.
    let mut rules: Vec<Rule> = network_v4();
    rules.extend(jumps(Family::Ipv4));
    let cur = Current { rules: rules.clone(), chains: Current::from_rules(&rules).chains };
    let keep: BTreeSet<Rule> = [r4("filter", FWD, "-j RETURN")].into();
    let tx = diff(&cur, &keep);
    assert_eq!(
        lines(&tx, Family::Ipv4, "filter"),
        vec![
            "-D FORWARD -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD",
            "-D BRIDGE-NAT-FORWARD -i dind-br0 -m comment --comment bridge-nat:dind -j ACCEPT",
            "-A BRIDGE-NAT-FORWARD -j RETURN",
        ]
    );
}

#[test]
fn duplicates_in_current_are_deleted_down_to_what_is_desired() {
    let dup = attachment_v4("c1", "10.20.0.10", 30080).remove(0);
    let mut rules: Vec<Rule> = two_attachments().into_iter().collect();
    rules.push(dup.clone());
    let chains = Current::from_rules(&rules).chains;
    let cur = Current { rules, chains };
    let del = format!("-D {} {}", dup.chain, dup.spec);

    // Desired: one copy stays, one goes.
    let tx = diff(&cur, &two_attachments());
    assert_eq!(all_lines(&tx), vec![del.clone()]);

    // Not desired, chain stays: both copies go.
    let desired: BTreeSet<Rule> = two_attachments().into_iter().filter(|r| *r != dup).collect();
    let tx = diff(&cur, &desired);
    assert_eq!(all_lines(&tx), vec![del.clone(), del]);
}

#[test]
fn duplicate_jumps_are_deleted_too() {
    let j = jumps(Family::Ipv4).remove(0);
    let mut rules: Vec<Rule> = two_attachments().into_iter().collect();
    rules.push(j.clone());
    rules.push(j.clone());
    let cur = Current { chains: Current::from_rules(&rules).chains, rules };
    let tx = diff(&cur, &two_attachments());
    let d = format!("-D PREROUTING {}", j.spec);
    assert_eq!(all_lines(&tx), vec![d.clone(), d]);
}

#[test]
fn stale_rule_nobody_wants_is_deleted() {
    let stale = r4("nat", DNAT, "-p tcp -m tcp --dport 9999 -m comment --comment bridge-nat:dind:gone:net1 -j DNAT --to-destination 10.20.0.99:80");
    let mut rules: Vec<Rule> = two_attachments().into_iter().collect();
    rules.insert(3, stale.clone());
    let cur = Current { chains: Current::from_rules(&rules).chains, rules };
    let tx = diff(&cur, &two_attachments());
    assert_eq!(all_lines(&tx), vec![format!("-D BRIDGE-NAT-DNAT {}", stale.spec)]);
}

#[test]
fn stale_own_chain_nobody_uses_is_removed_and_missing_chain_created() {
    let desired = two_attachments();
    let mut cur = Current::from_rules(&desired);
    cur.chains.insert((Family::Ipv4, "nat".into(), "BRIDGE-NAT-OLD".into()));
    cur.rules.push(r4("nat", "BRIDGE-NAT-OLD", "-j RETURN"));
    let tx = diff(&cur, &desired);
    assert_eq!(all_lines(&tx), vec![":BRIDGE-NAT-OLD - [0:0]", "-X BRIDGE-NAT-OLD"]);

    // The kernel lost a chain the records believe in: it is declared again and refilled.
    let mut cur = Current::from_rules(&desired);
    cur.chains.retain(|(_, _, c)| c != FWD);
    cur.rules.retain(|r| r.chain != FWD);
    let tx = diff(&cur, &desired);
    let filter = lines(&tx, Family::Ipv4, "filter");
    assert_eq!(filter[0], ":BRIDGE-NAT-FORWARD - [0:0]");
    assert_eq!(filter.iter().filter(|l| l.starts_with("-A BRIDGE-NAT-FORWARD ")).count(), 3);
    assert!(lines(&tx, Family::Ipv4, "nat").is_empty());
}

#[test]
fn a_foreign_chain_is_never_declared_or_removed() {
    // A rule in a built-in chain that does not jump to an own chain (not something the plugin
    // plans) is inserted; no chain line names a foreign chain.
    let desired: BTreeSet<Rule> = [r4("filter", "FORWARD", "-j DOCKER-USER")].into();
    let tx = diff(&Current::default(), &desired);
    assert_eq!(all_lines(&tx), vec!["-I FORWARD 1 -j DOCKER-USER"]);
    let tx = diff(&Current::from_rules(&desired), &BTreeSet::new());
    assert_eq!(all_lines(&tx), vec!["-D FORWARD -j DOCKER-USER"]);
}

#[test]
fn removing_chains_that_jump_to_each_other_deletes_the_referrer_first() {
    let rules: BTreeSet<Rule> = [
        r4("nat", "POSTROUTING", "-j BRIDGE-NAT-POSTRT"),
        r4("nat", POSTRT, "-j BRIDGE-NAT-MASQ"),
        r4("nat", "BRIDGE-NAT-MASQ", "-j MASQUERADE"),
    ]
    .into();
    let cur = Current::from_rules(&rules);
    let tx = diff(&cur, &BTreeSet::new());
    let mut sim = Sim::from_current(&cur);
    sim.apply_tx(&tx).unwrap_or_else(|e| panic!("{e}\n{}", tx.script(Family::Ipv4).unwrap()));
    assert!(sim.rules().is_empty());
}
