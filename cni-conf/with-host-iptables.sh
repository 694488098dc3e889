#!/bin/sh
# with-host-iptables COMMAND...: run COMMAND with iptables, iptables-save, iptables-restore and their
# ip6tables twins pointing at the backend the host uses, legacy or nf_tables.
#
# In the agent's image (cni-conf/Containerfile). On the host, CNI calls run the host's own iptables;
# if the agent wrote the same rules through the other backend, the node would end up with two
# firewalls. The first hint that answers decides: where bridge-nat's own chains are, then where
# kubelet keeps its hint chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY in mangle), then whichever
# backend holds more rules; nf_tables on a tie. IPTABLES_MODE=legacy|nft overrides all of it.
# A config naming iptables-legacy or iptables-nft explicitly gets that tool regardless.
set -eu

bindir=${HOST_IPTABLES_DIR:-/run/host-iptables}
sbin=${IPTABLES_SBIN:-/usr/sbin}

# Lines matching $2 in both families' rulesets of backend $1 (0 when the backend is unusable).
count() {
  { "$sbin/iptables-$1-save" 2>/dev/null; "$sbin/ip6tables-$1-save" 2>/dev/null; } | grep -c -e "$2" || true
}

mode=${IPTABLES_MODE:-}
if [ -z "$mode" ]; then
  for hint in '^:BRIDGE-NAT-' '^:KUBE-IPTABLES-HINT \|^:KUBE-KUBELET-CANARY '; do
    if [ "$(count nft "$hint")" -gt 0 ]; then mode=nft; break; fi
    if [ "$(count legacy "$hint")" -gt 0 ]; then mode=legacy; break; fi
  done
fi
if [ -z "$mode" ]; then
  if [ "$(count legacy '^-')" -gt "$(count nft '^-')" ]; then mode=legacy; else mode=nft; fi
fi
case "$mode" in
  legacy | nft) ;;
  *) echo "with-host-iptables: IPTABLES_MODE must be legacy or nft, not $mode" >&2; exit 2 ;;
esac

mkdir -p "$bindir"
for family in iptables ip6tables; do
  for tool in "" -save -restore; do
    # As update-alternatives does: the link chain ends in xtables-legacy-multi or xtables-nft-multi
    # (the backend), which picks the tool by the name it is called by.
    ln -sfn "$sbin/$family-$mode$tool" "$bindir/$family$tool"
  done
done
echo "with-host-iptables: the host uses iptables-$mode" >&2
PATH="$bindir:$PATH" exec "$@"
