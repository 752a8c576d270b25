#!/usr/bin/env bash
# What the kind cluster's nodes need here once `kind create cluster` is done:
#
# Loop device files. A node's /dev is filled when its container starts, so a
# loop device the kernel makes later (Loam attaches its images to new ones) has
# no file there: /dev/loop0..255 are made in each node up front.
#
# The pod network, in place of kindnetd (the module proxy does not serve it,
# see node-image.sh): on every node a CNI config of kind's
# own shape (ptp + host-local on the node's podCIDR, portmap), as kindnetd
# writes it, and a route to every other node's podCIDR through that node's
# address on the docker network, as kindnetd adds them. No masquerading: pods
# talk to pods, Services and the API server, never outside the cluster.
#
# Usage: nodes.sh CLUSTER_NAME   (KUBECONFIG and DOCKER_HOST set)
set -euo pipefail
cluster=$1
mapfile -t nodes < <(kind get nodes --name "$cluster" | sort)
for n in "${nodes[@]}"; do
    docker exec "$n" sh -c 'for i in $(seq 0 255); do [ -e /dev/loop$i ] || mknod -m 0660 /dev/loop$i b 7 $i; done'
done
declare -A cidr ip
for n in "${nodes[@]}"; do
    cidr[$n]=$(kubectl get node "$n" -o jsonpath='{.spec.podCIDR}')
    ip[$n]=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$n")
    [ -n "${cidr[$n]}" ] && [ -n "${ip[$n]}" ] ||
        { echo "node $n: no podCIDR ('${cidr[$n]}') or no address ('${ip[$n]}')" >&2; exit 1; }
done
for n in "${nodes[@]}"; do
    docker exec -i "$n" sh -c 'mkdir -p /etc/cni/net.d && cat >/etc/cni/net.d/.10-loam-kind.conflist.tmp &&
        mv /etc/cni/net.d/.10-loam-kind.conflist.tmp /etc/cni/net.d/10-loam-kind.conflist' <<EOF
{
  "cniVersion": "0.4.0",
  "name": "loam-kind",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "mtu": 1500,
     "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
              "routes": [{"dst": "0.0.0.0/0"}], "ranges": [[{"subnet": "${cidr[$n]}"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
    for m in "${nodes[@]}"; do
        [ "$m" = "$n" ] || docker exec "$n" ip route replace "${cidr[$m]}" via "${ip[$m]}"
    done
    echo "$n: ${cidr[$n]} on ${ip[$n]}" >&2
done
