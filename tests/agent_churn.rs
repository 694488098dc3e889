//! The agent's cost follows what changed, not the size of the node: a burst of new veths on the
//! bridge (what a deployment rolling out looks like to the kernel: links, bridge ports, IPv6
//! link-local addresses and routes) starts no check pass, and a route wiped in the middle of such
//! a burst is still repaired at once. Real agent process, real kernel events, real packets.

mod common;

use common::agent::{text, tool, Agent};
use common::uplinks::*;
use common::{both_backends, require_root, wait_for, Backend, Node};
use std::time::{Duration, Instant};

/// What the agent issue asks of a repair.
const REPAIR_DEADLINE: Duration = Duration::from_secs(2);

/// The check passes the agent ran so far (it logs each at debug level).
fn passes(node: &Node) -> usize {
    node.log().matches("check pass (").count()
}

/// `count` veth pairs, one end on the bridge, both up, as the bridge plugin attaches a pod.
fn veth_burst_script(first: usize, count: usize) -> String {
    format!(
        "for i in $(seq {first} {}); do ip link add bnv$i type veth peer name bnp$i && \
         ip link set bnv$i master dind-br0 up && ip link set bnp$i up; done",
        first + count - 1
    )
}

fn burst_of_new_veths_starts_no_pass_and_a_route_wiped_meanwhile_is_repaired(backend: Backend) {
    if !require_root() {
        return;
    }
    let t = Topology::new(backend);
    t.strict_rp_filter();
    let conf = t.conflist(two_uplink_entry(&t.node));
    let pod = Pod::add(&t.node, &conf, "web");
    let _server = pod.serve();
    let node = &t.node;
    expect_reply(node, &t.client2, UP2, PORT_UP2, "pod");
    let _agent = Agent::start_with(node, &["--log-level", "debug"]);
    // The start's full reconcile, then quiet.
    std::thread::sleep(Duration::from_millis(1500));

    let before = passes(node);
    node.ns.sh_ok(&veth_burst_script(0, 40));
    std::thread::sleep(Duration::from_millis(1000));
    let after = passes(node);
    assert_eq!(after, before, "40 new veths on the bridge started {} check pass(es):\n{}", after - before, node.log());

    // The same kind of burst with the tables of up2 flushed in its middle.
    let script = format!(
        "{}; ip route flush table 100; ip route flush table 101; {}",
        veth_burst_script(40, 20),
        veth_burst_script(60, 20)
    );
    node.ns.sh_ok(&script);
    let t0 = Instant::now();
    let mut last = String::new();
    let answered = wait_for(
        || {
            let out = t.client2.sh(&format!("socat -T1 - TCP:{UP2}:{PORT_UP2},connect-timeout=0.4 </dev/null"));
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            last == "pod"
        },
        REPAIR_DEADLINE,
    );
    assert!(answered, "no answer on up2 within {REPAIR_DEADLINE:?} of the flush: {last}\n{}", diagnostics(node));
    eprintln!("repaired during the burst in {:?} ({backend:?})", t0.elapsed());
    assert!(passes(node) > after, "the repair went through a check pass");
    let check = tool(node, "check");
    assert!(check.status.success(), "the node is not right afterwards: {}", text(&check));
}
both_backends!(burst_of_new_veths_starts_no_pass_and_a_route_wiped_meanwhile_is_repaired);
