#!/usr/bin/env python3
"""Checks that a render of the Helm chart holds the same objects as kustomize's.

    chart-matches-deploy.py WHAT CHART.yaml KUSTOMIZE.yaml...

CHART.yaml is `helm template` of charts/loam, KUSTOMIZE.yaml one or more
`kustomize build` outputs of deploy/ (together: the objects the chart's values
should produce). Objects are compared as data (key order, quoting and comments
do not matter) and paired by apiVersion, kind, namespace and name. The only
differences allowed are the ones the two trees have by design:
- Helm's own labels (managed-by, instance, version, helm.sh/chart) on the
  chart's objects;
- the agent token Secret, which the chart makes (deploy/ leaves it to the
  operator); it must be there, with a token of at least 16 characters;
- the Namespace, which deploy/ makes and the chart leaves to
  `helm install --create-namespace` (Helm stores the release in it first).
Anything else prints a diff per object and fails.
"""

import base64
import difflib
import sys

import yaml

class PlainDumper(yaml.SafeDumper):
    """Writes shared values (YAML anchors in the chart) out in full, so diffs show data only."""

    def ignore_aliases(self, data):
        return True


HELM_LABELS = {"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version",
               "helm.sh/chart"}


def load(paths):
    objects = {}
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                meta = doc.get("metadata", {})
                key = (doc.get("apiVersion"), doc.get("kind"), meta.get("namespace", ""), meta.get("name"))
                if key in objects:
                    sys.exit(f"FAIL {path}: {key} appears twice")
                objects[key] = doc
    return objects


def without_helm_labels(doc):
    labels = doc.get("metadata", {}).get("labels")
    if labels is not None:
        for label in HELM_LABELS & labels.keys():
            del labels[label]
    return doc


def take_token_secret(chart):
    """Removes the chart's agent token Secret, failing unless it holds a usable token."""
    keys = [k for k in chart if k[:2] == ("v1", "Secret") and k[3] == "loam-agent-token"]
    if len(keys) != 1:
        return ["the chart has no loam-agent-token Secret"]
    secret = chart.pop(keys[0])
    token = base64.b64decode(secret.get("data", {}).get("token", "")).decode()
    if len(token.strip()) < 16:
        return [f"the chart's agent token is {len(token.strip())} characters, fewer than the 16 Loam needs"]
    return []


def main() -> int:
    what, chart_path, kustomize_paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    chart = {k: without_helm_labels(v) for k, v in load([chart_path]).items()}
    kustomize = {k: v for k, v in load(kustomize_paths).items() if k[1] != "Namespace"}
    problems = take_token_secret(chart)
    for key in sorted(chart.keys() | kustomize.keys(), key=str):
        name = "/".join(p for p in key[1:] if p)
        if key not in kustomize:
            problems.append(f"{name}: only in the chart")
        elif key not in chart:
            problems.append(f"{name}: only in deploy/")
        elif chart[key] != kustomize[key]:
            diff = difflib.unified_diff(
                yaml.dump(kustomize[key], Dumper=PlainDumper, sort_keys=True).splitlines(),
                yaml.dump(chart[key], Dumper=PlainDumper, sort_keys=True).splitlines(),
                "deploy/", "chart", lineterm="")
            problems.append(f"{name} differs:\n" + "\n".join(diff))
    for problem in problems:
        print(f"FAIL {what}: {problem}")
    if not problems:
        print(f"{what}: the chart renders the same {len(kustomize)} objects as deploy/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
