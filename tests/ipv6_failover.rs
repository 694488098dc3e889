//! Egress failover moves the pods' IPv6 traffic with their IPv4 traffic, on the dual-stack node of
//! tests/common/dual_stack.rs (providers that drop foreign sources). The pods leave by wan1, wan0
//! is the fallback; the agent probes 203.0.113.10 through each. isp1 black-holes what the node
//! sends while wan1's link stays up: the IPv6 source rule moves to wan0's table with the IPv4 one,
//! a new IPv6 connection leaves from wan0's address, and an IPv6 UDP session (one source port
//! throughout) is answered from wan0's address from its first datagram after the switch, because
//! the agent forgets the session's flow masqueraded to wan1's address. isp1 recovers: both come
//! back to wan1.

mod common;

use common::agent::Agent;
use common::dual_stack::*;
use common::uplinks::Pod;
use common::{both_backends, require_root, wait_for, Backend, Background, Netns};
use serde_json::json;
use std::time::Duration;

const SESSION_PORT: u16 = 40123;
const UDP_PORT: u16 = 9001;

/// A UDP server in `inet` answering each datagram with the source address it came from.
fn serve_udp6(inet: &Netns) -> Background {
    inet.spawn(&format!(
        "exec python3 -c 'import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
         s.bind((\"{INET}\",{UDP_PORT}))\nwhile True:\n d,a=s.recvfrom(100)\n s.sendto(a[0].encode(),a)'"
    ))
}

/// One datagram of the pod's IPv6 UDP session (always from `SESSION_PORT`) and the source the
/// server saw (None: no answer within a second).
fn udp6_source(pod: &Netns) -> Option<String> {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('',{SESSION_PORT}))\n\
         s.settimeout(1)\ns.sendto(b'x',('{INET}',{UDP_PORT}))\n\
         try: print(s.recv(100).decode().strip())\nexcept socket.timeout: sys.exit(1)\n"
    );
    let out = pod.exec(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

#[track_caller]
fn expect_session_from(site: &Site, pod: &Pod, want: &str, within: Duration) {
    let mut last = None;
    let ok = wait_for(
        || {
            last = udp6_source(&pod.ns);
            last.as_deref() == Some(want)
        },
        within,
    );
    assert!(ok, "the UDP session is not answered from {want} (last {last:?})\n{}", site.diagnostics());
}

/// Once new connections leave by the other uplink, the session's next datagram is answered from
/// it at once: the kernel would drop it and forget the flow itself (its masquerade was bound to
/// the uplink left), losing that datagram, so the agent forgets the flow when it switches.
#[track_caller]
fn expect_first_datagram_from(site: &Site, pod: &Pod, want: &str) {
    let got = udp6_source(&pod.ns);
    assert_eq!(got.as_deref(), Some(want), "the session's first datagram after the switch\n{}", site.diagnostics());
}

fn ipv6_egress_fails_over_with_ipv4_and_its_udp_session_follows(backend: Backend) {
    if !require_root() {
        return;
    }
    let site = Site::new(backend);
    let mut entry = site.entry();
    entry["routing"]["outbound"]["fallback"] = json!(["wan0"]);
    entry["routing"]["health"] = json!({ "targets": [INET_V4], "intervalMs": 300, "timeoutMs": 200,
                                         "failAfter": 2, "recoverAfter": 2 });
    let conf = site.conflist(entry, true, true);
    let pod = Pod::add(&site.node, &conf, "a");
    let _agent = Agent::start(&site.node);
    let _udp = serve_udp6(&site.inet);
    let _tcp = serve_peer_address(&site.inet);
    expect_session_from(&site, &pod, WAN1, Duration::from_secs(15));
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN1));

    // isp1 drops everything the node sends it; wan1's link stays up.
    site.isp1.sh_ok("ip6tables -I FORWARD -i wan -j DROP && iptables -I FORWARD -i wan -j DROP");
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN0));
    expect_first_datagram_from(&site, &pod, WAN0);
    let rules6 = site.node.ns.sh_ok("ip -6 rule");
    assert!(rules6.contains("110:\tfrom fd00:20::/64 lookup 101"), "{rules6}");
    pod.cni(&site.node, "check", &conf).assert_ok("CHECK while failed over");

    site.isp1.sh_ok("ip6tables -D FORWARD 1 && iptables -D FORWARD 1");
    site.expect_reply(&pod.ns, INET, PEER_PORT, &socat_form(WAN1));
    expect_first_datagram_from(&site, &pod, WAN1);
}

both_backends!(ipv6_egress_fails_over_with_ipv4_and_its_udp_session_follows);
