"""Timing calls and printing benchmark results: a readable table for people, or one JSON object (--json).

Benchmarks build rows of plain numbers; this module times and formats, it measures nothing itself.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def timed(call: Callable[[], object], n: int) -> list[float]:
    """Seconds taken by each of `n` sequential calls."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of a host-synchronous call over `repeats`, after one warm-up call."""
    call()
    return float(statistics.median(timed(call, repeats)))


def emit(title: str, rows: Sequence[Mapping[str, Any]], as_json: bool, extra: Mapping[str, Any] | None = None) -> None:
    """Prints `rows` (dicts with the same keys) as a table, or everything as one JSON object."""
    if as_json:
        json.dump({"benchmark": title, "rows": list(rows), **(extra or {})}, sys.stdout, indent=2)
        print()
        return
    print(f"\n{title}")
    if extra:
        for key, value in extra.items():
            if isinstance(value, Mapping) and value:  # a section (targets, totals): one line per entry
                print(f"  {key}:")
                for name, item in value.items():
                    print(f"    {name}: {item}")
            else:
                print(f"  {key}: {value}")
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
