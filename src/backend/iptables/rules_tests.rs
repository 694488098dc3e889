//! diff() and parse_save(): exact restore lines, and a simulator of iptables-restore --noflush.

use super::*;
use proptest::prelude::*;

// ---------------------------------------------------------------- helpers

const DNAT: &str = "BRIDGE-NAT-DNAT";
const POSTRT: &str = "BRIDGE-NAT-POSTRT";
const FWD: &str = "BRIDGE-NAT-FORWARD";

fn r4(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv4, table, chain, spec)
}

fn r6(table: &str, chain: &str, spec: &str) -> Rule {
    Rule::new(Family::Ipv6, table, chain, spec)
}

/// The jumps every attachment shares, as plan::plan writes them.
fn jumps(f: Family) -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat";
    vec![
        Rule::new(f, "nat", "PREROUTING", format!("-m addrtype --dst-type LOCAL {c} -j {DNAT}")),
        Rule::new(f, "nat", "OUTPUT", format!("-m addrtype --dst-type LOCAL {c} -j {DNAT}")),
        Rule::new(f, "nat", "POSTROUTING", format!("{c} -j {POSTRT}")),
        Rule::new(f, "filter", "FORWARD", format!("{c} -j {FWD}")),
    ]
}

/// Rules shared by the network "dind".
fn network_v4() -> Vec<Rule> {
    let c = "-m comment --comment bridge-nat:dind";
    vec![
        r4("filter", FWD, &format!("-i dind-br0 {c} -j ACCEPT")),
        r4("nat", POSTRT, &format!("-s 10.20.0.0/24 ! -o dind-br0 {c} -j MASQUERADE")),
    ]
}

/// One attachment's own rules: a DNAT and its FORWARD accept.
fn attachment_v4(cid: &str, ip: &str, host_port: u16) -> Vec<Rule> {
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

fn two_attachments() -> BTreeSet<Rule> {
    jumps(Family::Ipv4)
        .into_iter()
        .chain(network_v4())
        .chain(attachment_v4("c1", "10.20.0.10", 30080))
        .chain(attachment_v4("c2", "10.20.0.11", 30081))
        .collect()
}

fn lines<'t>(tx: &'t Transaction, f: Family, table: &str) -> Vec<&'t str> {
    tx.tables.get(&(f, table.to_string())).map(|l| l.iter().map(String::as_str).collect()).unwrap_or_default()
}

