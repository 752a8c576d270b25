#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, strictly (unknown fields fail).

    validate-manifests.py K8S_VERSION FILE...

Core objects are checked with kubernetes-validate, which bundles the OpenAPI
schemas of each Kubernetes release. The snapshot and group snapshot CRD kinds
are not part of those, so they are checked against the schemas of their API
group in scripts/schemas/ (snapshot.storage.k8s.io-v1.json,
groupsnapshot.storage.k8s.io-v1.json), transcribed from the external-snapshotter
CRDs; so is the Helm chart's PodMonitor (monitoring.coreos.com-v1.json, the
fields the chart renders). Any other kind fails: nothing is skipped silently.

Loam's StorageClasses are also held to what csi-provisioner accepts: it reads
any parameter named `fstype` in any case (Loam's older `fsType` too) as its
deprecated filesystem key and refuses to provision from a class that also has
`csi.storage.k8s.io/fstype`, which is what Kubernetes' storage suite adds; so
the filesystem is named with the standard key only.
"""

import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = pathlib.Path(__file__).parent / "schemas"
# API group of a CRD kind -> the schema file holding its kinds under $defs.
CRD_GROUPS = {
    "snapshot.storage.k8s.io": "snapshot.storage.k8s.io-v1.json",
    "groupsnapshot.storage.k8s.io": "groupsnapshot.storage.k8s.io-v1.json",
    "monitoring.coreos.com": "monitoring.coreos.com-v1.json",
}


def provisioner_accepts(doc: dict) -> None:
    """Raises when csi-provisioner would read a Loam class's parameter as its deprecated `fstype` key."""
    if doc.get("kind") != "StorageClass" or doc.get("provisioner") != "loam.csi.dev":
        return
    legacy = [k for k in (doc.get("parameters") or {}) if k.lower() == "fstype"]
    if legacy:
        raise ValueError(f"parameter {legacy[0]!r}: name the filesystem with csi.storage.k8s.io/fstype "
                         "(csi-provisioner reads this key as its deprecated one and refuses a class with both)")


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    crds = {group: json.loads((SCHEMAS / name).read_text()) for group, name in CRD_GROUPS.items()}
    failures = checked = 0
    for name in files:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                group = doc.get("apiVersion", "").rpartition("/")[0]
                if group in crds:
                    if doc.get("kind") not in crds[group]["$defs"]:
                        raise ValueError(f"no schema for {doc.get('kind')} in {group}")
                    jsonschema.validate(doc, {**crds[group], "$ref": f"#/$defs/{doc['kind']}"})
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
                provisioner_accepts(doc)
                checked += 1
            except Exception as e:  # every failure is reported, then counted
                failures += 1
                message = getattr(e, "message", str(e))
                path = "/".join(str(p) for p in getattr(e, "path", []))
                print(f"FAIL {what}: {message} {('at ' + path) if path else ''}")
    print(f"{checked} objects valid against Kubernetes {version}, {failures} invalid")
    return 1 if failures or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
