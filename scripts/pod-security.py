#!/usr/bin/env python3
"""Checks that Loam's pods run with no more privilege than they need, in every render.

    pod-security.py RENDER.yaml...

Each RENDER.yaml (a `kustomize build` or `helm template` output, or one
manifest) must hold the loam-controller Deployment, the loam-node DaemonSet,
or both; each one found is checked.

The controller needs no root: its pod and containers are locked down as
Kubernetes' "restricted" Pod Security Standard asks, and its containers can
still reach each other's CSI socket and the agent token:
- the pod: runAsNonRoot, a fixed non-zero runAsUser and runAsGroup, fsGroup
  equal to runAsGroup, seccomp RuntimeDefault;
- every container: locked down (below), and no runAsUser, runAsGroup or
  runAsNonRoot of its own. `loam serve` binds its socket mode 0600
  (src/server.rs, `bind`), so the sidecars can dial it only as the very uid
  that made it: one pod-wide uid is what keeps the socket reachable;
- the agent token Secret volume is readable by its group: the kubelet makes
  the files root-owned with group fsGroup, and `loam serve` reads the token as
  that group (src/auth.rs, `Token::from_file`).

On the nodes only the loam container is privileged (it mounts, attaches loop
devices, sets quotas). Its sidecars, the registrar and the liveness probe,
run as root only to own what they touch (the agent's socket, mode 0600, and
the kubelet's plugins_registry): as the owner they need no capability, so
each is locked down too, with seccomp RuntimeDefault of its own (the pod's
would reach the privileged loam container), and no runAsUser or
runAsNonRoot that would take them off root.

Locked down: allowPrivilegeEscalation false, readOnlyRootFilesystem,
capabilities drop ALL and add none, not privileged.
Every problem is printed as `FAIL file: ...`; the exit status is 1 if any.
"""

import sys

import yaml

FORBIDDEN_PER_CONTAINER = ("runAsUser", "runAsGroup", "runAsNonRoot")


def locked_down(c):
    """What a container's securityContext leaves open."""
    sc = c.get("securityContext") or {}
    name = c["name"]
    if sc.get("allowPrivilegeEscalation") is not False:
        yield f"{name}: allowPrivilegeEscalation is not false"
    if sc.get("readOnlyRootFilesystem") is not True:
        yield f"{name}: readOnlyRootFilesystem is not true"
    if sc.get("privileged"):
        yield f"{name}: privileged"
    caps = sc.get("capabilities") or {}
    if caps.get("drop") != ["ALL"]:
        yield f"{name}: capabilities.drop is {caps.get('drop')!r}, want ['ALL']"
    if caps.get("add"):
        yield f"{name}: adds capabilities {caps['add']!r}"


def node_problems(doc):
    """The loam-node DaemonSet: every container but loam locked down, as root."""
    spec = doc["spec"]["template"]["spec"]
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    if not any(c["name"] == "loam" for c in containers):
        yield "no loam container"
    for c in containers:
        if c["name"] == "loam":
            continue
        yield from locked_down(c)
        sc = c.get("securityContext") or {}
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            yield f"{c['name']}: seccompProfile is not RuntimeDefault"
        for key in ("runAsUser", "runAsNonRoot"):
            if sc.get(key):
                yield f"{c['name']}: {key} {sc[key]!r}; it must own the agent's socket (mode 0600, root's) to dial it"


def controller_problems(doc):
    spec = doc["spec"]["template"]["spec"]
    pod = spec.get("securityContext") or {}
    if pod.get("runAsNonRoot") is not True:
        yield "the pod's runAsNonRoot is not true"
    uid, gid = pod.get("runAsUser"), pod.get("runAsGroup")
    if not isinstance(uid, int) or uid == 0:
        yield f"the pod's runAsUser is {uid!r}, want a fixed non-zero uid"
    if not isinstance(gid, int) or gid == 0:
        yield f"the pod's runAsGroup is {gid!r}, want a fixed non-zero gid"
    if pod.get("fsGroup") != gid:
        yield f"the pod's fsGroup is {pod.get('fsGroup')!r}, want runAsGroup ({gid!r}) so the token is readable"
    if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        yield "the pod's seccompProfile is not RuntimeDefault"
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    if not any(c["name"] == "loam" for c in containers):
        yield "no loam container"
    for c in containers:
        yield from locked_down(c)
        for key in FORBIDDEN_PER_CONTAINER:
            if key in (c.get("securityContext") or {}):
                yield f"{c['name']}: sets {key} itself; the socket (mode 0600) is reachable only under the pod's one uid"
    tokens = [v for v in spec.get("volumes", []) if v["name"] == "agent-token"]
    if len(tokens) != 1 or "secret" not in tokens[0]:
        yield "no agent-token Secret volume"
    else:
        mode = tokens[0]["secret"].get("defaultMode", 0o644)
        if not mode & 0o040:
            yield f"agent-token: defaultMode {mode:#o} gives the group (fsGroup) no read"


CHECKS = {
    ("Deployment", "loam-controller"): (
        controller_problems,
        "the controller runs as a non-root uid, locked down, one uid for the socket",
    ),
    ("DaemonSet", "loam-node"): (node_problems, "the node agents' sidecars are locked down, as root"),
}


def main(paths):
    failed = False
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        checked = [(d, CHECKS[key]) for d in docs if (key := (d["kind"], d["metadata"]["name"])) in CHECKS]
        if not checked:
            print(f"FAIL {path}: neither the loam-controller Deployment nor the loam-node DaemonSet")
            failed = True
            continue
        for doc, (problems, fine) in checked:
            found = list(problems(doc))
            for p in found:
                print(f"FAIL {path}: {doc['metadata']['name']}: {p}")
            failed |= bool(found)
            if not found:
                print(f"ok {path}: {fine}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
