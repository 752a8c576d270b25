#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, strictly (unknown fields fail).

    validate-manifests.py K8S_VERSION FILE...

Core objects are checked with kubernetes-validate, which bundles the OpenAPI
schemas of each Kubernetes release. The snapshot CRD kinds are not part of
those, so they are checked against scripts/schemas/snapshot.storage.k8s.io-v1.json,
transcribed from the external-snapshotter CRDs. Any other kind fails: nothing
is skipped silently.
"""

import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

SNAPSHOT_SCHEMA = pathlib.Path(__file__).parent / "schemas" / "snapshot.storage.k8s.io-v1.json"


def main() -> int:
    version, files = sys.argv[1], sys.argv[2:]
    snapshot = json.loads(SNAPSHOT_SCHEMA.read_text())
    failures = checked = 0
    for name in files:
        with open(name) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            try:
                if doc.get("apiVersion", "").startswith("snapshot.storage.k8s.io/"):
                    schema = {**snapshot, "$ref": f"#/$defs/{doc['kind']}"}
                    if doc["kind"] not in snapshot["$defs"]:
                        raise ValueError(f"no schema for {doc['kind']}")
                    jsonschema.validate(doc, schema)
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
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
