//! What probing costs: the agent probing two uplinks every 300 ms (the failover tests' rhythm),
//! with nothing failing, uses at most 2% of a core, and the probe rounds are all that wakes it.
//! CPU time is read from /proc (clock ticks of 1/100 s), as the idle-agent test does.

mod common;

use common::agent::Agent;
use common::providers::*;
use common::uplinks::Pod;
use common::{both_backends, require_root, wait_for, Backend};
use std::time::Duration;

fn probing_two_uplinks_every_300_ms_costs_at_most_2_percent_of_a_core(backend: Backend) {
    if !require_root() {
        return;
    }
    let p = Providers::new(backend);
    p.warm_up();
    let conf = p.conflist();
    let _web = Pod::add(&p.node, &conf, "web");
    let agent = Agent::start(&p.node);
    let probing = wait_for(|| p.node.log().contains("probing uplinks"), Duration::from_secs(5));
    assert!(probing, "the agent does not probe:\n{}", p.node.log());
    std::thread::sleep(Duration::from_secs(2));
    let ticks = agent.cpu_ticks();
    std::thread::sleep(Duration::from_secs(10));
    let used = agent.cpu_ticks() - ticks;
    eprintln!("probing agent ({backend:?}): {used} clock ticks over 10 s");
    // 2% of a core over 10 s is 20 ticks.
    assert!(used <= 20, "probing two uplinks every 300 ms used {used} ticks (> 2% of a core) over 10 s");
    assert!(!p.node.log().contains("is unhealthy"), "nothing failed, yet:\n{}", p.node.log());
}
both_backends!(probing_two_uplinks_every_300_ms_costs_at_most_2_percent_of_a_core);