fn all_lines(tx: &Transaction) -> Vec<String> {
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

// ---------------------------------------------------------------- parse_save

const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  6 10:00:00 2025
*mangle
:PREROUTING ACCEPT [1234:567890]
:INPUT ACCEPT [1000:400000]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [900:300000]
:POSTROUTING ACCEPT [900:300000]
:KUBE-IPTABLES-HINT - [0:0]
COMMIT
# Completed on Mon Jan  6 10:00:00 2025
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  6 10:00:00 2025
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:BRIDGE-NAT-DNAT - [0:0]
:BRIDGE-NAT-POSTRT - [0:0]
:DOCKER - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A BRIDGE-NAT-DNAT -p tcp -m tcp --dport 30080 -m comment --comment "bridge-nat:dind:c1:net1" -j DNAT --to-destination 10.20.0.10:8080
-A BRIDGE-NAT-POSTRT -s 10.20.0.0/24 ! -o dind-br0 -m comment --comment "bridge-nat:dind" -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
# Completed on Mon Jan  6 10:00:00 2025
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Jan  6 10:00:00 2025
*filter
:INPUT ACCEPT [5000:1000000]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [4000:900000]
:BRIDGE-NAT-FORWARD - [0:0]
:DOCKER-USER - [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m comment --comment bridge-nat -j BRIDGE-NAT-FORWARD
-A FORWARD -j DOCKER-USER
-A BRIDGE-NAT-FORWARD -i dind-br0 -m comment --comment "bridge-nat:dind" -j ACCEPT
-A BRIDGE-NAT-FORWARD -d 10.20.0.10/32 -o dind-br0 -p tcp -m tcp --dport 8080 -m conntrack --ctstate DNAT -m comment --comment "bridge-nat:dind:c1:net1" -j ACCEPT
-A DOCKER-USER -j RETURN
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
# Completed on Mon Jan  6 10:00:00 2025
"#;

/// What SAVE holds of the plugin, in plan::plan's canonical (unquoted) form.
fn save_rules() -> Vec<Rule> {
    let j = jumps(Family::Ipv4);
    let n = network_v4();
    let a = attachment_v4("c1", "10.20.0.10", 30080);
    vec![j[0].clone(), j[1].clone(), j[2].clone(), a[0].clone(), n[1].clone(), j[3].clone(), n[0].clone(), a[1].clone()]
}

#[test]
fn parse_save_keeps_own_chains_their_rules_and_jumps() {
    let cur = parse_save(Family::Ipv4, SAVE);
    assert_eq!(cur.rules, save_rules());
    let chains: BTreeSet<(Family, String, String)> = [
        (Family::Ipv4, "nat".to_string(), DNAT.to_string()),
        (Family::Ipv4, "nat".to_string(), POSTRT.to_string()),
        (Family::Ipv4, "filter".to_string(), FWD.to_string()),
    ]
    .into();
    assert_eq!(cur.chains, chains);
    assert!(cur.rules.iter().all(|r| !r.spec.contains('"')));
    assert!(!cur
        .rules
        .iter()
        .any(|r| r.spec.contains("KUBE") || r.spec.contains("DOCKER") || r.spec.contains("docker0")));
}

#[test]
fn parse_save_then_diff_to_the_same_rules_is_empty() {
    let cur = parse_save(Family::Ipv4, SAVE);
    let desired: BTreeSet<Rule> = save_rules().into_iter().collect();
    assert!(diff(&cur, &desired).is_empty());
    // And removing the plugin touches nothing foreign.
    let tx = diff(&cur, &BTreeSet::new());
    let script = tx.script(Family::Ipv4).unwrap();
    assert!(!script.contains("KUBE") && !script.contains("DOCKER"), "{script}");
    assert_eq!(script.matches("-X ").count(), 3);
}

#[test]
fn parse_save_sets_the_family_and_handles_v6() {
    let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:BRIDGE-NAT-DNAT - [0:0]\n\
                -A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment bridge-nat -j BRIDGE-NAT-DNAT\n\
                -A BRIDGE-NAT-DNAT -p tcp -m tcp --dport 30080 -m comment --comment \"bridge-nat:dind:c1:net1\" -j DNAT --to-destination [fd00::10]:8080\n\
                COMMIT\n";
    let cur = parse_save(Family::Ipv6, text);
    assert_eq!(
        cur.rules,
        vec![
            jumps(Family::Ipv6).remove(0),
            r6("nat", DNAT, "-p tcp -m tcp --dport 30080 -m comment --comment bridge-nat:dind:c1:net1 -j DNAT --to-destination [fd00::10]:8080"),
        ]
    );
    assert_eq!(cur.chains.iter().map(|c| c.0).collect::<Vec<_>>(), vec![Family::Ipv6]);
}

#[test]
fn parse_save_of_nothing_is_empty() {
    assert_eq!(parse_save(Family::Ipv4, ""), Current::default());
    let foreign = "*filter\n:INPUT ACCEPT [0:0]\n:DOCKER - [0:0]\n-A INPUT -j DOCKER\n-A DOCKER -j RETURN\nCOMMIT\n";
    assert_eq!(parse_save(Family::Ipv4, foreign), Current::default());
}

#[test]
fn parse_save_keeps_duplicates_and_an_empty_own_chain() {
    let text = "*nat\n:BRIDGE-NAT-DNAT - [0:0]\n:BRIDGE-NAT-POSTRT - [0:0]\n\
                -A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT\n\
                -A POSTROUTING -m comment --comment bridge-nat -j BRIDGE-NAT-POSTRT\nCOMMIT\n";
    let cur = parse_save(Family::Ipv4, text);
    assert_eq!(cur.rules.len(), 2);
    assert_eq!(cur.chains.len(), 2);
}

#[test]
fn comments_that_need_quotes_stay_quoted() {
    assert_eq!(unquote_comment("-m comment --comment \"a b\" -j X"), "-m comment --comment \"a b\" -j X");
    assert_eq!(unquote_comment("-m comment --comment \"a\\\"b\" -j X"), "-m comment --comment \"a\\\"b\" -j X");
    assert_eq!(unquote_comment("-m comment --comment \"a:b\" -j X"), "-m comment --comment a:b -j X");
    assert_eq!(unquote_comment("-m comment --comment \"a:b\""), "-m comment --comment a:b");
    assert_eq!(unquote_comment("-m comment --comment plain -j X"), "-m comment --comment plain -j X");
}

#[test]
fn jump_target_and_builtin() {
    assert_eq!(jumps(Family::Ipv4)[0].jump_target(), Some(DNAT));
    assert_eq!(r4("nat", DNAT, "-p tcp -j DNAT --to-destination 1.2.3.4:5").jump_target(), None);
    assert_eq!(r4("filter", "FORWARD", "-j DOCKER-USER").jump_target(), None);
    assert!(r4("filter", "FORWARD", "-j X").in_builtin_chain());
    assert!(!r4("filter", FWD, "-j X").in_builtin_chain());
    assert_eq!(r4("nat", DNAT, "-j RETURN").to_string(), "ipv4 nat -A BRIDGE-NAT-DNAT -j RETURN");
}

// ---------------------------------------------------------------- simulator and properties

type ChainKey = (Family, String, String);

/// iptables-restore --noflush, as far as the plugin's scripts use it, failing where the kernel
/// would: unknown chain, jump to a missing chain, -D of an absent rule, -X of a non-empty or
/// still referenced chain, and any chain line for a built-in or foreign chain.
#[derive(Debug, Default)]
struct Sim {
    chains: BTreeMap<ChainKey, Vec<String>>,
}

impl Sim {
    fn from_current(cur: &Current) -> Sim {
        let mut s = Sim::default();
        for c in &cur.chains {
            s.chains.entry(c.clone()).or_default();
        }
        for r in &cur.rules {
            s.chains.entry((r.family, r.table.clone(), r.chain.clone())).or_default().push(r.spec.clone());
        }
        s
    }

    fn chain_mut(&mut self, key: &ChainKey) -> std::result::Result<&mut Vec<String>, String> {
        if is_own_chain(&key.2) {
            self.chains.get_mut(key).ok_or_else(|| format!("no chain {key:?}"))
        } else {
            Ok(self.chains.entry(key.clone()).or_default())
        }
    }

    fn check_target(&self, f: Family, table: &str, spec: &str) -> std::result::Result<(), String> {
        match Rule::new(f, table, "X", spec).jump_target() {
            Some(t) if !self.chains.contains_key(&(f, table.to_string(), t.to_string())) => {
                Err(format!("jump to missing chain {t}"))
            }
            _ => Ok(()),
        }
    }

    fn apply(&mut self, f: Family, script: &str) -> std::result::Result<(), String> {
        let mut table: Option<String> = None;
        for line in script.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_string());
                continue;
            }
            if line == "COMMIT" {
                table = None;
                continue;
            }
            let t = table.clone().ok_or_else(|| format!("{line:?} outside a table"))?;
            let key = |c: &str| (f, t.clone(), c.to_string());
            if let Some(decl) = line.strip_prefix(':') {
                let (c, rest) = decl.split_once(' ').ok_or("bad declaration")?;
                if rest != "- [0:0]" || !is_own_chain(c) {
                    return Err(format!("declaration {line:?} of a built-in or foreign chain"));
                }
                self.chains.entry(key(c)).or_default().clear();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (c, spec) = rest.split_once(' ').ok_or("bad -A")?;
                self.check_target(f, &t, spec)?;
                self.chain_mut(&key(c))?.push(spec.to_string());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let (c, rest) = rest.split_once(' ').ok_or("bad -I")?;
                let spec = rest.strip_prefix("1 ").ok_or("-I without position 1")?;
                self.check_target(f, &t, spec)?;
                self.chain_mut(&key(c))?.insert(0, spec.to_string());
            } else if let Some(rest) = line.strip_prefix("-D ") {
                let (c, spec) = rest.split_once(' ').ok_or("bad -D")?;
                let chain = self.chain_mut(&key(c))?;
                let at = chain.iter().position(|s| s == spec).ok_or_else(|| format!("{line:?}: no such rule"))?;
                chain.remove(at);
            } else if let Some(c) = line.strip_prefix("-X ") {
                let k = key(c);
                if !is_own_chain(c) {
                    return Err(format!("{line:?} of a foreign chain"));
                }
                match self.chains.get(&k) {
                    None => return Err(format!("{line:?}: no such chain")),
                    Some(rules) if !rules.is_empty() => return Err(format!("{line:?}: chain not empty")),
                    Some(_) => {}
                }
                let referenced = self.chains.iter().any(|((rf, rt, rc), specs)| {
                    *rf == f
                        && *rt == t
                        && specs.iter().any(|s| Rule::new(f, &t, rc, s.as_str()).jump_target() == Some(c))
                });
                if referenced {
                    return Err(format!("{line:?}: chain still referenced"));
                }
                self.chains.remove(&k);
            } else {
                return Err(format!("unknown line {line:?}"));
            }
        }
        if table.is_some() {
            return Err("missing COMMIT".into());
        }
        Ok(())
    }

    fn apply_tx(&mut self, tx: &Transaction) -> std::result::Result<(), String> {
        for f in [Family::Ipv4, Family::Ipv6] {
            if let Some(s) = tx.script(f) {
                self.apply(f, &s)?;
            }
        }
        Ok(())
    }

    fn rules(&self) -> Vec<Rule> {
        self.chains
            .iter()
            .flat_map(|((f, t, c), specs)| specs.iter().map(move |s| Rule::new(*f, t, c, s.as_str())))
            .collect()
    }

    fn own_chains(&self) -> BTreeSet<ChainKey> {
        self.chains.keys().filter(|k| is_own_chain(&k.2)).cloned().collect()
    }

    fn current(&self) -> Current {
        Current { rules: self.rules(), chains: self.own_chains() }
    }
}

