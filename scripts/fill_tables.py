"""Refill every table of docs/results.md from the command in the comment above it.

    python scripts/fill_tables.py            # after `floral plot results/paper`

A table follows a line `<!-- python scripts/paper_table.py ARGS -->`; it is replaced by what that
command prints now, so the page always shows the folder's numbers.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"
MARKER = re.compile(r"<!-- (python scripts/paper_table\.py .*) -->")


def main() -> None:
    root = PAGE.parent.parent
    lines = PAGE.read_text().splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.fullmatch(lines[i].strip())
        i += 1
        if not match:
            continue
        command = shlex.split(match.group(1))
        table = subprocess.run([sys.executable, *command[1:]], cwd=root, check=True,
                               capture_output=True, text=True).stdout.splitlines()
        while i < len(lines) and lines[i].startswith("|"):
            i += 1  # the old table
        out.extend(table)
    PAGE.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
