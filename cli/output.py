"""Plain-text tables and JSON/CSV files for the command line."""

import csv
import json
import sys
from pathlib import Path

from speckle_rec.io import atomic_path


def format_table(headers, rows):
    """Left-aligned first column, right-aligned others, columns sized to fit."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(target, payload):
    """Write ``payload`` as JSON to a file (atomically) or to stdout when ``target`` is ``-``."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    if str(target) == "-":
        sys.stdout.write(text)
        return
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(text)


def write_csv(target, headers, rows):
    """Write rows as CSV to a file (atomically)."""
    with atomic_path(Path(target)) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(headers)
            writer.writerows(rows)
