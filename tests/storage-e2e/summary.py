#!/usr/bin/env python3
"""Counts one class's run of the External Storage suite from ginkgo's JSON
report (--json-report), for run.sh.

Prints `<class>: N passed, N failed, N skipped` (skipped: specs the suite
selected that skipped themselves at run time, each with its reason), then the
specs not run by run.sh's own --skip (not selected), the skip reasons grouped
with their counts, and every failure with its message's first lines. Only `It`
specs of `External Storage [Driver: loam.csi.dev]` count; the rest of e2e.test
is filtered out by the focus.

Usage: summary.py CLASS REPORT.json [--dry-run]
"""

import collections
import json
import re
import sys

FAILED = {"failed", "panicked", "interrupted", "aborted", "timedout"}


def name(spec):
    return " ".join(t for t in spec.get("ContainerHierarchyTexts") or [] if t) + " " + spec.get("LeafNodeText", "")


def reason(message):
    """A skip message without what differs from spec to spec (names, sizes)."""
    first = message.strip().splitlines()[0] if message.strip() else "(no message)"
    first = re.sub(r"\b[0-9a-f]{8}-[0-9a-f-]{27}\b", "<uid>", first)
    first = re.sub(r"\b(e2e|volume|provisioning|multivolume|snapshotting|ephemeral)-[0-9a-z-]+\b", r"\1-<ns>", first)
    return first[:200]


def main():
    cls, path = sys.argv[1], sys.argv[2]
    dry = "--dry-run" in sys.argv[3:]
    reports = json.load(open(path))
    counts = collections.Counter()
    skips = collections.Counter()
    failures = []
    for report in reports:
        for spec in report.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            text = name(spec)
            if "[Driver: loam.csi.dev]" not in text:
                continue
            state = spec.get("State", "")
            message = (spec.get("Failure") or {}).get("Message", "")
            if state == "passed":
                counts["passed"] += 1
            elif state in FAILED:
                counts["failed"] += 1
                failures.append((text, state, message))
            elif state == "skipped" and message:
                counts["skipped"] += 1
                skips[reason(message)] += 1
            elif state in ("skipped", "pending"):
                # Filtered by the focus and skip expressions (or listed by a
                # dry run, where nothing runs).
                counts["not selected"] += 1
    if dry:
        print(f"{cls}: {counts['passed']} specs selected (dry run), {counts['not selected']} not selected")
        return
    print(f"{cls}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
          f" ({counts['not selected']} not selected)")
    for r, n in skips.most_common():
        print(f"  skipped {n:3d}: {r}")
    for text, state, message in failures:
        print(f"  FAILED ({state}): {text}")
        for line in message.strip().splitlines()[:6]:
            print(f"      {line[:300]}")


if __name__ == "__main__":
    main()
