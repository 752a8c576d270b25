# shellcheck shell=bash disable=SC2034
# What the end-to-end run builds, pinned. Sourced by the e2e scripts.
# Kubernetes: k8s.io/kubernetes at this release; its staging modules come from
# their published v0.<minor>.<patch> tags (see build.sh).
K8S_VERSION=v1.37.1 # v1.37.2: the module proxy serves its go.mod but refuses its zip (403)
ETCD_VERSION=v3.6.16          # go.etcd.io/etcd/server/v3
CONTAINERD_VERSION=v2.2.9     # github.com/containerd/containerd/v2
RUNC_VERSION=v1.4.3           # github.com/opencontainers/runc
COREDNS_VERSION=v1.14.6       # github.com/coredns/coredns (the release kubeadm 1.37 deploys)
# The kubernetes-csi sidecars deploy/ names (same versions as deploy/*.yaml).
PROVISIONER_VERSION=v6.3.0    # github.com/kubernetes-csi/external-provisioner/v6
ATTACHER_VERSION=v4.12.0      # github.com/kubernetes-csi/external-attacher/v4
SNAPSHOTTER_VERSION=v8.6.0    # github.com/kubernetes-csi/external-snapshotter/v8 (+ snapshot-controller, CRDs)
RESIZER_VERSION=v2.3.0        # github.com/kubernetes-csi/external-resizer/v2 (v2.2.1 is refused by the module proxy)
REGISTRAR_VERSION=v2.17.0     # github.com/kubernetes-csi/node-driver-registrar: not served by the module proxy
LIVENESSPROBE_VERSION=v2.19.0 # github.com/kubernetes-csi/livenessprobe: not served by the module proxy
DEBIAN_SUITE=trixie           # the Dockerfile's runtime base, debian:trixie-slim
# What the kind node image adds (tests/kind): kind's release, and the versions its
# base image Dockerfile (images/base in the kind module) pins.
KIND_VERSION=v0.33.0          # sigs.k8s.io/kind
CRICTL_VERSION=v1.36.0        # sigs.k8s.io/cri-tools
CNI_PLUGINS_VERSION=v1.9.1    # github.com/containernetworking/plugins
LOCAL_PATH_VERSION=v0.0.30    # github.com/rancher/local-path-provisioner (kind's default StorageClass)
# Prometheus for the metrics step of the kind story (tests/kind/prometheus-step.sh): the
# module github.com/prometheus/prometheus tags Prometheus v3.X.Y as v0.3XX.Y. The same release
# as the rule parser of scripts/rulecheck.
PROMETHEUS_VERSION=v0.316.0   # Prometheus v3.16.0
# Helm, for CI's chart checks (scripts/test.sh) and the kind run's Helm step (tests/kind/helm-step.sh).
HELM_VERSION=v4.3.2           # helm.sh/helm/v4
