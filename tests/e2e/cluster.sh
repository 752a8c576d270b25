#!/usr/bin/env bash
# The single-node cluster, run by run.sh as PID 1 of fresh PID, mount and
# network namespaces: when this script ends, for whatever reason, the kernel
# kills every process it started and drops every mount and network device it
# made. Nothing here touches the host's network or mount table.
#
# Inside: lo, a device e2e0 (a veth) holding the node IP and the two Service IPs
# the cluster needs without kube-proxy (10.96.0.1: the API server listens on
# 443 on every address; 10.96.0.10: CoreDNS, host network, bound to it); etcd
# and the control plane on 127.0.0.1; containerd; the kubelet; the CNI bridge.
# Then deploy/groupsnapshot/ (deploy/ with volume group snapshots on) through
# tests/e2e/overlay, the agent Secret as the README says, and story.sh.
# Env (from run.sh): E2E_CACHE, E2E_RUN, E2E_REPO, E2E_CGROUP_ROOT,
# E2E_SNAPSHOT_CRD, E2E_SNAPSHOT_CONTROLLER (directories of the external-snapshotter modules).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.sh"
cache=$E2E_CACHE
run=$E2E_RUN
repo=$E2E_REPO
export PATH="$cache/bin:$PATH"
NODE=loam-e2e
NODE_IP=10.250.0.10
SERVICE_CIDR=10.96.0.0/16
API_IP=10.96.0.1
DNS_IP=10.96.0.10
POD_CIDR=10.244.0.0/24
pki="$run/pki"
logs="$run/logs"
mkdir -p "$pki" "$logs"
readlink /proc/self/ns/pid >"$run/pidns"

t0=$SECONDS
say() { printf '[cluster %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }
# wait_for SECONDS WHAT COMMAND...: polls COMMAND once a second.
wait_for() {
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit; i++)); do
        if "$@" >/dev/null 2>&1; then
            say "$what: ok after ${i}s"
            return 0
        fi
        sleep 1
    done
    die "$what: not within ${limit}s"
}
# daemon NAME ARGS...: starts a program in the background, logging to logs/NAME.log.
daemon() {
    local name=$1
    shift
    "$@" >"$logs/$name.log" 2>&1 &
    echo $! >"$run/$name.pid"
    say "started $name (pid $!)"
}
alive() { kill -0 "$(cat "$run/$1.pid")" 2>/dev/null || die "$1 exited: $(tail -5 "$logs/$1.log")"; }

# --- mounts: the paths deploy/ and the kubelet use, backed by the run directory
mount -t tmpfs tmpfs /run/containerd
mount -t tmpfs tmpfs /run/netns
for d in kubelet loam cni; do
    mkdir -p "$run/var-lib-$d"
    mount --bind "$run/var-lib-$d" "/var/lib/$d"
done
mkdir -p "$run/var-log-pods" "$run/var-log-containers"
mount --bind "$run/var-log-pods" /var/log/pods
mount --bind "$run/var-log-containers" /var/log/containers
# Shared inside this namespace only (it was made private from the host's), so
# the node agent's Bidirectional mounts reach the kubelet and the pods.
mount --make-rshared /

# The kubelet sets these host-wide kernel tunables to its values at start-up
# (vm.overcommit_memory=1, kernel.panic_on_oops=1, ...): this machine is shared,
# so this namespace's /proc shows the kubelet its values instead (read-only
# files bound over /proc/sys), and the host's stay as they are.
mkdir -p "$run/sysctl"
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    f=${kv%=*}
    [ "$(cat "/proc/sys/$f")" != "${kv#*=}" ] || continue
    echo "${kv#*=}" >"$run/sysctl/${f//\//.}"
    mount --bind "$run/sysctl/${f//\//.}" "/proc/sys/$f"
    mount -o remount,bind,ro "/proc/sys/$f"
done

