#!/usr/bin/env bash
# Build the libcni test driver (Debian's golang-go + golang-github-appc-cni-dev) and print its path.
set -euo pipefail
cd "$(dirname "$0")"
tmp="cni-driver.tmp.$$"
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="${GOCACHE:-/tmp/bridge-nat-gocache}" \
  go build -o "$tmp" . >&2
mv -f "$tmp" cni-driver
echo "$PWD/cni-driver"
