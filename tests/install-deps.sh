#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian's packages (idempotent).
set -euo pipefail
packages=(
  iproute2 iptables nftables conntrack       # the node: namespaces, firewall, conntrack inspection
  containernetworking-plugins                # the real bridge and host-local plugins we chain after
  golang-go golang-github-appc-cni-dev       # libcni, for the test driver (tests/driver)
  socat netcat-openbsd procps                # real packets in tests
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
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (1.89 or later)" >&2; exit 1; }