/// Rules shaped like plan::plan's, over both families and tables, plus an own chain reached
/// only by its own rules.
fn universe() -> Vec<Rule> {
    let mut u = Vec::new();
    for f in [Family::Ipv4, Family::Ipv6] {
        u.extend(jumps(f));
        for (i, port) in [30080, 30081, 30082].into_iter().enumerate() {
            let c = format!("-m comment --comment bridge-nat:dind:c{i}:net1");
            u.push(Rule::new(
                f,
                "nat",
                DNAT,
                format!("-p tcp -m tcp --dport {port} {c} -j DNAT --to-destination pod{i}:80"),
            ));
            u.push(Rule::new(
                f,
                "filter",
                FWD,
                format!("-d pod{i} -o dind-br0 -p tcp -m tcp --dport 80 {c} -j ACCEPT"),
            ));
        }
        u.push(Rule::new(
            f,
            "nat",
            POSTRT,
            "-s subnet ! -o dind-br0 -m comment --comment bridge-nat:dind -j MASQUERADE",
        ));
        u.push(Rule::new(f, "nat", POSTRT, "-s subnet -o dind-br0 -m comment --comment bridge-nat:dind -j MASQUERADE"));
        u.push(Rule::new(f, "filter", FWD, "-i dind-br0 -m comment --comment bridge-nat:dind -j ACCEPT"));
    }
    u.push(r4("mangle", "BRIDGE-NAT-MARK", "-j MARK --set-xmark 0x64/0x1fff"));
    u.push(r4("mangle", "BRIDGE-NAT-MARK", "-j CONNMARK --save-mark"));
    u
}