# --- network
ip link set lo up
# The kernel here has no dummy device: a veth pair, whose peer stays unused.
ip link add e2e0 type veth peer name e2e1
ip link set e2e1 up
ip addr add "$NODE_IP/24" dev e2e0
ip addr add "$API_IP/32" dev e2e0
ip addr add "$DNS_IP/32" dev e2e0
ip link set e2e0 up
ip route add default dev e2e0
sysctl -qw net.ipv4.ip_forward=1
printf 'nameserver %s\n' "$DNS_IP" >"$run/resolv.conf" # what the kubelet gives pods as the host's

# --- certificates
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=loam-e2e-ca \
    -keyout "$pki/ca.key" -out "$pki/ca.crt"
# cert NAME SUBJECT [SAN]: a key and a certificate signed by the CA.
cert() {
    local name=$1 subj=$2 san=${3:-}
    openssl_quiet req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$pki/$name.key" -out "$pki/$name.csr"
    if [ -n "$san" ]; then
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" >"$pki/$name.ext"
    else
        printf 'extendedKeyUsage=clientAuth\n' >"$pki/$name.ext"
    fi
    openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 2 -extfile "$pki/$name.ext" -out "$pki/$name.crt"
}
cert apiserver /CN=kube-apiserver \
    "IP:127.0.0.1,IP:$API_IP,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=kubernetes-admin"
cert controller-manager /CN=system:kube-controller-manager
cert scheduler /CN=system:kube-scheduler
cert kubelet "/O=system:nodes/CN=system:node:$NODE"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
# kubeconfig NAME: for the certificate NAME, against the API server on 127.0.0.1.
kubeconfig() {
    cat >"$run/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster: {server: "https://127.0.0.1:443", certificate-authority: "$pki/ca.crt"}
users:
  - name: $1
    user: {client-certificate: "$pki/$1.crt", client-key: "$pki/$1.key"}
contexts:
  - name: e2e
    context: {cluster: e2e, user: $1}
current-context: e2e
EOF
}
for c in admin controller-manager scheduler kubelet; do kubeconfig "$c"; done
export KUBECONFIG="$run/admin.kubeconfig"
say "certificates made"

# --- etcd and the control plane
daemon etcd etcd --name e2e --data-dir "$run/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --quota-backend-bytes 1073741824 --log-level warn
wait_for 60 "etcd healthy" curl -sf http://127.0.0.1:2379/health

daemon kube-apiserver kube-apiserver --etcd-servers http://127.0.0.1:2379 \
    --bind-address 0.0.0.0 --secure-port 443 --advertise-address "$NODE_IP" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false --endpoint-reconciler-type lease \
    --kubelet-preferred-address-types InternalIP
wait_for 120 "API server ready" kubectl get --raw /readyz

daemon kube-controller-manager kube-controller-manager --kubeconfig "$run/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$run/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$run/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr 10.244.0.0/16 --node-cidr-mask-size 24 \
    --service-cluster-ip-range "$SERVICE_CIDR" --controllers '*'
daemon kube-scheduler kube-scheduler --kubeconfig "$run/scheduler.kubeconfig" \
    --authentication-kubeconfig "$run/scheduler.kubeconfig" \
    --authorization-kubeconfig "$run/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false

# --- containerd, with the images made by images.sh
mkdir -p "$run/cni/net.d"
cat >"$run/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$run/cni/ipam",
              "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
