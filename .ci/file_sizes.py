#!/usr/bin/env python3
"""Fails when a Rust file under DIR has more than LIMIT lines before its
`#[cfg(test)] mod tests` (one concern a file; tests stay beside their code).

    python3 .ci/file_sizes.py src 600
"""
import os
import re
import sys

root, limit = sys.argv[1], int(sys.argv[2])
over = []
for folder, _, names in os.walk(root):
    for name in names:
        if not name.endswith(".rs"):
            continue
        path = os.path.join(folder, name)
        text = open(path, encoding="utf-8").read()
        m = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
        lines = text[: m.start() if m else len(text)].count("\n")
        if lines > limit:
            over.append((lines, path))
for lines, path in sorted(over, reverse=True):
    print(f"{path}: {lines} lines before its tests (at most {limit})")
sys.exit(1 if over else 0)
