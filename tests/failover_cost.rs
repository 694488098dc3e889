//! What probing costs: the agent probing two uplinks every 300 ms (the failover tests' rhythm),
//! with nothing failing, uses at most 2% of a core, and the probe rounds are all that wakes it.
//! CPU time is read from /proc (clock ticks of 1/100 s), as the idle-agent test does. Both with
//! IPv4 uplinks and with dual-stack ones probed in both families.

mod common;

use common::agent::Agent;
use common::dual_stack;
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
/// The same with both families probed: two dual-stack uplinks (one whose IPv6 gateway is an
/// advertised link-local router), `targets` and `targets6`, so four probes a round.
fn probing_two_dual_stack_uplinks_in_both_families_costs_at_most_2_percent_of_a_core(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = dual_stack::Site::new(backend);
    let mut entry = site.entry();
    entry["routing"]["outbound"]["fallback"] = serde_json::json!(["wan0"]);
    entry["routing"]["health"] = serde_json::json!({ "targets": [dual_stack::INET_V4], "targets6": [dual_stack::INET],
        "intervalMs": 300, "timeoutMs": 200, "failAfter": 3, "recoverAfter": 3 });
    let conf = site.conflist(entry, true, true);
    let _pod = Pod::add(&site.node, &conf, "a");
    site.settle();
    let agent = Agent::start(&site.node);
    // Both uplinks answered in both families (as `list` says) before the measurement starts.
    let answering = "IPv4: answering; IPv6: answering";
    let both = || {
        let list = common::agent::text(&common::agent::tool(&site.node, "list"));
        list.lines().filter(|l| l.starts_with("uplink") && l.contains(answering)).count() == 2
    };
    assert!(wait_for(both, Duration::from_secs(10)), "not answering:\n{}", site.diagnostics());
    let ticks = agent.cpu_ticks();
    std::thread::sleep(Duration::from_secs(10));
    let used = agent.cpu_ticks() - ticks;
    eprintln!("probing agent, both families ({backend:?}): {used} clock ticks over 10 s");
    assert!(
        used <= 20,
        "probing two uplinks in both families every 300 ms used {used} ticks (> 2% of a core) over 10 s"
    );
    assert!(!site.node.log().contains("is unhealthy"), "nothing failed, yet:\n{}", site.node.log());
}

both_backends!(
    probing_two_uplinks_every_300_ms_costs_at_most_2_percent_of_a_core,
    probing_two_dual_stack_uplinks_in_both_families_costs_at_most_2_percent_of_a_core
);
