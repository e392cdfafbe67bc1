"""The device check's one table: every JSON line that bench/gpu_check.sh's sections appended
(bench/gpu_bench.py's figures, bench/serve_check.py's, each section's status), grouped by section.

    python3 bench/gpu_summary.py OUT/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("section", "measure", "value", "baseline", "ratio", "target")


def read(path: Path) -> list[dict]:
    """The JSON lines of `path`; a line that does not parse (a run killed mid-write) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "section" in row and "measure" in row:
            rows.append(row)
    return rows


def shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return " ".join(str(value).split())


def table(rows: list[dict]) -> str:
    """One text table: sections in the order they first appear, rows in the order written."""
    order: dict[str, list[dict]] = {}
    for row in rows:
        order.setdefault(str(row["section"]), []).append(row)
    cells = [COLUMNS]
    for section, items in order.items():
        for i, row in enumerate(items):
            cells.append(
                (section if i == 0 else "", *(shown(row.get(key, "")) for key in COLUMNS[1:]))
            )
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "results.jsonl")
    if not path.exists():
        print(f"{path}: no results")
        return
    print(table(read(path)))


if __name__ == "__main__":
    main()
