#!/usr/bin/env bash
# Builds the containerd tests' sandbox ("pause") image as an OCI archive, for `ctr images import`:
# one uncompressed layer holding Debian's static busybox, whose entrypoint sleeps for ever.
# No registry is reachable from the test machines, so the image is made here from a local binary.
# usage: image.sh OUT.tar IMAGE_NAME
set -euo pipefail
out=$1 name=$2
busybox=/bin/busybox
# A dynamically linked busybox would find no libc inside the image.
if ldd "$busybox" >/dev/null 2>&1; then
  echo "image.sh: $busybox is not static (apt-get install busybox-static)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs/bin" "$work/oci/blobs/sha256"
arch=$(dpkg --print-architecture) # amd64, arm64: Debian's names are OCI's for these
install -m 0755 "$busybox" "$work/rootfs/bin/busybox"
# Fixed owner, order and times: the same busybox always gives the same layer digest.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" bin

# blob FILE MEDIATYPE: stores FILE as a blob, prints its descriptor.
blob() {
  local digest size
  digest=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$work/oci/blobs/sha256/$digest"
  printf '{"mediaType":"%s","digest":"sha256:%s","size":%s}' "$2" "$digest" "$size"
}

layer_digest=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
layer=$(blob "$work/layer.tar" application/vnd.oci.image.layer.v1.tar)
# The pause container only has to keep the sandbox's namespaces alive; CRI stops it with SIGKILL.
printf '%s' '{"architecture":"'"$arch"'","os":"linux","config":{"Entrypoint":["/bin/busybox","sleep","2147483647"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$layer_digest"'"]}}' >"$work/config.json"
config=$(blob "$work/config.json" application/vnd.oci.image.config.v1+json)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
  "$config" "$layer" >"$work/manifest.json"
manifest=$(blob "$work/manifest.json" application/vnd.oci.image.manifest.v1+json)
# io.containerd.image.name is the full name ctr import gives the image.
printf '{"schemaVersion":2,"manifests":[%s]}' \
  "${manifest%\}},\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"},\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"${name##*:}\"}}" \
  >"$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$out" oci-layout index.json blobs
