#!/bin/sh
# The mount namespace containerd runs in for tests/containerd.rs (see tests/common/containerd.rs).
# Started as `unshare --mount --propagation slave nsenter --net=/var/run/netns/NODE holder.sh DIR NODE`:
# what `ip netns exec NODE` gives (the node's sysfs, /etc/netns/NODE/* over /etc, mounts that never
# reach the host), plus the cgroup mounts runc needs, which `ip netns exec` loses with the old /sys,
# and private directories over the paths containerd 1.6 uses whatever its config says: libcni's
# cache (/var/lib/cni) and the shims' sockets (/run/containerd). It then sleeps, so the namespace
# and every mount in it (the pods' netns, rootfs, shm) outlive a containerd restart.
set -e
dir=$1 node=$2
mount --rbind /sys/fs/cgroup "$dir/cgroup-keep"
mount -t sysfs sysfs /sys
mount --move "$dir/cgroup-keep" /sys/fs/cgroup
for e in /etc/netns/"$node"/*; do
  [ -e "$e" ] && mount --bind "$e" "/etc/${e##*/}"
done
mount --bind "$dir/cni-cache" /var/lib/cni
mount --bind "$dir/run-containerd" /run/containerd
touch "$dir/holder.ready"
exec sleep 2147483647
