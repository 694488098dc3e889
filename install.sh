#!/usr/bin/env bash
# Build bridge-nat in release mode and install it as a CNI plugin.
#   sudo ./install.sh                      -> /opt/cni/bin/bridge-nat
#   sudo ./install.sh /var/lib/rancher/k3s/data/cni   -> also there (k3s's CNI bin dir)
#   sudo ./install.sh --agent              -> also install the node agent's systemd unit
#                                             (bridge-nat-agent.service) and enable and start it
#                                             where systemd runs
#   sudo ./install.sh --demo               -> install, then attach a pod in throwaway network
#                                             namespaces and show traffic flowing through it
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

demo=false
agent=false
dirs=(/opt/cni/bin)
for arg in "$@"; do
  case "$arg" in
    --demo) demo=true ;;
    --agent) agent=true ;;
    -h|--help) usage; exit 0 ;;
    /*) dirs+=("$arg") ;;
    *) echo "install.sh: unknown argument $arg (directories must be absolute)" >&2; exit 2 ;;
  esac
done

command -v cargo >/dev/null || { echo "install.sh: cargo not found; install Rust 1.89 or later" >&2; exit 1; }
cargo build --release --quiet
for d in "${dirs[@]}"; do
  install -D -m 0755 target/release/bridge-nat "$d/bridge-nat.new"
  mv -f "$d/bridge-nat.new" "$d/bridge-nat"   # atomic: a running runtime never sees half a binary
  echo "installed $d/bridge-nat"
done
"${dirs[0]}/bridge-nat" 2>&1 | sed 's/^/  /'

if $agent; then
  # The unit runs /opt/cni/bin/bridge-nat, which dirs[0] always is.
  unit=/etc/systemd/system/bridge-nat-agent.service
  install -D -m 0644 cni-conf/bridge-nat-agent.service "$unit"
  echo "installed $unit"
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --quiet bridge-nat-agent.service
    systemctl restart bridge-nat-agent.service   # restart, not start: a new binary takes over
    echo "bridge-nat-agent.service enabled and started (journalctl -u bridge-nat-agent)"
  else
    echo "install.sh: systemd is not running here, so bridge-nat-agent.service was NOT enabled or started." >&2
    echo "  Enable it for the next boot with 'systemctl enable bridge-nat-agent.service', or run" >&2
    echo "  '/opt/cni/bin/bridge-nat watch --state-dir /run/bridge-nat' under this system's supervisor." >&2
  fi
fi

if $demo; then
  exec bash tests/demo.sh "${dirs[0]}"
fi
