//! The nftables table's layout as the data plane pays for it: the routing chains (a prerouting
//! hook that sees every packet, and the mark lookups of new connections) exist exactly while an
//! attachment routes by mark; a table left by an earlier bridge-nat is rebuilt at the next ADD.
//!
//! Topology: common/uplinks.rs (two uplinks, each with a router and a client behind it; main's
//! default leaves by up1, so a reply to client2 lives only if a mark routes it by up2).

mod common;

use common::uplinks::*;
use common::{require_root, Backend, NFT_TABLE};
use std::path::Path;

fn chain_exists(t: &Topology, chain: &str) -> bool {
    t.node.ns.sh(&format!("nft list chain inet {NFT_TABLE} {chain}")).status.success()
}

/// The table as nft prints it, for failure messages.
fn table(t: &Topology) -> String {
    String::from_utf8_lossy(&t.node.ns.sh(&format!("nft -a list table inet {NFT_TABLE}")).stdout).into_owned()
}

/// Pod `name` added with `conf`, holding the address `want` (host-local hands them out in order).
fn pod_at(t: &Topology, conf: &Path, name: &str, want: &str) -> Pod {
    let pod = Pod::add(&t.node, conf, name);
    assert_eq!(pod.ipv4(), want, "host-local gave {name} another address than the test binds its rules to");
    pod
}

/// A plain forward bound to pod a and a forward routed by up2 bound to pod b; replies follow
/// their rule's routing, not their arrival, so only b's forward has a mark.
fn conflist(t: &Topology) -> std::path::PathBuf {
    t.conflist(entry(
        &t.node,
        Some(serde_json::json!({ "replyVia": "rule" })),
        &[
            forward("plain", PORT_UP1, Some("10.20.0.10")),
            routed("via-up2", PORT_UP2, Some("10.20.0.11"), "0x65", 101, "dind_up2", "up2"),
        ],
    ))
}

/// 1. Pod a's forward has no mark: the table has no routing chain and no prerouting filter
///    hook. Pod b's routed forward brings them (and its replies leave by up2, which only the mark
///    does); CHECK names the jump to pick-mark once deleted. b's DEL takes them away again while
///    a's forward keeps working, and a's DEL the table.
#[test]
fn routing_chains_exist_exactly_while_an_attachment_routes() {
    if !require_root() {
        return;
    }
    let t = Topology::new(Backend::Nftables);
    let conf = conflist(&t);
    let a = pod_at(&t, &conf, "a", "10.20.0.10");
    let _server_a = a.serve();
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
    for chain in ["pick-mark", "mangle-pre"] {
        assert!(!chain_exists(&t, chain), "chain {chain} without any mark:\n{}", table(&t));
    }
    assert!(!table(&t).contains("hook prerouting priority mangle"), "a prerouting filter hook:\n{}", table(&t));
    a.cni(&t.node, "check", &conf).assert_ok("CHECK a");

    let b = pod_at(&t, &conf, "b", "10.20.0.11");
    let _server_b = b.serve();
    for chain in ["pick-mark", "mangle-pre"] {
        assert!(chain_exists(&t, chain), "no chain {chain} with a mark:\n{}", table(&t));
    }
    expect_reply(&t.node, &t.client2, UP2, PORT_UP2, "pod");
    b.cni(&t.node, "check", &conf).assert_ok("CHECK b");

    let listing = table(&t);
    let jump = listing
        .lines()
        .find(|l| l.contains("jump pick-mark"))
        .unwrap_or_else(|| panic!("no jump to pick-mark:\n{listing}"));
    let handle = jump.rsplit("# handle ").next().expect("nft -a prints handles").trim();
    t.node.ns.sh_ok(&format!("nft delete rule inet {NFT_TABLE} local-in handle {handle}"));
    let out = b.cni(&t.node, "check", &conf);
    assert!(!out.status_ok, "CHECK passed without the jump to pick-mark");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("missing nftables rule pick-mark in chain local-in"), "CHECK said: {text}");

    b.cni(&t.node, "del", &conf).assert_ok("DEL b");
    for chain in ["pick-mark", "mangle-pre"] {
        assert!(!chain_exists(&t, chain), "chain {chain} after the last routed DEL:\n{}", table(&t));
    }
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
    a.cni(&t.node, "check", &conf).assert_ok("CHECK a after DEL b");
    a.cni(&t.node, "del", &conf).assert_ok("DEL a");
    assert!(!t.node.nft_table_exists(), "table after the last DEL:\n{}", table(&t));
}

/// 2. A table whose layout is an earlier bridge-nat's (here: today's without its rules and its
///    chain from-bridge, as an upgrade of the binary finds one): CHECK says so, and the next ADD,
///    though it only adds elements, rebuilds it from every record, so the earlier pod's forward
///    answers again beside the new one.
#[test]
fn a_table_of_an_earlier_layout_is_rebuilt_at_the_next_add() {
    if !require_root() {
        return;
    }
    let t = Topology::new(Backend::Nftables);
    let conf = t.conflist(entry(
        &t.node,
        None,
        &[forward("plain-a", PORT_UP1, Some("10.20.0.10")), forward("plain-b", PORT_UP2, Some("10.20.0.11"))],
    ));
    let a = pod_at(&t, &conf, "a", "10.20.0.10");
    let _server_a = a.serve();
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
    t.node.ns.sh_ok(&format!("nft flush table inet {NFT_TABLE} && nft delete chain inet {NFT_TABLE} from-bridge"));
    let out = a.cni(&t.node, "check", &conf);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.status_ok && text.contains("earlier bridge-nat's layout"), "CHECK said: {text}");

    let b = pod_at(&t, &conf, "b", "10.20.0.11");
    let _server_b = b.serve();
    expect_reply(&t.node, &t.client1, UP1, PORT_UP1, "pod");
    expect_reply(&t.node, &t.client1, UP1, PORT_UP2, "pod");
    a.cni(&t.node, "check", &conf).assert_ok("CHECK a after the rebuild");
    b.cni(&t.node, "check", &conf).assert_ok("CHECK b after the rebuild");
    assert!(t.node.log().contains("earlier bridge-nat's layout"), "the rebuild is not logged:\n{}", t.node.log());
}
