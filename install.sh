#!/usr/bin/env bash
# Build bridge-nat in release mode and install it as a CNI plugin.
#   sudo ./install.sh                      -> /opt/cni/bin/bridge-nat
#   sudo ./install.sh /var/lib/rancher/k3s/data/cni   -> also there (k3s's CNI bin dir)
#   sudo ./install.sh --demo               -> install, then attach a pod in throwaway network
#                                             namespaces and show traffic flowing through it
set -euo pipefail
cd "$(dirname "$0")"

demo=false
dirs=(/opt/cni/bin)
for arg in "$@"; do
  case "$arg" in
    --demo) demo=true ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
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

if $demo; then
  exec bash tests/demo.sh "${dirs[0]}"
fi
