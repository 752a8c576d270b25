#!/usr/bin/env python3
"""Fails on a broken relative link or anchor in the docs.

Checks every `[text](target)` in the given Markdown files (by default README.md,
docs/*.md, CHANGELOG.md, BENCHMARKS.md and the READMEs under tests/), outside
fenced code blocks and inline code: a relative target must name a file or
directory of the repository, and a `#anchor` (alone, or after a Markdown file)
must be a heading of that file, spelled as GitHub spells heading anchors
(lower case; punctuation other than `-` and `_` dropped; spaces become `-`; a
repeated heading gets `-1`, `-2`, ...). Links with a scheme (https:, mailto:)
are not fetched.

Usage: scripts/doclinks.py [FILE.md ...]; prints one line per broken link and
exits 1 if there is any.
"""

import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT = ["README.md", "docs/*.md", "CHANGELOG.md", "BENCHMARKS.md", "tests/*/README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title"): the text may hold code spans and nested brackets one deep.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    """The anchor GitHub gives a heading."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    if path not in _anchors:
        seen = {}
        found = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        _anchors[path] = found
    return _anchors[path]


def check(path):
    problems = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub(lambda c: "x" * len(c.group(0)), line)):
            target = m.group(1)
            if SCHEME.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            where = f"{path.relative_to(REPO)}:{number}: {target}"
            dest = (path.parent / file_part).resolve() if file_part else path
            if file_part and not dest.exists():
                problems.append(f"{where}: no such file {file_part}")
                continue
            if file_part and REPO not in dest.parents and dest != REPO:
                problems.append(f"{where}: outside the repository")
                continue
            if anchor:
                if dest.suffix != ".md" or not dest.is_file():
                    problems.append(f"{where}: an anchor into a file that is not Markdown")
                elif anchor not in anchors(dest):
                    problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return problems


def main(args):
    files = []
    for pattern in args or DEFAULT:
        matched = sorted(REPO.glob(pattern)) if any(c in pattern for c in "*?[") else [REPO / pattern]
        files += [p for p in matched if p.is_file()]
    if not files:
        print("doclinks: no Markdown file to check", file=sys.stderr)
        return 1
    problems = [p for f in files for p in check(f.resolve())]
    for p in problems:
        print(p)
    links = sum(
        len(LINK.findall(CODE_SPAN.sub(lambda c: "x" * len(c.group(0)), line)))
        for f in files
        for _, line in prose_lines(f.read_text(encoding="utf-8"))
    )
    print(f"doclinks: {len(files)} files, {links} links, {len(problems)} broken")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