fn pick(universe: &[Rule], counts: &[u8]) -> Vec<Rule> {
    universe.iter().zip(counts).flat_map(|(r, n)| std::iter::repeat_n(r.clone(), *n as usize)).collect()
}

fn set_of(universe: &[Rule], mask: &[bool]) -> BTreeSet<Rule> {
    universe.iter().zip(mask).filter(|(_, k)| **k).map(|(r, _)| r.clone()).collect()
}

fn check_reaches(cur: &Current, b: &BTreeSet<Rule>) -> std::result::Result<(), TestCaseError> {
    let tx = diff(cur, b);
    let mut sim = Sim::from_current(cur);
    if let Err(e) = sim.apply_tx(&tx) {
        return Err(TestCaseError::fail(format!(
            "{e}\nv4:\n{}\nv6:\n{}",
            tx.script(Family::Ipv4).unwrap_or_default(),
            tx.script(Family::Ipv6).unwrap_or_default()
        )));
    }
    let got = sim.rules();
    let got_set: BTreeSet<Rule> = got.iter().cloned().collect();
    prop_assert_eq!(got.len(), got_set.len(), "duplicates left: {:?}", got);
    prop_assert_eq!(&got_set, b);
    prop_assert_eq!(sim.own_chains(), Current::from_rules(b).chains);
    // Converged: nothing more to do.
    prop_assert!(diff(&sim.current(), b).is_empty());
    Ok(())
}

