//! Unit tests of socket.rs: the messages a transaction holds.

use super::*;

#[test]
fn table_creation_has_every_set_chain_and_rule() {
    let mut tx = Tx::default();
    tx.create_table();
    let count = |k: u16| tx.msgs.iter().filter(|m| m.0 == k).count();
    assert_eq!(count(NEWTABLE), 1);
    assert_eq!(count(NEWSET), layout::SETS.len());
    assert_eq!(count(NEWCHAIN), layout::CHAINS.len());
    assert_eq!(count(NEWRULE), super::super::rules::static_rules().len());
}

#[test]
fn routing_goes_in_with_its_jump_first_in_local_in_and_out_chains_flushed() {
    let mut tx = Tx::default();
    tx.add_routing();
    let rules: Vec<_> = tx.msgs.iter().filter(|m| m.0 == NEWRULE).collect();
    assert_eq!(rules.len(), super::super::rules::routing_rules().len() + 1);
    let jump = rules.last().expect("the jump");
    assert_eq!(jump.1 & NLM_F_APPEND, 0, "the jump must be inserted at the head: {}", jump.3);
    assert!(rules[..rules.len() - 1].iter().all(|m| m.1 & NLM_F_APPEND != 0));
    let live = [LiveRule { chain: layout::LOCAL_IN.into(), comment: layout::PICK_MARK.into(), handle: 9 }];
    let mut tx = Tx::default();
    tx.delete_routing(&live);
    let what: Vec<&str> = tx.msgs.iter().map(|m| m.3.as_str()).collect();
    assert_eq!(
        what,
        [
            "delete rule pick-mark in chain local-in",
            "flush chain pick-mark",
            "delete chain pick-mark",
            "flush chain mangle-pre",
            "delete chain mangle-pre"
        ]
    );
}

#[test]
fn elements_are_grouped_per_set() {
    use super::super::elements::Value;
    let e = |set: &str, port| Element { set: set.into(), key: vec![Value::Port(port)], data: vec![] };
    let (a, b, c) = (e("dnat4-any", 1), e("dnat4-any", 2), e("bridges", 3));
    let mut tx = Tx::default();
    tx.delete_elements([&a, &b, &c]);
    assert_eq!(tx.msgs.len(), 2);
    assert!(tx.msgs.iter().all(|m| m.0 == DELSETELEM));
}
