#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian's packages (idempotent).
set -euo pipefail
packages=(
  iproute2 iptables nftables conntrack       # the node: namespaces, firewall, conntrack inspection
  containernetworking-plugins                # the real bridge and host-local plugins we chain after
  golang-go golang-github-appc-cni-dev       # libcni, for the test driver (tests/driver)
  socat netcat-openbsd procps                # real packets in tests
  radvd                                      # a provider's IPv6 router advertisements (tests/ipv6_routing.rs)
  containerd runc busybox-static             # a real containerd CRI runtime (tests/containerd.rs); busybox is its pause image
  prometheus curl                            # a real Prometheus scraping the agent's /metrics (tests/metrics.rs)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Installing containerd must not start the machine's own containerd service (where systemd runs):
  # the tests start private ones. policy-rc.d answering 101 keeps every package's service stopped.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The CRI client (tests/cri/cri.py) is generated at test time from tests/cri/api.proto with grpc_tools.
if ! python3 -c 'import grpc, grpc_tools.protoc' 2>/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing python packages grpcio grpcio-tools (run as root to install them)" >&2
    exit 1
  fi
  echo "installing: grpcio grpcio-tools (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore grpcio grpcio-tools
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (1.89 or later)" >&2; exit 1; }
