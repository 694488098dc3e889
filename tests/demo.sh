#!/usr/bin/env bash
# The seed's picture in throwaway network namespaces: a node with two uplinks (eth0 and eth5), a
# router and a client behind each (each client reachable only through its own uplink), one pod on
# dind-br0 attached by bridge + host-local + bridge-nat through libcni with the seed's configuration
# shape, and the node agent. Both clients reach the pod through their own uplink, over IPv4 and IPv6
# (eth5's IPv6 gateway is link-local, as a router advertisement installs it); eth5 flaps and the
# agent repairs it; eth5's provider goes dark with its link up and the pod's own traffic fails over to
# eth0, then comes back; DEL leaves the node clean. Nothing outside those namespaces is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
bindir="${1:-/opt/cni/bin}"
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (network namespaces)" >&2; exit 1; }
bash tests/install-deps.sh >&2
driver=$(bash tests/driver/build.sh)
bn="$bindir/bridge-nat"

tag="bnd$$"
node="$tag-node" pod="$tag-pod" ra="$tag-ra" rb="$tag-rb" ca="$tag-ca" cb="$tag-cb"
work=$(mktemp -d)
agent=""
cleanup() {
  if [ -n "$agent" ]; then kill "$agent" 2>/dev/null; wait "$agent" 2>/dev/null || true; fi
  for ns in "$ca" "$cb" "$ra" "$rb" "$pod" "$node"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "/etc/netns/$node" "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
fail() { echo "demo: $*" >&2; exit 1; }

step "node with uplinks eth0 (198.51.100.1) and eth5 (192.0.2.1); client A only behind eth0, client B only behind eth5"
for ns in "$node" "$pod" "$ra" "$rb" "$ca" "$cb"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
# The node's own iproute2 config, so table names never reach this machine's /etc/iproute2.
mkdir -p "/etc/netns/$node/iproute2/rt_tables.d" && cp /etc/iproute2/rt_tables "/etc/netns/$node/iproute2/" 2>/dev/null ||
  printf '255\tlocal\n254\tmain\n253\tdefault\n0\tunspec\n' > "/etc/netns/$node/iproute2/rt_tables"
link() { # ns1 if1 addr1 ns2 if2 addr2
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2" && ip -n "$1" link set "$2" up
  ip -n "$4" addr add "$6" dev "$5" && ip -n "$4" link set "$5" up
}
link "$node" eth0 198.51.100.1/24 "$ra" wan 198.51.100.254/24
link "$node" eth5 192.0.2.1/24 "$rb" wan 192.0.2.254/24
link "$ra" lan 203.0.113.1/25 "$ca" eth0 203.0.113.10/25
link "$rb" lan 203.0.113.129/25 "$cb" eth0 203.0.113.140/25
for r in "$ra" "$rb"; do nsx "$r" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1; done
# IPv6 the same way; router B is eth5's gateway by its link-local address fe80::1.
v6() { ip -n "$1" addr add "$2" dev "$3" nodad; }
v6 "$node" 2001:db8:a::1/64 eth0; v6 "$ra" 2001:db8:a::ff/64 wan
v6 "$node" 2001:db8:b::1/64 eth5; v6 "$rb" 2001:db8:b::ff/64 wan; v6 "$rb" fe80::1/64 wan
v6 "$ra" 2001:db8:ca::1/64 lan; v6 "$ca" 2001:db8:ca::10/64 eth0
v6 "$rb" 2001:db8:cb::1/64 lan; v6 "$cb" 2001:db8:cb::10/64 eth0
nsx "$ca" ip -6 route add default via 2001:db8:ca::1
nsx "$cb" ip -6 route add default via 2001:db8:cb::1
nsx "$node" ip -6 route add default via 2001:db8:a::ff dev eth0 metric 100
nsx "$node" ip -6 route add default via fe80::1 dev eth5 proto ra metric 1024
# "The internet": 100.64.100.1 answers behind either provider (pings, and a server that says which
# provider it is and which address it sees).
for r in "$ra" "$rb"; do nsx "$r" ip addr add 100.64.100.1/32 dev lo; done
nsx "$ca" ip route add default via 203.0.113.1
nsx "$cb" ip route add default via 203.0.113.129
nsx "$node" ip route add default via 198.51.100.254 dev eth0
nsx "$node" ip route add default via 192.0.2.254 dev eth5 metric 200
nsx "$node" sysctl -qw net.ipv4.conf.all.rp_filter=1
echo "main table of the node: default via eth0 (preferred), via eth5 (metric 200); strict rp_filter"
echo "IPv6: eth0 2001:db8:a::1 (preferred), eth5 2001:db8:b::1 (default via fe80::1 proto ra); client A"
echo "2001:db8:ca::10, client B 2001:db8:cb::10"

cat > "$work/dind.conflist" <<JSON
{ "cniVersion": "1.0.0", "name": "dind", "plugins": [
  { "type": "bridge", "bridge": "dind-br0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": { "type": "host-local", "dataDir": "$work/ipam",
              "ranges": [[{ "subnet": "10.20.0.0/24", "rangeStart": "10.20.0.10", "rangeEnd": "10.20.0.50", "gateway": "10.20.0.1" }],
                         [{ "subnet": "fd00:20::/64", "gateway": "fd00:20::1" }]],
              "routes": [{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }] } },
  { "type": "bridge-nat", "capabilities": { "portMappings": true },
    "stateDir": "$work/state", "logFile": "$work/bridge-nat.log",
    "routing": { "enabled": true, "tableId": 100, "tableName": "dind_net1", "fwmark": "0x64", "rulePriority": 100,
                 "outbound": { "interface": "eth5", "fallback": ["eth0"] },
                 "health": { "targets": ["100.64.100.1"], "intervalMs": 300, "timeoutMs": 200, "failAfter": 3, "recoverAfter": 3 } },
    "portForwarding": { "rules": [
      { "name": "docker-tls", "hostPort": 2376, "destIP": "10.20.0.10", "destPort": 2376, "protocol": "tcp" },
      { "name": "web-app", "hostPort": 30080, "destIP": "10.20.0.10", "destPort": 8080, "protocol": "tcp",
        "routing": { "fwmark": "0x65", "tableId": 101, "tableName": "dind_eth0", "outbound": { "interface": "eth0" } } } ] } } ] }
JSON
export CNI_PATH="$bindir:/usr/lib/cni"
cni() { nsx "$node" "$driver" "$1" --conflist "$work/dind.conflist" --netns "/var/run/netns/$pod" \
          --container-id demo-pod --ifname net1 --cache-dir "$work/cache" "${@:2}"; }
tool() { nsx "$node" "$bn" "$@" --state-dir "$work/state" --log-file "$work/bridge-nat.log"; }

step "the node agent: bridge-nat watch"
ip netns exec "$node" "$bn" watch --state-dir "$work/state" --log-file "$work/bridge-nat.log" 2>/dev/null &
agent=$!   # ip execs the agent: this is its pid
for _ in $(seq 50); do grep -q "node agent started" "$work/bridge-nat.log" 2>/dev/null && break; sleep 0.1; done

step "ADD (bridge -> host-local -> bridge-nat): the seed's rules, plus a runtime port mapping 8443 -> 8080"
cni add --port-mappings '[{"hostPort":8443,"containerPort":8080,"protocol":"tcp"}]' >/dev/null && echo "ADD done"
ip netns exec "$pod" socat TCP4-LISTEN:8080,reuseaddr,fork SYSTEM:'echo hello from the pod - you are \$SOCAT_PEERADDR' &
ip netns exec "$pod" socat TCP6-LISTEN:8080,ipv6only=1,reuseaddr,fork SYSTEM:'echo hello from the pod - you are \$SOCAT_PEERADDR' &
ip netns exec "$pod" socat TCP-LISTEN:2376,reuseaddr,fork SYSTEM:'echo docker-tls answers \$SOCAT_PEERADDR' &
disown -a   # the cleanup kills them with the namespaces; no job notices
for _ in $(seq 50); do nsx "$pod" ss -ltn | grep -q ':2376' && break; sleep 0.1; done

step "what is forwarded here: bridge-nat list"
tool list

ask() { # client-ns address port expected-substring
  local reply
  for _ in $(seq 30); do
    reply=$(nsx "$1" socat -T2 - "TCP:$2:$3,connect-timeout=1" </dev/null 2>/dev/null || true)
    [[ "$reply" == *"$4"* ]] && { printf '  %-10s -> %s:%s  %s\n' "$5" "$2" "$3" "$reply"; return 0; }
    sleep 0.1
  done
  fail "$5 got no answer from $2:$3 (last: ${reply:-nothing})"
}
step "each client reaches the pod through its own uplink; the replies leave by that uplink"
ask "$ca" 198.51.100.1 30080 "hello from the pod" "client A"
ask "$cb" 192.0.2.1 30080 "hello from the pod" "client B"
ask "$ca" 198.51.100.1 2376 "docker-tls" "client A"
ask "$cb" 192.0.2.1 2376 "docker-tls" "client B"

step "over IPv6 too (8443, the runtime's mapping, forwards both families): client B's replies leave by eth5"
ask "$ca" "[2001:db8:a::1]" 8443 "hello from the pod" "client A"
ask "$cb" "[2001:db8:b::1]" 8443 "hello from the pod" "client B"
nsx "$node" ip -6 rule | grep -E "fwmark|fd00:20" | sed 's/^/  ip -6 rule  /'
nsx "$node" ip -6 route show table dind_net1 | grep default | sed 's/^/  table dind_net1 (IPv6)  /'

step "eth5 flaps (a modem reconnecting): its routes vanish from the tables; DHCP puts main's default back"
nsx "$node" ip link set eth5 down
nsx "$node" ip link set eth5 up
nsx "$node" ip route replace default via 192.0.2.254 dev eth5 metric 200
start=$(date +%s%N)
ask "$cb" 192.0.2.1 30080 "hello from the pod" "client B"
echo "  answered again after $(( ($(date +%s%N) - start) / 1000000 )) ms; the agent's log says:"
grep "repaired:" "$work/bridge-nat.log" | sed 's/^/    /' | tail -4
tool check | sed 's/^/  /'

step "the pod's own traffic leaves by eth5; then eth5's provider goes dark (link up, nothing carried)"
ip netns exec "$ra" socat TCP-LISTEN:80,bind=100.64.100.1,reuseaddr,fork SYSTEM:'echo provider A sees \$SOCAT_PEERADDR' &
ip netns exec "$rb" socat TCP-LISTEN:80,bind=100.64.100.1,reuseaddr,fork SYSTEM:'echo provider B sees \$SOCAT_PEERADDR' &
disown -a
egress() { # expected-substring what
  local reply start=$(date +%s%N)
  for _ in $(seq 100); do
    reply=$(nsx "$pod" socat -T1 - "TCP:100.64.100.1:80,connect-timeout=0.5" </dev/null 2>/dev/null || true)
    [[ "$reply" == *"$1"* ]] && { printf '  pod -> 100.64.100.1:80  %s  (%s ms)\n' "$reply" $(( ($(date +%s%N) - start) / 1000000 )); return 0; }
    sleep 0.1
  done
  fail "$2: the pod's traffic did not leave by the expected uplink (last: ${reply:-nothing})"
}
egress "provider B sees 192.0.2.1" "before"
nsx "$rb" iptables -I INPUT -i wan -j DROP
nsx "$rb" iptables -I FORWARD -i wan -j DROP
echo "  provider B drops everything from the node; eth5 stays up"
egress "provider A sees 198.51.100.1" "failover"
grep -E "uplink eth5 is|now leaves by" "$work/bridge-nat.log" | sed 's/^.*watch: /    /' | tail -2
tool list | grep -E "^(uplink|egress)" | sed 's/^/  /'
nsx "$rb" iptables -F
echo "  provider B carries traffic again"
egress "provider B sees 192.0.2.1" "recovery"

step "DEL, and what bridge-nat leaves on the node"
cni del && echo "DEL done"
kill "$agent" && wait "$agent" 2>/dev/null || true
agent=""
left=$( { nsx "$node" iptables-save; nsx "$node" ip6tables-save; nsx "$node" nft list ruleset; nsx "$node" ip rule;
          nsx "$node" ip -6 rule; nsx "$node" ip route show table all; nsx "$node" ip -6 route show table all; } |
  grep -ciE 'bridge-nat|BRIDGE-NAT|dind_|fwmark' || true)
echo "bridge-nat objects left on the node: $left"
[ "$left" -eq 0 ] || fail "objects left behind"
echo
echo "demo passed (log: the node's bridge-nat.log, removed with the namespaces)"