const N: usize = 28;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn diff_takes_a_to_b(a in prop::collection::vec(any::<bool>(), N), b in prop::collection::vec(any::<bool>(), N)) {
        let u = universe();
        prop_assert_eq!(u.len(), N);
        let a = set_of(&u, &a);
        let b = set_of(&u, &b);
        check_reaches(&Current::from_rules(&a), &b)?;
    }

    #[test]
    fn diff_takes_a_with_duplicates_to_b(a in prop::collection::vec(0u8..3, N), b in prop::collection::vec(any::<bool>(), N)) {
        let u = universe();
        let rules = pick(&u, &a);
        let cur = Current { chains: Current::from_rules(&rules).chains, rules };
        check_reaches(&cur, &set_of(&u, &b))?;
    }

    #[test]
    fn diff_from_parse_save_of_the_simulated_state(a in prop::collection::vec(any::<bool>(), N), b in prop::collection::vec(any::<bool>(), N)) {
        // Render A as iptables-save would (with quoted comments), parse it back, and diff from there.
        let u = universe();
        let a = set_of(&u, &a);
        let sim = Sim::from_current(&Current::from_rules(&a));
        for f in [Family::Ipv4, Family::Ipv6] {
            let mut text = String::new();
            let tables: BTreeSet<&String> = sim.chains.keys().filter(|k| k.0 == f).map(|k| &k.1).collect();
            for t in tables {
                text.push_str(&format!("*{t}\n"));
                for ((_, _, c), _) in sim.chains.iter().filter(|(k, _)| k.0 == f && &k.1 == t) {
                    let policy = if is_own_chain(c) { "-" } else { "ACCEPT" };
                    text.push_str(&format!(":{c} {policy} [0:0]\n"));
                }
                for ((_, _, c), specs) in sim.chains.iter().filter(|(k, _)| k.0 == f && &k.1 == t) {
                    for s in specs {
                        let quoted = match s.split_once("--comment ") {
                            Some((pre, rest)) if rest.contains(':') => {
                                let (val, post) = rest.split_once(' ').unwrap_or((rest, ""));
                                format!("{pre}--comment \"{val}\" {post}")
                            }
                            _ => s.clone(),
                        };
                        text.push_str(&format!("-A {c} {}\n", quoted.trim_end()));
                    }
                }
                text.push_str("COMMIT\n");
            }
            let parsed = parse_save(f, &text);
            let want = Current::from_rules(a.iter().filter(|r| r.family == f));
            prop_assert_eq!(parsed.chains, want.chains);
            prop_assert_eq!(parsed.rules.into_iter().collect::<BTreeSet<_>>(), want.rules.into_iter().collect::<BTreeSet<_>>());
        }
        check_reaches(&Current::from_rules(&a), &set_of(&u, &b))?;
    }
}