EOF
cat >"$run/containerd.toml" <<EOF
version = 3
root = "$run/containerd"
state = "/run/containerd"
oom_score = 0
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "registry.k8s.io/pause:3.10.2"
[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: never lower an oom_score_adj.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$run/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      SystemdCgroup = false
      BinaryName = "$cache/bin/runc"
EOF
daemon containerd containerd --config "$run/containerd.toml"
wait_for 60 "containerd up" ctr --address /run/containerd/containerd.sock version
for tar in "$cache"/images/*.tar; do
    ref=$(cat "${tar%.tar}.ref")
    ctr --address /run/containerd/containerd.sock -n k8s.io images import --base-name "${ref%:*}" "$tar" \
        >>"$logs/import.log" 2>&1 || die "import $tar: $(tail -3 "$logs/import.log")"
done
say "images imported: $(ctr --address /run/containerd/containerd.sock -n k8s.io images ls -q | grep -vc '^sha256:')"

# --- the kubelet
cat >"$run/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: "$E2E_CGROUP_ROOT"
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: ["$DNS_IP"]
clusterDomain: cluster.local
resolvConf: "$run/resolv.conf"
failSwapOn: false
oomScoreAdj: 0
address: "$NODE_IP"
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
daemon kubelet kubelet --config "$run/kubelet.yaml" --kubeconfig "$run/kubelet.kubeconfig" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" --root-dir /var/lib/kubelet
wait_for 120 "node $NODE registered" kubectl get node "$NODE"
wait_for 120 "node $NODE Ready" kubectl wait --for=condition=Ready "node/$NODE" --timeout=1s
alive kube-controller-manager
alive kube-scheduler

# --- cluster DNS
sed -e "s/@DNS_IP@/$DNS_IP/g" -e "s/@COREDNS_VERSION@/$COREDNS_VERSION/g" "$here/manifests/coredns.yaml" |
    kubectl apply -f - >/dev/null
kubectl -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null ||
    die "CoreDNS not ready: $(kubectl -n kube-system describe pods -l k8s-app=kube-dns | tail -20)"
say "CoreDNS ready on $DNS_IP"

# --- snapshot CRDs and snapshot-controller, from the external-snapshotter modules
# (config/crd has the groupsnapshot.storage.k8s.io CRDs too)
snapdir="$run/snapshot-controller"
mkdir -p "$snapdir"
crd=$E2E_SNAPSHOT_CRD
ctl=$E2E_SNAPSHOT_CONTROLLER
cp "$ctl"/*.yaml "$snapdir/"
chmod u+w "$snapdir"/*.yaml
cat >"$snapdir/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [rbac-snapshot-controller.yaml, setup-snapshot-controller.yaml]
images:
  - name: registry.k8s.io/sig-storage/snapshot-controller
    newTag: $SNAPSHOTTER_VERSION
replicas:
  - name: snapshot-controller
    count: 1
# Volume group snapshots on, as the README tells users (deploy/groupsnapshot/,
# which the overlay uses, turns them on in csi-snapshotter).
patches:
  - target: {group: apps, version: v1, kind: Deployment, name: snapshot-controller}
    patch: |-
      - op: test
        path: /spec/template/spec/containers/0/name
        value: snapshot-controller
      - op: add
        path: /spec/template/spec/containers/0/args/-
        value: --feature-gates=CSIVolumeGroupSnapshot=true
EOF
kubectl apply -k "$crd" >/dev/null
kubectl apply -k "$snapdir" >/dev/null
kubectl wait --for=condition=Established crd --all --timeout=60s >/dev/null
say "snapshot and group snapshot CRDs, snapshot-controller with CSIVolumeGroupSnapshot applied"

# --- Loam: deploy/groupsnapshot/ through the e2e overlay, then the Secret as the README says
kubectl apply -k "$repo/tests/e2e/overlay" >"$logs/apply.log"
kubectl apply -k "$repo/deploy/snapshot/" >>"$logs/apply.log"
kubectl -n loam create secret generic loam-agent-token --from-literal=token="$(head -c 32 /dev/urandom | base64)"
kubectl -n loam rollout status daemonset/loam-node --timeout=180s ||
    die "loam-node: $(kubectl -n loam describe pods -l app.kubernetes.io/component=node | tail -30)"
kubectl -n loam rollout status deployment/loam-controller --timeout=180s ||
    die "loam-controller: $(kubectl -n loam describe pods -l app.kubernetes.io/component=controller | tail -30)"
kubectl -n kube-system rollout status deployment/snapshot-controller --timeout=120s >/dev/null
say "Loam deployed"
echo "$((SECONDS - t0))" >"$run/bringup-seconds"

if [ -n "${E2E_HOLD:-}" ]; then
    say "E2E_HOLD set: holding the cluster (see run.sh for how to get in)"
    sleep infinity
fi
bash "$here/story.sh"
