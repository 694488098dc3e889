#!/usr/bin/env bash
# A pod on dind-br0 inside throwaway network namespaces, attached by bridge + host-local +
# bridge-nat through libcni, reached by an outside client through the node's uplink.
# Nothing outside those namespaces is touched; they are deleted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bindir="${1:-/opt/cni/bin}"
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (network namespaces)" >&2; exit 1; }
bash tests/install-deps.sh
driver=$(bash tests/driver/build.sh)

tag="bnd$$"
node="$tag-node" pod="$tag-pod" client="$tag-client"
work=$(mktemp -d)
cleanup() {
  for ns in "$client" "$pod" "$node"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "namespaces: node $node, pod $pod, client $client (uplink 203.0.113.0/24)"
for ns in "$node" "$pod" "$client"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add up0 netns "$node" type veth peer name eth0 netns "$client"
ip -n "$node" addr add 203.0.113.1/24 dev up0 && ip -n "$node" link set up0 up
ip -n "$client" addr add 203.0.113.2/24 dev eth0 && ip -n "$client" link set eth0 up

cat > "$work/dind.conflist" <<JSON
{ "cniVersion": "1.0.0", "name": "dind", "plugins": [
  { "type": "bridge", "bridge": "dind-br0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": { "type": "host-local", "dataDir": "$work/ipam",
              "ranges": [[{ "subnet": "10.20.0.0/24", "rangeStart": "10.20.0.10", "rangeEnd": "10.20.0.50", "gateway": "10.20.0.1" }]],
              "routes": [{ "dst": "0.0.0.0/0" }] } },
  { "type": "bridge-nat", "capabilities": { "portMappings": true },
    "stateDir": "$work/state", "logFile": "$work/bridge-nat.log",
    "portForwarding": { "rules": [ { "name": "web-app", "hostPort": 30080, "destPort": 8080, "protocol": "tcp" } ] } } ] }
JSON
export CNI_PATH="$bindir:/usr/lib/cni"
cni() { ip netns exec "$node" "$driver" "$1" --conflist "$work/dind.conflist" --netns "/var/run/netns/$pod" \
          --container-id demo-pod --ifname net1 --cache-dir "$work/cache" "${@:2}"; }

step "ADD (bridge -> host-local -> bridge-nat), with a runtime port mapping 2376 -> 2376"
cni add --port-mappings '[{"hostPort":2376,"containerPort":2376,"protocol":"tcp"}]'
echo
step "the node's NAT rules"
ip netns exec "$node" iptables -t nat -S | grep -i bridge-nat

step "a server in the pod on :8080; the client connects to the node's uplink 203.0.113.1:30080"
ip netns exec "$pod" socat -T5 TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello from the pod - you are \$SOCAT_PEERADDR' &
disown
for _ in $(seq 50); do ip netns exec "$pod" ss -ltn | grep -q ':8080' && break; sleep 0.1; done
reply=$(ip netns exec "$client" socat -T5 - TCP:203.0.113.1:30080,connect-timeout=5 </dev/null)
echo "client received: $reply"
[[ "$reply" == "hello from the pod - you are 203.0.113.2" ]] || { echo "demo: no reply through the DNAT" >&2; exit 1; }

step "CHECK"
cni check && echo "CHECK passed"
step "DEL, then the node's bridge-nat rules"
cni del && echo "DEL done"
left=$(ip netns exec "$node" iptables-save | grep -ci bridge-nat || true)
echo "bridge-nat rules left on the node: $left"
step "log ($work/bridge-nat.log)"
cat "$work/bridge-nat.log"
[ "$left" -eq 0 ]
