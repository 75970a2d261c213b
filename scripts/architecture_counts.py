"""The line counts of docs/architecture.md, from the tree as it is: never typed by hand.

    python scripts/architecture_counts.py            # print the table
    python scripts/architecture_counts.py --write    # refresh it in docs/architecture.md

The table stands between `<!-- scripts/architecture_counts.py -->` and `<!-- end -->`;
tests/docs/test_architecture_doc.py fails when it no longer matches the tree.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "floral"
DOC = ROOT / "docs" / "architecture.md"
# The layers the doc describes, in its order; each row one module or package.
PARTS = (
    "engines/driver.py", "engines/worker.py", "engines/aggregation.py", "engines/local.py",
    "engines/batched.py", "engines/flower", "methods/base.py", "methods/checks.py",
    "experiment",
)
BLOCK = re.compile(r"(<!-- scripts/architecture_counts\.py -->\n)(.*?)(<!-- end -->)", re.S)


def lines_of(path: Path) -> int:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return sum(len(f.read_text().splitlines()) for f in files)


def table() -> str:
    rows = ["| part of `src/floral` | lines |", "|---|---:|"]
    rows += [f"| `{part}` | {lines_of(PACKAGE / part):,} |" for part in PARTS]
    for folder in ("engines", "methods"):
        rows.append(f"| all of `{folder}/` | {lines_of(PACKAGE / folder):,} |")
    return "\n".join(rows) + "\n"


def refreshed(text: str) -> str:
    if not BLOCK.search(text):
        raise SystemExit(f"{DOC}: no <!-- scripts/architecture_counts.py --> block")
    return BLOCK.sub(lambda m: m.group(1) + table() + m.group(3), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refresh the doc's table")
    if parser.parse_args().write:
        DOC.write_text(refreshed(DOC.read_text()))
    else:
        print(table(), end="")


if __name__ == "__main__":
    main()
